"""DiLoCo on the reference LM: bytes per fragment, checkpoints (bit-exact resume with a fragment
in flight, other device counts) and elastic resume with another number of replicas."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxlib_ext import costs
from jaxlib_ext.checkpoint import Checkpointer
from jaxlib_ext.diloco_train import DilocoSetup
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.diloco import DilocoConfig, outer_optimizer
from parallel.mesh import make_mesh

CFG = LMConfig(d_model=32, num_layers=4, num_heads=2, d_ff=64, max_len=16)


def _setup(replicas=2, devices=None, scanned=False, **overrides) -> DilocoSetup:
    devices = devices or jax.devices()
    mesh = make_mesh({"replica": replicas, "fsdp": -1}, devices=devices)
    lm = LanguageModel(CFG if not scanned else LMConfig(**{**vars(CFG), "scan_layers": True}))
    kwargs = dict(sync_every=4, fragments=2, overlap=1, alpha=0.5, exchange_dtype="e3m0")
    config = DilocoConfig(replicas=replicas, **{**kwargs, **overrides})
    return DilocoSetup.create(lm, optax.adamw(3e-3), outer_optimizer(0.4), config, mesh)


def _tokens(steps, rows=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (steps, rows, 17)).astype(np.int32)


def _train(setup, state, tokens):
    step, losses = setup.step(), []
    for batch in tokens:
        state, metrics = step(state, setup.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    return state, losses


def _values(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
def test_bytes_per_fragment_match_the_compiled_step(devices, scanned):
    """Each sync branch of the compiled LM step moves exactly ``sync_wire_bytes`` across the
    replicas (e3m0 on a 2 x 4 mesh); streaming's peak is about 1/P of DiLoCo's, its average the
    same, and 4-bit is 1/8 of fp32 plus the scales."""
    found = {}
    variants = {
        "streaming": {},
        "diloco": dict(fragments=1, overlap=0, alpha=0.0),
        "fp32": dict(exchange_dtype="fp32"),
    }
    for name, overrides in variants.items():
        if scanned and name != "streaming":
            continue  # the scanned layout: its fragments' branches only (compile time)
        setup = _setup(scanned=scanned, **overrides)
        state = setup.init(seed=0)
        report = costs.analyze(setup.step(), state, setup.shard_batch(_tokens(1)[0]))
        branches = {}
        for op in report.collectives:
            if op.branch and op.group_size == 2:
                branches[op.branch] = branches.get(op.branch, 0.0) + op.total_wire_bytes
        assert sorted(branches.values()) == sorted(setup.sync_wire_bytes()), name
        found[name] = setup.sync_wire_bytes()
    if scanned:
        assert found["streaming"] == _setup().sync_wire_bytes()  # same fragments as unrolled
        return
    model_elements = sum(x.size for x in jax.tree.leaves(_setup().model.abstract_params))
    local = model_elements // 4  # every parameter is split over fsdp = 4
    assert sum(_setup().fragment_local_sizes()) == local
    padded = lambda n: -(-n // 512) * 512  # a multiple of M x the 256-element block
    e3m0 = lambda n: 2 * (1 / 2) * (padded(n) / 2 + 4 * padded(n) / 256)  # a2a + all-gather
    assert local == 12488 and padded(local) == 12800
    assert found["diloco"] == [e3m0(local)] == [6600.0]
    sizes = _setup().fragment_local_sizes()
    assert found["streaming"] == [e3m0(n) for n in sizes]
    assert max(found["streaming"]) < 0.6 * found["diloco"][0]  # P = 2: about half at peak
    assert found["fp32"] == [2 * (1 / 2) * 4 * n for n in sizes]  # the all-reduce
    assert sum(found["fp32"]) == 4 * local
    # 4-bit = 1/8 of fp32 plus the scales (1/256 of fp32), up to the padding of each fragment
    ratio = sum(found["streaming"]) / sum(found["fp32"])
    assert ratio == pytest.approx(sum(map(padded, sizes)) / local * (1 / 8 + 1 / 256), 1e-12)


def test_resume_with_a_fragment_in_flight_is_bit_exact(devices, tmp_path):
    setup = _setup()
    tokens = _tokens(9)
    straight, losses = _train(setup, setup.init(seed=0), tokens)
    state, _ = _train(setup, setup.init(seed=0), tokens[:4])  # step 4 sent fragment 0
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, state, extra={"note": "in flight"})
        restored, extra = setup.restore(ckpt)
    assert extra == {"note": "in flight"}
    for want, got in zip(_values(state), _values(restored), strict=True):
        np.testing.assert_array_equal(got, want)
    resumed, resumed_losses = _train(setup, restored, tokens[4:])
    assert resumed_losses == losses[4:]
    for want, got in zip(_values(straight), _values(resumed), strict=True):
        np.testing.assert_array_equal(got, want)


def test_resume_on_another_device_count(devices, tmp_path):
    # fp32 exchange: e3m0's rounding would turn the other mesh's round-off into code flips
    setup = _setup(exchange_dtype="fp32")
    tokens = _tokens(8)
    state, _ = _train(setup, setup.init(seed=0), tokens[:5])
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(5, state)
        small = _setup(devices=jax.devices()[:4], exchange_dtype="fp32")  # replica 2 x fsdp 2
        restored, _ = small.restore(ckpt)
    for want, got in zip(_values(state), _values(restored), strict=True):
        np.testing.assert_array_equal(got, want)
    _, losses = _train(setup, state, tokens[5:])
    _, moved = _train(small, restored, tokens[5:])
    np.testing.assert_allclose(moved, losses, rtol=1e-5)


@pytest.mark.parametrize(("replicas", "count"), [(4, 8), (1, 2)])
def test_elastic_resume_with_another_number_of_replicas(devices, tmp_path, replicas, count):
    """M = 2 -> M' replicas: every replica restarts from the global copy with the mean inner
    state; the global copy, the outer states and the fragment in flight are kept."""
    setup = _setup()
    state, _ = _train(setup, setup.init(seed=0), _tokens(5))  # step 4 sent, 5 applied
    state, _ = _train(setup, state, _tokens(1, seed=1))  # step 6: nothing in flight
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(6, state)
        other = _setup(replicas=replicas, devices=jax.devices()[:count])
        restored, _ = other.restore(ckpt)
    assert int(restored.step) == 6
    for name in ("global_params", "outer_opt_state", "pending"):
        for want, got in zip(
            _values(getattr(state, name)), _values(getattr(restored, name)), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    for glob, local in zip(_values(state.global_params), _values(restored.params), strict=True):
        assert local.shape[0] == replicas
        for r in range(replicas):
            np.testing.assert_array_equal(local[r], glob)
    for saved, got in zip(_values(state.opt_state), _values(restored.opt_state), strict=True):
        want = saved.mean(axis=0).astype(saved.dtype) if saved.dtype.kind == "f" else saved[0]
        for r in range(replicas):
            np.testing.assert_array_equal(got[r], want)
    tokens = _tokens(6, rows=4 * replicas, seed=2)
    _, losses = _train(other, restored, tokens)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
