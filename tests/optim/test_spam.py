"""SPAM against an independent float64 NumPy reference: resets, warmups, no-clip windows, 100x
spikes, exact weight decay, sparse momentum; plus its composable pieces and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from optim.moments import ema
from optim.spam import clip_spike_from_updated, clipped_square
from tests.optim import battery, precision, reference

SHAPES = {"w": (6, 5), "b": (5,)}
HP = dict(
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    spike_threshold=5000.0,
    reset_interval=40,
    warmup_steps=10,
    no_clip_steps=5,
)
SPIKES = (30, 47, 83, 100)  # 83 falls in the no-clip window after the reset at 80


def _grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(1, steps + 1):
        g = {k: rng.standard_normal(shape) for k, shape in SHAPES.items()}
        if s in SPIKES:
            g = {k: 100.0 * v for k, v in g.items()}
        out.append(g)
    return out


def _ref(**overrides):
    hp = {**HP, **overrides}
    return reference.Spam(
        SHAPES,
        lr=hp.get("lr", 1e-2),
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        wd=hp.get("wd", 0.0),
        theta=hp["spike_threshold"],
        interval=hp["reset_interval"],
        warmup=hp["warmup_steps"],
        no_clip=hp["no_clip_steps"],
    )


def _to32(tree):
    return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def test_warmup_factor_matches_the_spec():
    counts = jnp.arange(1, 200)
    got = np.asarray(optim.spam_warmup_factor(counts, 50, 10))
    want = [reference.spam_warmup(int(s), 50, 10) for s in counts]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[49] == pytest.approx(0.01)  # the reset step itself
    assert got[48] == 1.0 and got[59] == 1.0  # before the first reset; after N steps


@precision.DTYPES
def test_direction_matches_reference_over_resets_and_spikes(dtype):
    steps = 130
    tol = precision.tolerance(dtype, rtol=2e-4, atol=1e-5)
    with precision.precision(dtype) as jdtype:
        tx = optim.scale_by_spam(**HP)
        params = precision.cast({k: np.zeros(s) for k, s in SHAPES.items()}, jdtype)
        state = tx.init(params)
        update = jax.jit(tx.update)
        ref = _ref(lr=1.0)
        ref_params = {k: np.zeros(s) for k, s in SHAPES.items()}
        for s, g in enumerate(_grads(steps), start=1):
            out, state = update(precision.cast(g, jdtype), state, params)
            _, want = ref.step(ref_params, g)
            for k in SHAPES:
                assert out[k].dtype == jdtype
                np.testing.assert_allclose(out[k], want[k], **tol, err_msg=f"step {s}, leaf {k}")
        assert int(state.count) == steps


@precision.DTYPES
def test_spam_with_schedule_and_exact_weight_decay_tracks_reference(dtype):
    with precision.precision(dtype) as jdtype:
        _schedule_and_weight_decay(dtype, jdtype)


def _schedule_and_weight_decay(dtype, jdtype):
    schedule = optax.linear_schedule(1e-2, 1e-3, 130)
    lr_at = jax.jit(schedule)
    tx = optim.spam(schedule, weight_decay=0.1, **HP)
    rng = np.random.default_rng(1)
    p64 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    params = precision.cast(p64, jdtype)
    state = tx.init(params)
    ref = _ref(lr=1.0, wd=0.1)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for s, g in enumerate(_grads(130, seed=2), start=1):
        # the schedule's own float32 value, computed as in the jitted step (eager op-by-op
        # float32 may differ in the last bit, 6e-8, which float64 would see)
        ref.hp["lr"] = float(lr_at(jnp.asarray(s - 1, jnp.int32)))
        params, state = step(params, state, precision.cast(g, jdtype))
        p64, _ = ref.step(p64, g)
        for k in SHAPES:
            np.testing.assert_allclose(
                params[k],
                p64[k],
                **precision.tolerance(dtype, rtol=1e-4, atol=1e-5),
                err_msg=f"step {s}, leaf {k}",
            )


def test_decay_after_update_is_not_the_first_order_approximation():
    # one step from p=1 with d=1: exact p'' = (1 - lr)(1 - lr*wd); approx = 1 - lr - lr*wd
    lr, wd = 0.5, 0.5
    tx = optim.scale_and_decay_after_update(lr, wd)
    p = {"w": jnp.ones(2)}
    upd, _ = tx.update({"w": jnp.ones(2)}, tx.init(p), p)
    np.testing.assert_allclose(p["w"] + upd["w"], (1 - lr) * (1 - lr * wd), rtol=1e-6)


@precision.DTYPES
def test_sparse_momentum_matches_reference_with_injected_masks(dtype):
    with precision.precision(dtype) as jdtype:
        _sparse_momentum(dtype, jdtype)


def _sparse_momentum(dtype, jdtype):
    tx = optim.scale_by_spam(**HP, density=0.5, seed=3)
    params = precision.cast({k: np.zeros(s) for k, s in SHAPES.items()}, jdtype)
    state = tx.init(params)
    assert state.indices["w"].shape == (15,) and isinstance(state.indices["b"], optax.MaskedNode)
    assert state.mu["w"].shape == (15,) and state.mu["b"].shape == (5,)
    update = jax.jit(tx.update)
    ref = _ref(lr=1.0)
    ref_params = {k: np.zeros(s) for k, s in SHAPES.items()}
    current = np.asarray(state.indices["w"])
    ref.set_sparse("w", current)
    seen = [current]
    for s, g in enumerate(_grads(130, seed=4), start=1):
        out, state = update(precision.cast(g, jdtype), state, params)
        _, want = ref.step(ref_params, g, indices={"w": current})
        for k in SHAPES:
            np.testing.assert_allclose(
                out[k],
                want[k],
                **precision.tolerance(dtype, rtol=2e-4, atol=1e-5),
                err_msg=f"step {s}, leaf {k}",
            )
        off = np.setdiff1d(np.arange(30), current)
        assert np.all(np.asarray(out["w"]).reshape(-1)[off] == 0), "no update off the mask"
        new = np.asarray(state.indices["w"])
        if (s + 1) % HP["reset_interval"] == 0:
            assert not np.array_equal(new, current), f"masks are redrawn after step {s}"
            current = new
            ref.set_sparse("w", current)
            seen.append(current)
        else:
            assert np.array_equal(new, current), f"masks are kept at step {s}"
    for idx in seen:
        assert len(np.unique(idx)) == 15 and np.all(np.diff(idx) > 0)


def test_spam_clips_a_spike_that_adam_lets_through():
    theta = 5000.0
    g = {"w": jnp.ones((4, 4))}
    spam = optim.scale_by_spam(spike_threshold=theta, reset_interval=1000, no_clip_steps=5)
    adam = optax.scale_by_adam(eps=1e-6)
    s_state, a_state = spam.init(g), adam.init(g)
    for _ in range(50):
        _, s_state = spam.update(g, s_state)
        with jax.numpy_dtype_promotion("standard"):
            _, a_state = adam.update(g, a_state)
    spike = {"w": jnp.full((4, 4), 1000.0)}
    _, s_state = spam.update(spike, s_state)
    with jax.numpy_dtype_promotion("standard"):
        _, a_state = adam.update(spike, a_state)
    m_before, v_before = 1 - 0.9**50, 1 - 0.999**50  # EMAs of a constant 1 after 50 steps
    bound = 0.9 * m_before + 0.1 * np.sqrt(theta * v_before)  # spike clipped to sqrt(theta v)
    np.testing.assert_allclose(s_state.mu["w"], bound, rtol=1e-3)
    assert float(a_state.mu["w"][0, 0]) > 100.0  # Adam's momentum absorbed the spike


@precision.DTYPES
def test_clip_bound_read_back_from_the_updated_moment(dtype):
    """SPAM clips m's gradient against theta * v_prev read back from the updated v: the same
    coordinates clipped to the same values as clipping against the previous v (float64 at
    1e-12), spikes, coordinates exactly at the bound, v = 0 and clipping off included."""
    theta, b2 = 5000.0, 0.999
    rng = np.random.default_rng(3)
    v = rng.random(400) * rng.choice([0.0, 1e-6, 1.0, 1e4], 400)
    g = rng.standard_normal(400) * rng.choice([1.0, 100.0, 1e4], 400)
    g[:20] = np.sqrt(theta * v[:20])  # exactly at the bound: not a spike (g**2 > theta v is strict)
    clipped = np.where(g**2 > theta * v, np.sign(g) * np.sqrt(theta * v), g)  # against v_prev
    assert 0 < (clipped != g).sum() < 400
    with precision.precision(dtype) as jdtype:
        gj, vj = jnp.asarray(g, jdtype), jnp.asarray(v, jdtype)
        for active in (True, False):
            flag = jnp.asarray(active)
            v_new = ema(vj, clipped_square(gj, vj, theta, flag), b2)
            got = clip_spike_from_updated(gj, v_new, theta, b2, flag)
            want = clipped if active else g
            np.testing.assert_allclose(got, want, **precision.tolerance(dtype, 2e-6, 1e-30))


@pytest.mark.parametrize("factory", [optim.scale_by_spam, optim.clip_spikes])
def test_bfloat16_gradient_squares_reach_float32_second_moment_unrounded(factory):
    """With bfloat16 gradients and float32 state, g**2 enters the EMA in float32: (1 + 2^-7)**2
    rounded to bfloat16 first would be 1.015625, 6e-5 off."""
    g = jnp.full((3,), 1 + 2**-7, jnp.bfloat16)
    tx = factory(state_dtype=jnp.float32)
    state = tx.init(jnp.zeros(3, jnp.bfloat16))
    _, state = tx.update(g, state)
    nu = state.nu
    want = np.float32(1 - np.float32(0.999)) * np.float32(1 + 2**-7) ** 2
    np.testing.assert_allclose(np.asarray(nu), np.full(3, want), rtol=1e-6)


def test_reset_keeps_the_bias_correction_count():
    tx = optim.scale_by_spam(reset_interval=3, no_clip_steps=1, warmup_steps=0)
    g = {"w": jnp.ones(2)}
    state = tx.init(g)
    for _ in range(3):
        out, state = tx.update(g, state)
    assert int(state.count) == 3
    np.testing.assert_allclose(state.mu["w"], 0.1, rtol=1e-6)  # reset at step 3, one EMA step
    np.testing.assert_allclose(state.nu["w"], 0.001, rtol=1e-4)  # 1 - 0.999 in float32
    # the bias correction uses s = 3, not the 1 a restarted count would give
    want = np.sqrt(1 - 0.999**3) / (1 - 0.9**3) * 0.1 / (np.sqrt(0.001) + 1e-6)
    np.testing.assert_allclose(out["w"], want, rtol=1e-4)


def test_composed_pieces_reproduce_scale_by_spam():
    # inner-eps Adam with eps=0 equals SPAM's outer-eps form with eps=0
    hp = dict(HP, eps=0.0)
    composed = optax.chain(
        optim.clip_spikes(hp["spike_threshold"], hp["b2"], reset_interval=40, no_clip_steps=5),
        optim.periodic_reset(optax.scale_by_adam(hp["b1"], hp["b2"], eps=0.0), 40),
        optim.scale_by_spam_warmup(40, hp["warmup_steps"]),
    )
    whole = optim.scale_by_spam(**hp)
    params = _to32({k: np.zeros(s) for k, s in SHAPES.items()})
    cs, ws = composed.init(params), whole.init(params)
    for g in _grads(130, seed=5):
        with jax.numpy_dtype_promotion("standard"):
            a, cs = composed.update(_to32(g), cs, params)
        b, ws = whole.update(_to32(g), ws, params)
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_periodic_reset_zeroes_floats_and_keeps_counters():
    tx = optim.periodic_reset(optax.sgd(0.1, momentum=0.9), reset_interval=2)
    p = {"w": jnp.ones(3)}
    state = tx.init(p)
    _, state = tx.update(p, state, p)
    assert float(state.inner_state[0].trace["w"][0]) == 1.0
    _, state = tx.update({"w": jnp.full(3, 2.0)}, state, p)  # step 2: reset, then 2.0
    np.testing.assert_allclose(state.inner_state[0].trace["w"], 2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(learning_rate=-1.0), "`learning_rate` must be in"),
        (dict(learning_rate=1e-3, b1=1.0), "`b1` must be in"),
        (dict(learning_rate=1e-3, b2=-0.1), "`b2` must be in"),
        (dict(learning_rate=1e-3, eps=-1.0), "`eps` must be in"),
        (dict(learning_rate=1e-3, weight_decay=-0.1), "`weight_decay` must be in"),
        (dict(learning_rate=1e-3, density=0.0), "`density` must be in"),
        (dict(learning_rate=1e-3, density=1.5), "`density` must be in"),
        (dict(learning_rate=1e-3, reset_interval=0), "`reset_interval` must be in"),
        (dict(learning_rate=1e-3, reset_interval=10, no_clip_steps=10), "`no_clip_steps` must"),
        (dict(learning_rate=1e-3, warmup_steps=-1), "`warmup_steps` must be in"),
        (dict(learning_rate=1e-3, spike_threshold=-1.0), "`spike_threshold` must be in"),
        (dict(learning_rate=1e-3, reset_interval=2.5), "`reset_interval` must be an integer"),
        (dict(learning_rate=float("nan")), "`learning_rate` must be in"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.spam(**kwargs)


def test_traced_density_is_a_clear_type_error():
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(lambda d: optim.scale_by_spam(density=d).init({"w": jnp.ones((2, 2))}))(0.5)


def test_non_finite_gradients_are_skipped_with_apply_if_finite():
    tx = optax.apply_if_finite(optim.spam(1e-2), max_consecutive_errors=5)
    p = {"w": jnp.ones((2, 2))}
    state = tx.init(p)
    upd, state = tx.update({"w": jnp.full((2, 2), jnp.nan)}, state, p)
    assert np.all(np.asarray(upd["w"]) == 0)
    inner = state.inner_state[0]
    assert int(inner.count) == 0 and np.all(np.isfinite(np.asarray(inner.mu["w"])))


BATTERY = [
    battery.Case(
        name="spam",
        factory=optim.spam,
        kwargs=dict(
            learning_rate=1e-2,
            reset_interval=50,
            warmup_steps=5,
            no_clip_steps=2,
            weight_decay=1e-4,
        ),
        static_args=("density", "seed"),
    ),
    battery.Case(
        name="spam-sparse",
        factory=optim.spam,
        kwargs=dict(
            learning_rate=1e-2,
            density=0.5,
            reset_interval=50,
            warmup_steps=5,
            no_clip_steps=2,
        ),
        static_args=("density", "seed"),
        quadratic_steps=1000,
        logistic_steps=1000,
    ),
    battery.Case(
        name="clip-spikes",
        factory=optim.clip_spikes,
        kwargs=dict(reset_interval=50, no_clip_steps=2),
        has_learning_rate=False,
        logistic_steps=1500,
    ),
]


@battery.parametrize(BATTERY)
def test_battery(case, check):
    check(case)
