"""Checkpoints across process counts: saved by 2 processes x 4 devices and restored in 1 process,
and the reverse, bit-exactly (values compared with the saver's, and every checksum verified)."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import optim
from jaxlib_ext import checkpoint as C
from jaxlib_ext import train
from jaxlib_ext.checkpoint.layouts import flatten
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.mesh import make_mesh
from tests.jaxlib_ext.states import unwrapped
from tests.multiprocess import run_in_processes

pytestmark = pytest.mark.multiprocess

CFG = LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)


def _tx():
    return optax.chain(optim.spam(1e-3, density=0.5), optax.add_decayed_weights(1e-4))


def _setup(mesh):
    lm, tx = LanguageModel(CFG), _tx()
    shardings = train.train_state_shardings(lm, tx, mesh)
    return lm, tx, shardings


def _trained(mesh, steps=2):
    lm, tx, shardings = _setup(mesh)
    state = train.init_train_state(lm, tx, shardings, seed=0)
    step = train.make_train_step(train.lm_loss(lm), tx, shardings, train.batch_sharding(mesh))
    batch = np.random.default_rng(0).integers(0, 256, (8, 17), np.int32)
    for _ in range(steps):
        state, _ = step(state, train.shard_batch(batch, train.batch_sharding(mesh)))
    return state


def _target(mesh):
    lm, tx, shardings = _setup(mesh)
    return train.abstract_train_state(lm, tx, shardings)


def _host_values(state) -> dict[str, np.ndarray]:
    """Every leaf whole on this host (gathered across processes), keys as key data."""
    from jax.experimental import multihost_utils

    out = {}
    for key, x in flatten(state).items():
        out[key] = np.asarray(multihost_utils.process_allgather(unwrapped(x), tiled=True))
    return out


def save_in_two_processes(process_id: int, num_processes: int, directory: str) -> None:
    mesh = make_mesh({"data": 2, "fsdp": 4})  # spans both processes
    state = _trained(mesh)
    with C.Checkpointer(directory) as ckpt:  # async save, in both processes
        ckpt.save(2, state, extra={"data": {"index": 16}})
    values = _host_values(state)
    if process_id == 0:
        np.savez(
            Path(directory) / "expected.npz", **{k.replace("/", "|"): v for k, v in values.items()}
        )


def restore_in_two_processes(process_id: int, num_processes: int, directory: str) -> None:
    del process_id, num_processes
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with C.Checkpointer(directory) as ckpt:
        restored, extra = ckpt.restore(_target(mesh))
    assert extra == {"data": {"index": 16}}
    expected = np.load(Path(directory) / "expected.npz")
    values = _host_values(restored)
    assert sorted(values) == sorted(k.replace("|", "/") for k in expected.files)
    for key, value in values.items():
        np.testing.assert_array_equal(value, expected[key.replace("/", "|")], err_msg=key)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_target(mesh)), strict=True):
        assert leaf.sharding == want.sharding


def test_saved_by_two_processes_restores_in_one(tmp_path, devices):
    run_in_processes(
        "tests.jaxlib_ext.test_checkpoint_multiprocess:save_in_two_processes",
        args=(str(tmp_path),),
    )
    info = C.manifest(tmp_path)
    assert info["saved_process_count"] == 2 and info["saved_mesh"] == {"data": 2, "fsdp": 4}
    expected = np.load(tmp_path / "expected.npz")
    for axes, count in (({"fsdp": 8}, 8), ({"fsdp": 1}, 1)):
        with C.Checkpointer(tmp_path, verify="full") as ckpt:
            restored, _ = ckpt.restore(_target(make_mesh(axes, devices=devices[:count])))
        for key, value in flatten(restored).items():
            np.testing.assert_array_equal(
                np.asarray(unwrapped(value)), expected[key.replace("/", "|")]
            )


def test_saved_by_one_process_restores_in_two(tmp_path, devices):
    state = _trained(make_mesh({"fsdp": 8}, devices=devices))
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, extra={"data": {"index": 16}})
    values = {k: np.asarray(unwrapped(x)) for k, x in flatten(state).items()}
    np.savez(tmp_path / "expected.npz", **{k.replace("/", "|"): v for k, v in values.items()})
    run_in_processes(
        "tests.jaxlib_ext.test_checkpoint_multiprocess:restore_in_two_processes",
        args=(str(tmp_path),),
    )
