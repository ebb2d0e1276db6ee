"""Checkpoints: bit-exact round trips onto other meshes, manifests, corruption, typed errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from jaxlib_ext import checkpoint as C
from jaxlib_ext import train
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.mesh import make_mesh
from parallel.rules import DEFAULT_RULES
from tests.jaxlib_ext.states import assert_same_state

CFG = LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)


def _state(mesh, tx):
    lm = LanguageModel(CFG)
    shardings = train.train_state_shardings(lm, tx, mesh)
    state = train.init_train_state(lm, tx, shardings, seed=0)
    step = train.make_train_step(
        train.lm_loss(lm), tx, shardings, train.batch_sharding(mesh, global_batch=8)
    )
    batch = np.random.default_rng(0).integers(0, 256, (8, 17), np.int32)
    state, _ = step(state, train.shard_batch(batch, train.batch_sharding(mesh)))
    return lm, state


def _target(lm, tx, mesh):
    shardings = train.train_state_shardings(lm, tx, mesh)
    return train.abstract_train_state(lm, tx, shardings)


OPTIMIZERS = {
    "adamw": optax.adamw(1e-3),
    "spam-sparse": optim.spam(1e-3, density=0.5),
    "frugal": optim.frugal(1e-3, density=0.5, update_gap=2),
    "diffgrad": optim.diffgrad(1e-3),
}


MESHES = [
    ({"data": 2, "fsdp": 4}, {"fsdp": 1}, 1),
    ({"fsdp": 1}, {"data": 2, "fsdp": 4}, 8),
    ({"data": 2, "fsdp": 4}, {"fsdp": 8}, 8),
    ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2}, 4),
    ({"fsdp": 8}, {"fsdp": 2}, 2),
]
CASES = [("adamw", *m) for m in MESHES] + [
    (n, *MESHES[0]) for n in ("spam-sparse", "frugal", "diffgrad")
]


@pytest.mark.parametrize(("name", "save_axes", "load_axes", "load_devices"), CASES)
def test_restore_onto_another_mesh_is_bit_exact(
    tmp_path, devices, name, save_axes, load_axes, load_devices
):
    tx = OPTIMIZERS[name]
    save_mesh = make_mesh(save_axes, devices=devices[: np.prod(list(save_axes.values()))])
    lm, state = _state(save_mesh, tx)
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, extra={"data": {"seed": 0, "epoch": 0, "index": 8}})
        load_mesh = make_mesh(load_axes, devices=devices[:load_devices])
        target = _target(lm, tx, load_mesh)
        restored, extra = ckpt.restore(target)
    assert_same_state(restored, state)
    assert extra == {"data": {"seed": 0, "epoch": 0, "index": 8}}
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding


def test_manifest_describes_every_leaf(tmp_path, devices):
    mesh = make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    _, state = _state(mesh, optim.spam(1e-3, density=0.5))
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, rules=DEFAULT_RULES)
    info = C.manifest(tmp_path)
    assert info["format"] == C.FORMAT and info["step"] == 1
    assert info["saved_mesh"] == {"data": 2, "fsdp": 4} and info["saved_process_count"] == 1
    assert info["saved_rules"][0] == ["batch", ["data", "fsdp"]]
    assert info["nodes"]["opt_state/0"] == "ScaleBySpamState" and info["nodes"][""] == "TrainState"
    leaves = info["leaves"]
    assert len(leaves) == len(jax.tree.leaves(state))
    assert leaves["params/head"]["role"] == "param"
    assert (
        leaves["params/head"]["shape"] == [32, 256] and leaves["params/head"]["dtype"] == "float32"
    )
    assert leaves["opt_state/0/mu/final_norm/scale"]["role"] == "moment of params/final_norm/scale"
    assert leaves["step"]["role"] == "counter" and leaves["opt_state/0/key"]["role"] == "rng"
    assert all(len(v["checksum"]) == 16 for v in leaves.values())
    assert leaves["params/head"]["saved_spec"] == "('fsdp', None)"
    assert leaves["opt_state/0/key"]["stored_shape"] == [2]  # a threefry key as its key data


def _data_files(step_dir: Path) -> list[Path]:
    """The chunk files of a step's arrays (OCDBT data under ``d/`` directories)."""
    return [
        p
        for p in (step_dir / "arrays").rglob("*")
        if p.is_file() and p.parent.name == "d" and p.stat().st_size > 1024
    ]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corruption_is_detected_and_fallback_restores_the_previous_step(tmp_path, devices, damage):
    mesh = make_mesh({"fsdp": 8}, devices=devices)
    tx = optax.adamw(1e-3)
    lm, state = _state(mesh, tx)
    target = _target(lm, tx, mesh)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        newer = state.replace(step=state.step + 1)
        ckpt.save(2, newer)
    files = _data_files(tmp_path / "2")
    assert files
    for data in files:
        raw = bytearray(data.read_bytes())
        if damage == "flip":  # a few flipped bytes (one can land in a compressed stream's padding)
            for at in (len(raw) // 4, len(raw) // 2, 3 * len(raw) // 4):
                raw[at] ^= 0xFF
        else:
            raw = raw[: len(raw) // 2]
        data.write_bytes(bytes(raw))
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.CorruptCheckpointError, match="step 2"):
            ckpt.restore(target)
        restored, _ = ckpt.restore(target, fallback=True)
    assert int(restored.step) == int(state.step)
    assert_same_state(restored, state)


def test_typed_errors(tmp_path):
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.MissingStepError, match="no checkpoint"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        ckpt.save(5, {"w": jnp.arange(8.0), "n": jnp.int32(3)})
        ckpt.wait()
        with pytest.raises(C.MissingStepError, match="step 4 not in"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32)}, step=4)
        with pytest.raises(C.StructureMismatchError, match="lacks.*'v'"):
            ckpt.restore({"v": jax.ShapeDtypeStruct((8,), jnp.float32)})
        with pytest.raises(C.StructureMismatchError, match="leaf w: saved float32\\[8\\]"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
        assert issubclass(C.CorruptCheckpointError, C.CheckpointError)
    with pytest.raises(C.MissingStepError):
        C.manifest(tmp_path, step=9)
    with pytest.raises(ValueError, match="`verify`"):
        C.Checkpointer(tmp_path, verify="some")


def test_keeps_the_newest_steps(tmp_path):
    with C.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, {"w": jnp.full(4, float(step))})
        ckpt.wait()
        assert ckpt.steps() == [3, 4] and ckpt.latest_step() == 4
        restored, extra = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, step=3)
    assert restored["w"].tolist() == [3.0] * 4 and extra is None


def test_indivisible_target_is_named_or_replicated(tmp_path, devices):
    three = make_mesh({"fsdp": 3}, devices=devices[:3])
    split = jax.sharding.NamedSharding(three, jax.sharding.PartitionSpec("fsdp"))
    state = {"w": jnp.arange(16.0).reshape(8, 2), "b": jnp.arange(6.0)}
    target = {
        "w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=split),
        "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=split),
    }
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        with pytest.raises(C.IncompatibleLayoutError, match=r"step 1, leaf w: dimension 0 of"):
            ckpt.restore(target)
        restored, _ = ckpt.restore(target, on_indivisible="replicate")
    assert_same_state(restored, state)
    assert restored["w"].sharding.spec == jax.sharding.PartitionSpec(None)  # the fallback
    assert restored["b"].sharding == split  # divisible leaves keep the target's sharding


def test_a_reader_opened_during_a_save_breaks_nothing_and_sees_new_steps(tmp_path):
    target = {"w": jax.ShapeDtypeStruct((1 << 20,), jnp.float32)}
    with C.Checkpointer(tmp_path) as writer:
        writer.save(1, {"w": jnp.full(1 << 20, 1.0)})  # in flight while the reader opens
        with C.Checkpointer(tmp_path) as reader:  # must not delete the save in flight
            writer.wait()
            assert reader.steps() == [1]
            writer.save(2, {"w": jnp.full(1 << 20, 2.0)})
            writer.wait()
            assert reader.latest_step() == 2
            assert float(reader.restore(target)[0]["w"][0]) == 2.0
