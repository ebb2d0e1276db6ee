"""Restoring into an edited optimizer chain: moments by parameter path, counters kept, the rest
initialized from `init` and reported by path, never zero-filled."""

import jax
import numpy as np
import optax
import pytest

import optim
from jaxlib_ext import checkpoint as C
from jaxlib_ext import train
from jaxlib_ext.checkpoint.layouts import flatten
from jaxlib_ext.checkpoint.restore_plan import LeafInfo, address, plan_restore
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.mesh import make_mesh
from tests.jaxlib_ext.states import unwrapped

CFG = LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)
BATCH = np.random.default_rng(0).integers(0, 256, (8, 17), np.int32)


def _setup(mesh, tx):
    lm = LanguageModel(CFG)
    shardings = train.train_state_shardings(lm, tx, mesh)
    step = train.make_train_step(
        train.lm_loss(lm), tx, shardings, train.batch_sharding(mesh, global_batch=8)
    )
    batch = train.shard_batch(BATCH, train.batch_sharding(mesh))
    return lm, shardings, step, batch


def _trained(mesh, tx, steps=2):
    lm, shardings, step, batch = _setup(mesh, tx)
    state = train.init_train_state(lm, tx, shardings, seed=0)
    for _ in range(steps):
        state, _ = step(state, batch)
    return state


def _target(mesh, tx):
    lm, shardings, _, _ = _setup(mesh, tx)
    return train.abstract_train_state(lm, tx, shardings)


def _host(x):
    return np.asarray(unwrapped(x))


@pytest.fixture
def mesh(devices):
    return make_mesh({"data": 2, "fsdp": 4}, devices=devices)


def test_adding_a_transform_moves_the_state_and_training_continues_identically(tmp_path, mesh):
    schedule = optax.linear_schedule(1e-3, 1e-4, 100)
    old_tx = optax.adamw(schedule)
    new_tx = optax.chain(optax.clip_by_global_norm(1e9), optax.adamw(schedule))
    state = _trained(mesh, old_tx)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state)
        plan = ckpt.plan(_target(mesh, new_tx))
        restored, _ = ckpt.restore(_target(mesh, new_tx))  # no `init` needed: all leaves move
    assert plan.initialized == {} and plan.unused == []
    assert plan.sources["opt_state/1/0/mu/head"] == "opt_state/0/mu/head"
    assert plan.sources["opt_state/1/0/count"] == "opt_state/0/count"
    assert plan.sources["opt_state/1/2/count"] == "opt_state/2/count"  # the schedule's counter
    old, new = flatten(state), flatten(restored)
    for target_key, saved_key in plan.sources.items():
        np.testing.assert_array_equal(_host(new[target_key]), _host(old[saved_key]))
    # A never-active clip changes nothing: one more step agrees (to float rounding: the extra
    # global-norm reduction changes XLA's fusions). A lost count or moment would differ by far
    # more (bias correction, momentum).
    _, _, old_step, batch = _setup(mesh, old_tx)
    _, _, new_step, _ = _setup(mesh, new_tx)
    want, _ = old_step(state, batch)
    got, _ = new_step(restored, batch)
    for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


def test_switching_adam_to_spam_carries_moments_and_initializes_the_rest(tmp_path, mesh):
    state = _trained(mesh, optax.adam(1e-3))
    new_tx = optim.spam(1e-3)
    target = _target(mesh, new_tx)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state)
        lacking = r"(?s)lacks.*'opt_state/1/count'.*init="
        with pytest.raises(C.StructureMismatchError, match=lacking):
            ckpt.restore(target)  # never zero-filled silently
        lm, shardings, _, _ = _setup(mesh, new_tx)
        fresh = train.init_train_state(lm, new_tx, shardings, seed=1)
        restored, _ = ckpt.restore(target, init=fresh)
        plan = ckpt.plan(target)
    new, old, init = flatten(restored), flatten(state), flatten(fresh)
    for name in ("mu", "nu"):
        for param in ("head", "blocks/0/attn/wq"):
            key = f"opt_state/0/{name}/{param}"
            assert plan.sources[key] == key and plan.how[key] == "field"
            np.testing.assert_array_equal(np.asarray(new[key]), np.asarray(old[key]))
    assert plan.sources["opt_state/0/count"] == "opt_state/0/count"  # adam's count, kept
    by_field = sum(how == "field" for how in plan.how.values())  # mu, nu per param, and count
    assert by_field == 2 * len(jax.tree.leaves(state.params)) + 1
    assert f"0 by address, {by_field} by field), " in str(plan).splitlines()[0]
    assert int(restored.opt_state[0].count) == 2
    # SPAM's schedule counter is new (adam had a constant rate), and so is its mask key, if any
    assert set(plan.initialized) == {"opt_state/1/count"} | {
        k for k in init if k.startswith(("opt_state/0/indices/", "opt_state/0/key"))
    }
    for key in plan.initialized:
        np.testing.assert_array_equal(_host(new[key]), _host(init[key]))
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding


def test_what_cannot_be_mapped_is_reported_by_path(tmp_path, mesh):
    state = _trained(mesh, optim.spam(1e-3, density=0.5), steps=1)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        plan = ckpt.plan(_target(mesh, optax.adam(1e-3)))
    # sparse SPAM moments have another shape than adam's: nothing moves, each is named
    assert "opt_state/0/mu/head" in plan.initialized
    assert "saved as float32" in plan.initialized["opt_state/0/mu/head"]
    assert "opt_state/0/key" in plan.unused and "opt_state/0/indices/head" in plan.unused
    assert plan.sources["params/head"] == "params/head"
    text = str(plan)
    assert "initialized opt_state/0/mu/head" in text and "unused      opt_state/0/key" in text


def _info(shape, dtype="float32", node=None, field=None, owner=None):
    return LeafInfo(tuple(shape), dtype, node, field, owner)


def test_pairing_passes_and_their_order():
    saved = {
        "opt/0/count": _info((), "int32", "AdamState", "count"),
        "opt/0/mu/w": _info((4,), node="AdamState", field="mu", owner="w"),
        "opt/2/count": _info((), "int32", "ScheduleState", "count"),
        "opt/3/mu/w": _info((4,), "bfloat16", "Other", "mu", "w"),
    }
    target = {
        "opt/1/0/count": _info((), "int32", "AdamState", "count"),
        "opt/1/0/mu/w": _info((4,), node="AdamState", field="mu", owner="w"),
        "opt/1/1/count": _info((), "int32", "ScheduleState", "count"),
        "opt/2/mu/w": _info((4,), node="SpamState", field="mu", owner="w"),
        "opt/3/count": _info((), "int32", "SpamState", "count"),
    }
    plan = plan_restore(saved, target)
    assert plan.sources == {
        "opt/1/0/count": "opt/0/count",
        "opt/1/0/mu/w": "opt/0/mu/w",
        "opt/1/1/count": "opt/2/count",
    }
    assert set(plan.how.values()) == {"address"}
    # the bfloat16 moment has another dtype, so SpamState.mu is not filled from it
    assert set(plan.initialized) == {"opt/2/mu/w", "opt/3/count"}
    assert plan.unused == ["opt/3/mu/w"]


def test_same_path_in_another_kind_of_node_is_not_taken_by_path():
    saved = {"o/0/count": _info((), "int32", "ScheduleState", "count")}
    target = {"o/0/count": _info((), "int32", "AdamState", "count")}
    plan = plan_restore(saved, target)
    assert plan.how == {"o/0/count": "field"}  # paired, but only by the field's name


def test_address():
    nodes = {"opt_state/0": "ScaleByAdamState", "": "TrainState"}
    params = {"blocks/0/attn/wq", "head"}
    assert address("params/head", params, nodes) == ("params", None, "head")
    assert address("opt_state/0/nu/blocks/0/attn/wq", params, nodes) == (
        "ScaleByAdamState",
        "nu",
        "blocks/0/attn/wq",
    )
    assert address("opt_state/0/count", params, nodes) == ("ScaleByAdamState", "count", None)
    assert address("step", params, nodes) == ("TrainState", "step", None)


def test_plain_dict_entries_pair_only_by_path():
    saved = {"decoder/kernel": _info((4,), node=None, field="kernel")}
    target = {"encoder/kernel": _info((4,), node=None, field="kernel")}
    plan = plan_restore(saved, target)
    assert plan.sources == {} and list(plan.initialized) == ["encoder/kernel"]
