"""(Streaming) DiLoCo on 8 simulated devices: float64 reference, degenerate cases, bytes on the
compiled step, non-finite skips, one compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import optim
from jaxlib_ext import costs
from parallel import diloco
from parallel.exchange import exchange_wire_bytes
from parallel.fragments import make_fragments
from parallel.mesh import make_mesh
from tests.parallel import diloco_reference

LAYERS = 4


def toy_params(scanned: bool, dtype=jnp.float32, seed: int = 0) -> dict:
    """A model-shaped pytree: embed, a stack of LAYERS blocks, final norm and head."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    if scanned:
        blocks = {"w": normal(LAYERS, 8, 4), "b": normal(LAYERS, 8)}
    else:
        blocks = {i: {"w": normal(8, 4), "b": normal(8)} for i in range(LAYERS)}
    return {
        "embed": normal(8, 4),
        "blocks": blocks,
        "final_norm": {"scale": normal(8)},
        "head": normal(4, 8),
    }


def toy_shardings(params, mesh):
    """The first dimension of size 8 over ``fsdp``, the rest replicated."""

    def one(x):
        spec = [None] * x.ndim
        spec[list(x.shape).index(8)] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(one, params)


def quadratic_loss(params, batch):
    """0.5 * sum((s * leaf - t)**2) over every leaf, for batch = (s, t)."""
    s, t = batch[0], batch[1]
    total = sum(0.5 * jnp.sum(jnp.square(s * x - t)) for x in jax.tree.leaves(params))
    return total, {}


def reference_fragments(params, num_fragments, scanned):
    """The fragment of every element, written independently of parallel.fragments (strided)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(k, "key", None) for k in path]
        shape = leaf.shape
        if names[0] == "blocks" and scanned:
            rows = np.arange(shape[0]) % num_fragments
            out.append(np.broadcast_to(rows.reshape(-1, *[1] * (len(shape) - 1)), shape))
        elif names[0] == "blocks":
            out.append(np.full(shape, names[1] % num_fragments))
        elif names[0] in ("final_norm", "head"):
            out.append(np.full(shape, (LAYERS - 1) % num_fragments))
        else:
            out.append(np.full(shape, 0))
    return out


def build(params, config, inner, outer, mesh, loss_fn=quadratic_loss):
    frags = make_fragments(params, config.fragments)
    param_sh = toy_shardings(params, mesh)
    sh = diloco.diloco_state_shardings(params, param_sh, inner, outer, config, frags, mesh)
    state = jax.jit(
        lambda p: diloco.init_diloco_state(p, inner, outer, config, frags), out_shardings=sh
    )(params)
    batch_sh = NamedSharding(mesh, PartitionSpec(config.replica_axis))
    step = diloco.make_diloco_step(loss_fn, inner, outer, config, frags, sh, batch_sh)
    return state, step, batch_sh


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh({"replica": 2, "fsdp": 4})


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize(
    ("sync_every", "fragments", "overlap", "alpha"),
    [(4, 1, 0, 0.0), (4, 2, 0, 0.0), (4, 2, 1, 0.5), (8, 4, 1, 0.3)],
)
def test_matches_numpy_float64_reference(mesh, scanned, sync_every, fragments, overlap, alpha):
    """float64 under jax_enable_x64, tolerance 1e-12: inner Adam, outer Nesterov SGD, the
    fragments in turn, overlap and merge, over 19 steps (2 to 4 rounds of H)."""
    with jax.enable_x64(True):
        params = toy_params(scanned, jnp.float64)
        config = diloco.DilocoConfig(
            replicas=2, sync_every=sync_every, fragments=fragments, overlap=overlap, alpha=alpha
        )
        inner, outer = optax.adam(0.05), diloco.outer_optimizer(0.7, 0.9)
        state, step, batch_sh = build(params, config, inner, outer, mesh)
        rng = np.random.default_rng(1)
        batches = rng.normal(size=(19, 2, 2))
        for b in batches:
            state, _ = step(state, jax.device_put(jnp.asarray(b), batch_sh))
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
        local, glob, trace = diloco_reference.streaming_diloco(
            leaves,
            reference_fragments(params, fragments, scanned),
            batches,
            sync_every=sync_every,
            fragments=fragments,
            overlap=overlap,
            alpha=alpha,
            inner_lr=0.05,
            outer_lr=0.7,
            outer_momentum=0.9,
        )
        got_global = jax.tree.leaves(state.global_params)
        for want, got in zip(glob, got_global, strict=True):
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        for r in range(2):
            got_local = [np.asarray(x[r]) for x in jax.tree.leaves(state.params)]
            for want, got in zip(local[r], got_local, strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        frags = make_fragments(params, fragments)
        for f, outer_state in zip(frags, state.outer_opt_state, strict=True):
            traces = jax.tree.leaves(outer_state)
            for piece, got in zip(f.pieces, traces, strict=True):
                want = piece.take(trace[piece.leaf])
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_config_validation_names_the_argument():
    bad = [
        ({"sync_every": 10, "fragments": 3}, "`sync_every` must be divisible by `fragments`"),
        ({"sync_every": 8, "fragments": 2, "overlap": 4}, r"`overlap` must be .* got overlap=4"),
        ({"overlap": -1}, "overlap=-1"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\], got alpha=1.5"),
        ({"replicas": 0}, "`replicas` must be an int >= 1, got replicas=0"),
        ({"exchange_dtype": "fp8"}, "exchange_dtype='fp8'"),
        ({"sync": "allreduce"}, "sync='allreduce'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            diloco.DilocoConfig(**kwargs)


def _run(state, step, batch_sh, batches):
    losses = []
    for b in batches:
        state, metrics = step(state, jax.device_put(jnp.asarray(b, jnp.float32), batch_sh))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_one_replica_with_unit_outer_sgd_is_plain_training(devices):
    """M = 1, outer lr 1, momentum 0: the syncs change nothing; equal to optax alone (f32)."""
    mesh = make_mesh({"replica": 1, "fsdp": 8})
    params = toy_params(False)
    config = diloco.DilocoConfig(replicas=1, sync_every=4, fragments=2)
    inner = optax.adamw(0.05)
    state, step, batch_sh = build(params, config, inner, diloco.outer_optimizer(1.0, 0.0), mesh)
    batches = np.random.default_rng(2).normal(size=(10, 1, 2))
    state, _ = _run(state, step, batch_sh, batches)
    plain, opt = params, inner.init(params)
    for b in batches:
        batch = jnp.asarray(b[0], jnp.float32)
        grads = jax.grad(lambda p, batch=batch: quadratic_loss(p, batch)[0])(plain)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes floats and int counters
            updates, opt = inner.update(grads, opt, plain)
        plain = optax.apply_updates(plain, updates)
    for want, got in zip(jax.tree.leaves(plain), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(got[0], want, rtol=2e-6, atol=2e-6)
    # step 10 synchronized fragment 0: its global copy is the replica's; fragment 1's is older
    synced = make_fragments(params, 2)[0]
    for want, glob in zip(
        synced.take(jax.tree.leaves(plain)),
        synced.take(jax.tree.leaves(state.global_params)),
        strict=True,
    ):
        np.testing.assert_allclose(glob, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("exchange_dtype", ["fp32", "bf16"])
def test_inner_sgd_every_step_with_unit_outer_sgd_is_data_parallel_sgd(mesh, exchange_dtype):
    """Inner SGD, H = 1, outer lr 1, momentum 0 = SGD on the mean of the replicas' gradients
    (= sync="ddp"); fp32 to round-off, a bf16 exchange to bf16 precision."""
    params = toy_params(True)
    inner = optax.sgd(0.01)
    unit = diloco.outer_optimizer(1.0, 0.0)
    batches = np.random.default_rng(3).normal(size=(6, 2, 2))
    cfg = diloco.DilocoConfig(replicas=2, sync_every=1, exchange_dtype=exchange_dtype)
    state, _ = _run(*build(params, cfg, inner, unit, mesh), batches)
    ddp_cfg = diloco.DilocoConfig(replicas=2, sync="ddp", exchange_dtype=exchange_dtype)
    ddp, _ = _run(*build(params, ddp_cfg, inner, None, mesh), batches)
    plain = params
    for b in batches:
        grads = [
            jax.grad(lambda p, x=x: quadratic_loss(p, x)[0])(plain)
            for x in jnp.asarray(b, jnp.float32)
        ]
        mean = jax.tree.map(lambda a, c: (a + c) / 2, *grads)
        plain = jax.tree.map(lambda p, g: p - 0.01 * g, plain, mean)
    tol = 1e-5 if exchange_dtype == "fp32" else 2e-3
    for want, got, dp in zip(
        jax.tree.leaves(plain),
        jax.tree.leaves(state.params),
        jax.tree.leaves(ddp.params),
        strict=True,
    ):
        np.testing.assert_allclose(got[0], want, rtol=tol, atol=tol)
        np.testing.assert_allclose(got[1], want, rtol=tol, atol=tol)
        np.testing.assert_allclose(dp[0], want, rtol=tol, atol=tol)
        np.testing.assert_array_equal(dp[0], dp[1])


def test_replicas_start_identical_and_the_outer_step_moves_toward_their_mean(mesh):
    params = toy_params(False)
    config = diloco.DilocoConfig(replicas=2, sync_every=3)
    inner = optax.sgd(0.05)
    state, step, batch_sh = build(params, config, inner, diloco.outer_optimizer(0.5, 0.0), mesh)
    for x in jax.tree.leaves(state.params):
        np.testing.assert_array_equal(x[0], x[1])
    batches = np.random.default_rng(4).normal(size=(3, 2, 2))
    before, _ = _run(state, step, batch_sh, batches[:2])
    # the third step's inner update, then the sync: redo the inner part by hand
    b = batches[2]
    locals_ = []
    for r in range(2):
        mine = jax.tree.map(lambda y, r=r: y[r], before.params)
        batch_r = jnp.asarray(b[r], jnp.float32)
        grads = jax.grad(lambda p, batch_r=batch_r: quadratic_loss(p, batch_r)[0])(mine)
        locals_.append(jax.tree.map(lambda x, g: x - 0.05 * g, mine, grads))
    start = jax.tree.map(np.asarray, before.global_params)
    after, metrics = step(before, jax.device_put(jnp.asarray(b, jnp.float32), batch_sh))
    assert int(metrics["synced_fragment"]) == 0
    for g0, g1, l0, l1 in zip(
        jax.tree.leaves(start),
        jax.tree.leaves(after.global_params),
        *(jax.tree.leaves(x) for x in locals_),
        strict=True,
    ):
        target = (np.asarray(l0) + np.asarray(l1)) / 2
        np.testing.assert_allclose(g1, g0 + 0.5 * (target - g0), rtol=1e-5, atol=1e-5)
    for x in jax.tree.leaves(after.params):
        np.testing.assert_array_equal(x[0], x[1])  # alpha = 0: both restart from the global copy


def test_non_finite_outer_gradient_skips_the_sync_and_resets_the_replicas(mesh):
    params = toy_params(False)
    config = diloco.DilocoConfig(replicas=2, sync_every=2, exchange_dtype="e3m0")
    state, step, batch_sh = build(params, config, optax.sgd(0.01), diloco.outer_optimizer(), mesh)
    batches = np.random.default_rng(5).normal(size=(4, 2, 2))
    state, _ = _run(state, step, batch_sh, batches[:2])  # one good sync
    good_global = jax.tree.map(np.asarray, state.global_params)
    good_outer = jax.tree.map(np.asarray, state.outer_opt_state)
    poisoned = dict(state.params)
    poisoned["embed"] = state.params["embed"].at[1, 0, 0].set(jnp.nan)
    state = state.replace(params=poisoned)
    state, _ = _run(state, step, batch_sh, batches[2:])
    assert int(state.skipped_syncs) == 1
    for want, got in zip(
        jax.tree.leaves(good_global), jax.tree.leaves(state.global_params), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    for want, got in zip(
        jax.tree.leaves(good_outer), jax.tree.leaves(state.outer_opt_state), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    for g, x in zip(
        jax.tree.leaves(state.global_params), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_array_equal(x[0], g)  # every replica back on the global copy
        np.testing.assert_array_equal(x[1], g)


def test_one_compilation_for_every_step_and_fragment(mesh):
    params = toy_params(True)
    config = diloco.DilocoConfig(replicas=2, sync_every=4, fragments=2, overlap=1, alpha=0.5)
    state, step, batch_sh = build(params, config, optax.adam(0.01), diloco.outer_optimizer(), mesh)
    seen = []
    for b in np.random.default_rng(6).normal(size=(9, 2, 2)):
        state, metrics = step(state, jax.device_put(jnp.asarray(b, jnp.float32), batch_sh))
        seen.append((int(metrics["synced_fragment"]), int(metrics["applied_fragment"])))
    assert seen == [
        (-1, -1), (0, -1), (-1, 0), (1, -1), (-1, 1), (0, -1), (-1, 0), (1, -1), (-1, 1)
    ]  # fmt: skip
    assert step._cache_size() == 1


def _replica_bytes(report: costs.CostReport, replicas: int) -> tuple[dict, float]:
    """Cross-replica wire bytes per sync branch, and outside any branch (group size M only:
    the tests' meshes have no other axis of that size)."""
    per_branch: dict = {}
    outside = 0.0
    for op in report.collectives:
        if op.group_size != replicas:
            continue
        if op.branch:
            per_branch[op.branch] = per_branch.get(op.branch, 0.0) + op.total_wire_bytes
        else:
            outside += op.total_wire_bytes
    return per_branch, outside


@pytest.mark.parametrize("exchange_dtype", ["fp32", "bf16", "int8", "e3m0"])
def test_only_the_quantized_fragment_crosses_the_replica_axis(mesh, exchange_dtype):
    """On the compiled step: each sync branch moves exactly its fragment in the exchange dtype
    (formula of parallel.exchange), peak = one fragment, average = all fragments / H."""
    params = toy_params(False)
    config = diloco.DilocoConfig(
        replicas=2, sync_every=4, fragments=2, exchange_dtype=exchange_dtype, block_size=16
    )
    state, step, batch_sh = build(params, config, optax.adam(0.01), diloco.outer_optimizer(), mesh)
    batch = jax.device_put(jnp.ones((2, 2), jnp.float32), batch_sh)
    per_branch, outside = _replica_bytes(costs.analyze(step, state, batch), 2)
    frags = make_fragments(params, 2)
    # fragment 0: embed [8,4] + blocks 0 and 2 (w [8,4], b [8]) -> 32+32+8+32+8 = 112 elements,
    # 28 on each of the 4 fsdp devices; fragment 1: blocks 1, 3, final norm [8], head [4, 8]:
    # 32+8+32+8+8+32 = 120, 30 per device.
    assert [f.size(jax.tree.leaves(params)) for f in frags] == [112, 120]
    expected = {
        "fp32": [28 * 4.0, 30 * 4.0],  # all-reduce: 2 (M-1)/M * 4 n
        "bf16": [28 * 2.0, 30 * 2.0],  # a2a + ag of 2 bytes per element: 2 * 1/2 * 2n
        "int8": [32 + 8.0, 32 + 8.0],  # padded to M * 16 = 32: 32 bytes + 2 scales of 4 bytes
        "e3m0": [16 + 8.0, 16 + 8.0],  # 32 elements -> 16 bytes + 2 scales
    }[exchange_dtype]
    formula = [exchange_wire_bytes(n, exchange_dtype, 2, 16) for n in (28, 30)]
    assert formula == expected
    assert sorted(per_branch.values()) == sorted(expected)
    assert outside <= 16, "outside the sync branches only the replicas' losses (metrics)"
    peak, average = max(expected), sum(expected) / config.sync_every
    assert peak == max(per_branch.values()) and average == sum(per_branch.values()) / 4


@pytest.mark.parametrize(("overlap", "alpha"), [(0, 0.0), (1, 0.5)])
def test_async_driver_computes_the_one_program_step(mesh, overlap, alpha):
    from parallel.diloco_async import AsyncStreamingDiloco

    params = toy_params(True)
    config = diloco.DilocoConfig(
        replicas=2, sync_every=4, fragments=2, overlap=overlap, alpha=alpha, exchange_dtype="e3m0"
    )
    inner, outer = optax.adam(0.01), diloco.outer_optimizer()
    state, step, batch_sh = build(params, config, inner, outer, mesh)
    frags = make_fragments(params, 2)
    sh = diloco.diloco_state_shardings(
        params, toy_shardings(params, mesh), inner, outer, config, frags, mesh
    )
    driver = AsyncStreamingDiloco(quadratic_loss, inner, outer, config, frags, sh, batch_sh)
    other = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=sh)(state)
    for b in np.random.default_rng(7).normal(size=(11, 2, 2)):
        batch = jax.device_put(jnp.asarray(b, jnp.float32), batch_sh)
        state, m1 = step(state, batch)
        other, m2 = driver.step(other, batch)
        assert int(m1["synced_fragment"]) == m2["synced_fragment"]
        assert int(m1["applied_fragment"]) == m2["applied_fragment"]
    for name in ("params", "opt_state", "global_params", "outer_opt_state"):
        for want, got in zip(
            jax.tree.leaves(getattr(state, name)),
            jax.tree.leaves(getattr(other, name)),
            strict=True,
        ):
            if overlap:  # the same programs' arithmetic: bit for bit
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
            else:  # the one-program step fuses the exchange with the apply: round-off
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda: optim.spam(0.01, density=0.5, reset_interval=3, warmup_steps=1, no_clip_steps=1),
        lambda: optim.diffgrad(0.01),
        lambda: optim.adam_coordinate_clipped(0.01, fraction=0.1),
    ],
    ids=["spam-sparse", "diffgrad", "adam_coordinate_clipped"],
)
def test_inner_optimizers_of_this_library(mesh, make_inner):
    """Any optax inner optimizer: this library's too (PRNG keys and sparse indices in the state
    are replicated per replica like everything else); one compilation, shardings kept."""
    params = toy_params(False)
    config = diloco.DilocoConfig(replicas=2, sync_every=4, fragments=2, exchange_dtype="int8")
    inner = make_inner()
    traces = []  # jit's cache size counts typed PRNG keys twice; count the traces instead
    counting = lambda p, b: traces.append(1) or quadratic_loss(p, b)
    state, step, batch_sh = build(params, config, inner, diloco.outer_optimizer(), mesh, counting)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    batches = np.random.default_rng(8).normal(size=(9, 2, 2))
    state, _ = _run(state, step, batch_sh, batches[:1])
    traced = len(traces)
    state, losses = _run(state, step, batch_sh, batches[1:])
    assert np.all(np.isfinite(losses)) and len(traces) == traced
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    for x in jax.tree.leaves(state.global_params):
        assert np.all(np.isfinite(np.asarray(x)))
