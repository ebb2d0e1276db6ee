"""MoE strategies inside the reference LM's train step: exact against the dense reference over
20 AdamW steps and across a re-sharding, one compilation, any optimizer of this library,
checkpoints that restore under every strategy, on other device counts and canonically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlib_ext import checkpoint as C
from jaxlib_ext import moe_train as M
from jaxlib_ext.model import LanguageModel, LMConfig
from jaxlib_ext.optimizers import make_optimizer
from jaxlib_ext.train import (
    abstract_train_state,
    batch_sharding,
    init_train_state,
    lm_loss,
    make_train_step,
    shard_batch,
    train_state_shardings,
)
from parallel.mesh import make_mesh
from parallel.moe import MoeStrategy

CONFIG = LMConfig(
    d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16, num_experts=16, top_k=2
)
STEPS, RESHARD_AT = 20, 10
VARIANTS = [
    ("ep", {}),
    ("fsdp", {}),
    ("fssdp", {"slots": 8}),
    ("fssdp", {"slots": 4, "remat": True}),
]


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh({"data": 2, "fsdp": 4}, devices=devices)


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (16, 17)).astype(np.int32) for _ in range(n)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _canonical(tree, state):
    """Expert rows of every ``blocks/i/mlp/w[io]`` leaf (params or optimizer buffers) put back
    in canonical expert order from ``state.moe``'s recorded owner order."""
    perms = {
        str(i): np.argsort(np.asarray(layer["mlp"].order))
        for i, layer in state.moe["blocks"].items()
    }

    def fix(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        for i, perm in perms.items():
            if names[-4:-1] == ["blocks", i, "mlp"] and names[-1] in ("wi", "wo"):
                if x.ndim and x.shape[0] == perm.size:
                    return np.asarray(x)[perm]
        return np.asarray(x)

    return jax.tree_util.tree_map_with_path(fix, tree)


def dense_losses_and_state(mesh):
    """The dense reference model, 20 AdamW steps: losses and the final state (host arrays)."""
    model = LanguageModel(CONFIG)
    tx = optax.adamw(1e-3)
    shardings = train_state_shardings(model, tx, mesh)
    state = init_train_state(model, tx, shardings, seed=0)
    bs = batch_sharding(mesh)
    step = make_train_step(lm_loss(model), tx, shardings, bs)
    losses = []
    for batch in _batches(STEPS):
        state, metrics = step(state, shard_batch(batch, bs))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


@pytest.fixture(scope="module")
def dense_run(mesh):
    return dense_losses_and_state(mesh)


def _moe_run(mesh, kind, knobs, tx=None, steps=STEPS, reshard_at=RESHARD_AT):
    model = LanguageModel(CONFIG, moe_strategy=MoeStrategy(kind, mesh, **knobs))
    tx = tx or optax.adamw(1e-3)
    shardings = M.moe_train_state_shardings(model, tx, mesh)
    state = M.init_moe_train_state(model, tx, shardings, seed=0)
    bs = batch_sharding(mesh)
    step = M.make_moe_train_step(model, tx, shardings, bs)
    reshard = M.make_moe_reshard(model, tx, shardings) if reshard_at is not None else None
    losses, metrics = [], None
    for i, batch in enumerate(_batches(steps)):
        if i == reshard_at:
            state = reshard(state)
        state, metrics = step(state, shard_batch(batch, bs))
        losses.append(float(metrics["loss"]))
    return model, tx, shardings, state, losses, metrics


@pytest.mark.parametrize(("kind", "knobs"), VARIANTS)
def test_twenty_adamw_steps_match_the_dense_reference_across_a_resharding(
    mesh, dense_run, kind, knobs
):
    want_losses, want = dense_run
    _, _, _, state, losses, metrics = _moe_run(mesh, kind, knobs)
    # fp32, same routing, no token dropped: round-off only (relative, per step / per leaf norm)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    orders = [np.asarray(layer["mlp"].order) for layer in state.moe["blocks"].values()]
    assert any((o != np.arange(16)).any() for o in orders)  # the re-sharding moved experts
    got = jax.device_get(state)
    for name, a, b in (
        ("params", _canonical(got.params, state), want.params),
        ("opt_state", _canonical(got.opt_state, state), want.opt_state),
    ):
        errors = jax.tree.map(_rel, a, b)
        worst = max(jax.tree.leaves(errors))
        assert worst <= 1e-5, (name, errors)
    assert float(metrics["moe_load_imbalance"]) >= 1.0


def test_first_step_gradients_match_the_dense_reference(mesh):
    dense = LanguageModel(CONFIG)
    params = dense.init(0)
    batch = jnp.asarray(_batches(1)[0])
    want = jax.grad(lambda p: lm_loss(dense)(p, batch)[0])(params)
    for kind, knobs in VARIANTS:
        model = LanguageModel(CONFIG, moe_strategy=MoeStrategy(kind, mesh, **knobs))
        sharded = jax.device_put(
            params, M.moe_train_state_shardings(model, optax.sgd(1.0), mesh).params
        )
        got = jax.jit(jax.grad(lambda p, m=model: lm_loss(m)(p, batch)[0]))(sharded)
        errors = jax.tree.map(_rel, jax.device_get(got), want)
        assert max(jax.tree.leaves(errors)) <= 1e-5, (kind, errors)


def test_placement_changes_every_step_in_one_compilation(mesh):
    model = LanguageModel(CONFIG, moe_strategy=MoeStrategy("fssdp", mesh, slots=4))
    tx = optax.adamw(1e-3)
    shardings = M.moe_train_state_shardings(model, tx, mesh)
    state = M.init_moe_train_state(model, tx, shardings, seed=0)
    bs = batch_sharding(mesh)
    traces = []
    step = M.make_moe_train_step(model, tx, shardings, bs)
    step_fn = step
    copies = []
    for batch in _batches(4, seed=5):
        traces.append(step_fn._cache_size())
        state, metrics = step(state, shard_batch(batch, bs))
        copies.append(float(metrics["moe_expert_copies"]))
    assert step._cache_size() == 1
    windows = np.asarray(state.moe["blocks"][0]["mlp"].loads)
    assert (windows[-4:].sum(axis=1) == 16 * 16 * 2).all()  # 4 steps of counts in the window
    assert len(set(copies)) > 1 or len({tuple(w) for w in windows[-4:]}) > 1


@pytest.mark.parametrize("name", ["spam", "adam_coordinate_clipped", "frugal"])
def test_any_optimizer_of_the_library_runs_under_fssdp(mesh, name):
    """This library's optimizers with the most unusual state (SPAM's PRNG key and counters, the
    clipped Adam's threshold, FRUGAL's subspace pools) train under fssdp as under the dense
    reference; those whose buffers are all parameter-shaped also through a re-sharding."""
    kwargs = {"fraction": 0.5} if name == "adam_coordinate_clipped" else {}
    tx = make_optimizer(name, 1e-3, **kwargs)
    dense = LanguageModel(CONFIG)
    shardings = train_state_shardings(dense, tx, mesh)
    state = init_train_state(dense, tx, shardings, seed=0)
    bs = batch_sharding(mesh)
    step = make_train_step(lm_loss(dense), tx, shardings, bs)
    want = []
    for batch in _batches(4):
        state, metrics = step(state, shard_batch(batch, bs))
        want.append(float(metrics["loss"]))
    reshard_at = None if name == "frugal" else 2
    *_, losses, _ = _moe_run(mesh, "fssdp", {"slots": 8}, tx=tx, steps=4, reshard_at=reshard_at)
    np.testing.assert_allclose(losses, want, rtol=1e-5)


@pytest.mark.parametrize("name", ["adafactor", "frugal"])
def test_resharding_refuses_optimizer_buffers_not_shaped_like_parameters(mesh, name):
    """adafactor's factored moments ([E, d] rows / [E, f] columns of [E, d, f]) and FRUGAL's
    subspace pools and indices would be corrupted by a row permutation: refused, by name."""
    model = LanguageModel(CONFIG, moe_strategy=MoeStrategy("fssdp", mesh, slots=8))
    tx = make_optimizer(name, 1e-3)
    shardings = M.moe_train_state_shardings(model, tx, mesh)
    with pytest.raises(ValueError, match=r"optimizer state leaf '.*' \(shape .*reshard_every=0"):
        M.make_moe_reshard(model, tx, shardings)


def test_model_rejects_strategies_it_cannot_run(mesh):
    with pytest.raises(ValueError, match="num_experts"):
        LanguageModel(LMConfig(num_experts=0), moe_strategy=MoeStrategy("ep", mesh))
    scanned = LMConfig(num_experts=16, scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers"):
        LanguageModel(scanned, moe_strategy=MoeStrategy("ep", mesh))
    with pytest.raises(ValueError, match="num_experts"):
        LanguageModel(LMConfig(num_experts=12), moe_strategy=MoeStrategy("ep", mesh))
    with pytest.raises(ValueError, match="model"):
        M.make_moe_reshard(LanguageModel(CONFIG), optax.sgd(1.0), None)


def test_checkpoint_after_resharding_restores_under_every_strategy(tmp_path, mesh, devices):
    model, tx, _, state, _, _ = _moe_run(mesh, "fssdp", {"slots": 8}, steps=4, reshard_at=2)
    saved = jax.device_get(state)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, state)
        small = make_mesh({"data": 4}, devices=devices[:4])
        for kind, target_mesh in (("ep", mesh), ("fsdp", mesh), ("fssdp", small)):
            knobs = {"slots": 4} if kind == "fssdp" else {}
            target_model = LanguageModel(
                CONFIG, moe_strategy=MoeStrategy(kind, target_mesh, **knobs)
            )
            shardings = M.moe_train_state_shardings(target_model, tx, target_mesh)
            target = M.abstract_moe_train_state(target_model, tx, shardings)
            restored, _ = ckpt.restore(target)
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # into the dense reference model, canonical expert order
        dense = LanguageModel(CONFIG)
        dense_shardings = train_state_shardings(dense, tx, mesh)
        layouts = M.canonical_expert_layouts(restored.moe)
        canonical, _ = ckpt.restore(
            abstract_train_state(dense, tx, dense_shardings), layouts=layouts
        )
    want_params = _canonical(saved.params, saved)
    want_opt = _canonical(saved.opt_state, saved)
    for a, b in zip(jax.tree.leaves(canonical.params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(canonical.opt_state), jax.tree.leaves(want_opt), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    # and the dense model computes the same loss as the fssdp model from the saved state
    batch = jnp.asarray(_batches(1, seed=9)[0])
    dense_loss = lm_loss(dense)(canonical.params, batch)[0]

    def moe_loss_fn(params, moe):
        logits, aux, _ = model.apply_moe(params, batch[:, :-1], moe)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return ce + CONFIG.router_aux_weight * aux

    moe_loss = jax.jit(moe_loss_fn)(state.params, state.moe)
    np.testing.assert_allclose(float(dense_loss), float(moe_loss), rtol=1e-5)
