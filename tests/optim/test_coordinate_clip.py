"""Coordinate-wise clipping: exact global threshold (ties, c = 0, c = 1), sharded without gathering,
the authors' SGD and Adam placements against float64 references, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim
from jaxlib_ext import costs
from parallel.mesh import make_mesh
from tests.optim import battery, precision, reference


def _tree(rng, ties=False):
    tree = {
        "a": rng.standard_normal((rng.integers(1, 40), rng.integers(1, 20))),
        "b": rng.standard_normal(rng.integers(1, 60)) * rng.choice([1e-4, 1.0, 1e4]),
    }
    if ties:
        tree = {k: np.round(v) for k, v in tree.items()}
    return {k: v.astype(np.float32) for k, v in tree.items()}


@precision.DTYPES
@pytest.mark.parametrize("seed", range(6))
def test_matches_sorting_reference(seed, dtype):
    """Exact: the same coordinates clipped to the same value as a float64 sort (float64 trees
    hold values float32 cannot, so their threshold needs the 64-bit radix passes)."""
    rng = np.random.default_rng(seed)
    tree = _tree(rng, ties=seed % 3 == 0)
    if dtype == "float64":  # values 1 ulp (f64) apart, indistinguishable in float32
        tree = {
            k: v.astype(np.float64) * (1 + 1e-15 * np.arange(v.size).reshape(v.shape))
            for k, v in tree.items()
        }
    with precision.precision(dtype) as jdtype:
        for c in (0.0, 0.01, 0.1, 0.37, 0.5, 0.99, 1.0, float(rng.random())):
            for scale in (1.0, 0.5):
                got = optim.clip_top(precision.cast(tree, jdtype), c, scale)
                want = reference.clip_top(
                    {k: v.astype(np.float64) for k, v in tree.items()}, c, scale
                )
                for k in tree:
                    assert got[k].dtype == jdtype
                    np.testing.assert_array_equal(
                        got[k], want[k].astype(dtype), err_msg=f"c={c}, scale={scale}"
                    )


def _adversarial(name: str, dtype: str) -> dict[str, np.ndarray]:
    """Inputs that break selections built on arithmetic or sampling, 2 leaves of 8 x 64."""
    rng = np.random.default_rng(7)
    tiny = np.finfo(dtype).smallest_subnormal
    normal = rng.standard_normal((2, 8, 64))
    data = {
        "all_equal": np.full((2, 8, 64), -0.75),
        "zeros": np.zeros((2, 8, 64)) * np.where(rng.random((2, 8, 64)) < 0.5, -1, 1),  # +-0
        "mostly_zeros": np.where(rng.random((2, 8, 64)) < 0.97, 0.0, normal),
        "denormals": tiny * rng.integers(0, 50, (2, 8, 64)) * rng.choice([-1, 1], (2, 8, 64)),
        "denormals_and_normals": np.where(
            rng.random((2, 8, 64)) < 0.5, tiny * rng.integers(1, 9, (2, 8, 64)), normal
        ),
        "inf": np.where(rng.random((2, 8, 64)) < 0.05, np.inf, normal) * rng.choice([-1, 1]),
        "many_inf": np.where(rng.random((2, 8, 64)) < 0.5, -np.inf, normal),
        "nan": np.where(rng.random((2, 8, 64)) < 0.02, np.nan, normal),
        "ties_one_value": np.where(rng.random((2, 8, 64)) < 0.3, 2.5, normal),
        "one_ulp_apart": 1.0 + np.finfo(dtype).eps * rng.integers(0, 4, (2, 8, 64)),
    }[name]
    return {"a": data[0].astype(dtype), "b": data[1].astype(dtype)}


ADVERSARIAL = [
    "all_equal",
    "zeros",
    "mostly_zeros",
    "denormals",
    "denormals_and_normals",
    "inf",
    "many_inf",
    "nan",
    "ties_one_value",
    "one_ulp_apart",
]


@precision.DTYPES
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_threshold_is_the_sorted_value_on_adversarial_inputs(name, dtype, devices):
    """The threshold equals a sort's, bit for bit, whether the leaves are sharded or not (the
    radix select reads bit patterns, so denormals, which XLA:CPU flushes in arithmetic, infinities
    and NaNs, larger than every number, are ordered as a sort orders them)."""
    tree = _adversarial(name, dtype)
    mesh = make_mesh({"fsdp": 8}, devices=devices)
    with precision.precision(dtype) as jdtype:
        plain = precision.cast(tree, jdtype)
        sharded = {
            k: jax.device_put(v, NamedSharding(mesh, P(None, "fsdp"))) for k, v in plain.items()
        }
        fn = jax.jit(optim.top_fraction_threshold, static_argnums=1)
        for c in (0.0, 0.01, 0.1, 0.5, 0.9, 1.0):
            want = np.asarray(reference.top_fraction_threshold(tree, c), dtype)
            for label, t in (("plain", plain), ("sharded", sharded)):
                got = np.asarray(fn(t, c))
                assert got.dtype == want.dtype, (label, c)
                np.testing.assert_array_equal(
                    got.view(f"u{got.itemsize}"),
                    want.view(f"u{want.itemsize}"),
                    err_msg=f"{name}, {label}, c={c}",
                )


def test_zero_fraction_is_the_identity_and_one_zeroes_everything():
    tree = {"a": jnp.array([3.0, -1.0, 2.0])}
    assert optim.clip_top(tree, 0.0, 0.5) is tree
    np.testing.assert_array_equal(optim.clip_top(tree, 1.0)["a"], [0.0, 0.0, 0.0])
    traced = jax.jit(lambda t, c: optim.clip_top(t, c, 0.5))(tree, 0.0)  # traced c = 0 too
    np.testing.assert_array_equal(traced["a"], tree["a"])


def test_ties_at_the_threshold():
    # |x| = 5, 5, 5, 1: c = 0.25 -> rank 2 -> threshold 5: nothing moves
    tree = {"a": jnp.array([5.0, -5.0, 5.0, 1.0])}
    np.testing.assert_array_equal(optim.clip_top(tree, 0.25)["a"], tree["a"])
    assert float(optim.top_fraction_threshold(tree, 0.5)) == 5.0
    assert float(optim.top_fraction_threshold(tree, 0.75)) == 1.0


def test_bfloat16_leaves_keep_their_dtype():
    tree = {"a": jnp.array([1.0, -8.0, 3.0, 2.0], jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    out = optim.clip_top(tree, 0.2)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    np.testing.assert_array_equal(out["a"].astype(jnp.float32), [1.0, -3.0, 3.0, 2.0])


@pytest.mark.parametrize("w_spec", [P("fsdp"), P(None, "fsdp")], ids=["rows", "columns"])
def test_sharded_threshold_is_exact_and_gathers_nothing(w_spec, devices):
    """Whichever axis of a leaf is sharded, only histograms cross devices (a leaf sharded along
    its second axis was gathered when the keys were flattened)."""
    mesh = make_mesh({"fsdp": 8}, devices=devices)
    rng = np.random.default_rng(0)
    host = {
        "w": rng.standard_normal((4096, 512)).astype(np.float32),
        "v": rng.standard_normal((1024,)).astype(np.float32),
    }
    specs = {"w": w_spec, "v": P("fsdp")}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
    fn = jax.jit(lambda t: optim.clip_top(t, 0.001))
    got = fn(sharded)
    want = reference.clip_top({k: v.astype(np.float64) for k, v in host.items()}, 0.001)
    for k in host:
        np.testing.assert_array_equal(got[k], want[k].astype(np.float32))
        assert got[k].sharding.is_equivalent_to(sharded[k].sharding, got[k].ndim)
    wire = costs.analyze(fn, sharded).wire_bytes()
    grad_bytes = sum(v.nbytes for v in host.values())
    assert wire["all-gather"] == 0 and wire["all-to-all"] == 0
    # at most two 65,536-bin int32 histograms per leaf are all-reduced (ring: 2 x 7/8 of 256 KiB
    # each), whatever the gradient's size
    assert 0 < wire["all-reduce"] <= len(host) * 2 * (2 * 7 / 8 * (1 << 16) * 4)
    assert wire["all-reduce"] < grad_bytes / 2


def test_shard_map_with_axis_name_matches_global(devices):
    mesh = make_mesh({"x": 8}, devices=devices)
    rng = np.random.default_rng(1)
    host = {
        "w": rng.standard_normal((64, 16)).astype(np.float32),
        "b": rng.standard_normal((32,)).astype(np.float32),
    }

    def local(tree):
        return optim.clip_top(tree, 0.05, axis_name="x")

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    got = fn({k: jax.device_put(v, NamedSharding(mesh, P("x"))) for k, v in host.items()})
    want = reference.clip_top({k: v.astype(np.float64) for k, v in host.items()}, 0.05)
    for k in host:
        np.testing.assert_array_equal(got[k], want[k].astype(np.float32))


@precision.DTYPES
@pytest.mark.parametrize("update_fraction", [0.0, 0.1])
def test_adam_coordinate_clipped_matches_reference(update_fraction, dtype):
    with precision.precision(dtype) as jdtype:
        _adam_coordinate_clipped(update_fraction, dtype, jdtype)


def _adam_coordinate_clipped(update_fraction, dtype, jdtype):
    shapes = {"w": (8, 4), "b": (4,)}
    rng = np.random.default_rng(2)
    p64 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params = precision.cast(p64, jdtype)
    tx = optim.adam_coordinate_clipped(
        1e-2, 0.05, update_fraction=update_fraction, weight_decay=0.01
    )
    ref = reference.AdamCoordinateClipped(shapes, lr=1e-2, c=0.05, cu=update_fraction, wd=0.01)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for s in range(1, 41):
        g = {k: rng.standard_normal(v) * (20.0 if s % 7 == 0 else 1.0) for k, v in shapes.items()}
        params, state = step(params, state, precision.cast(g, jdtype))
        p64 = ref.step(p64, g)
        for k in shapes:
            np.testing.assert_allclose(
                params[k],
                p64[k],
                **precision.tolerance(dtype, rtol=1e-4, atol=1e-5),
                err_msg=f"step {s}, leaf {k}",
            )


def test_adam_placement_differs_from_clip_then_adam():
    g = {"w": jnp.array([10.0, 1.0, 1.0, 1.0])}
    ours = optim.scale_by_adam_coordinate_clipped(0.25)
    naive = optax.chain(optim.coordinate_clip(0.25), optax.scale_by_adam())
    a, _ = ours.update(g, ours.init(g))
    with jax.numpy_dtype_promotion("standard"):
        b, _ = naive.update(g, naive.init(g))
    # second moment of the raw 10 in ours: m = 1, v = 100 -> 0.1; naive: v = 1 -> 1
    np.testing.assert_allclose(a["w"][0], 0.1, rtol=1e-5)
    np.testing.assert_allclose(b["w"][0], 1.0, rtol=1e-5)


@precision.DTYPES
def test_sgd_coordinate_clipped_clips_before_momentum(dtype):
    rng = np.random.default_rng(5)
    with precision.precision(dtype) as jdtype:
        tx = optim.sgd_coordinate_clipped(0.1, 0.25, momentum=0.5)
        p = {"w": jnp.zeros(16, jdtype)}
        state = tx.init(p)
        trace = np.zeros(16)
        for _ in range(6):
            g = rng.standard_normal(16) * rng.choice([1.0, 30.0], 16)
            upd, state = tx.update({"w": jnp.asarray(g, jdtype)}, state, p)
            trace = 0.5 * trace + reference.clip_top({"w": g}, 0.25)["w"]
            np.testing.assert_allclose(
                upd["w"], -0.1 * trace, **precision.tolerance(dtype, rtol=1e-6, atol=1e-6)
            )


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (optim.coordinate_clip, dict(fraction=1.5), "`fraction` must be in"),
        (optim.coordinate_clip, dict(fraction=-0.1), "`fraction` must be in"),
        (optim.coordinate_clip, dict(fraction=0.1, threshold_scale=-1.0), "`threshold_scale`"),
        (optim.sgd_coordinate_clipped, dict(learning_rate=-1.0, fraction=0.1), "`learning_rate`"),
        (
            optim.sgd_coordinate_clipped,
            dict(learning_rate=0.1, fraction=0.1, momentum=1.0),
            "`momentum` must be in",
        ),
        (
            optim.adam_coordinate_clipped,
            dict(learning_rate=0.1, fraction=0.1, b1=1.0),
            "`b1` must be in",
        ),
        (
            optim.adam_coordinate_clipped,
            dict(learning_rate=0.1, fraction=0.1, update_fraction=2.0),
            "`update_fraction` must be in",
        ),
    ],
)
def test_bad_hyperparameters_raise(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


BATTERY = [
    battery.Case(
        name="coordinate-clip",
        factory=optim.coordinate_clip,
        kwargs=dict(fraction=0.1),
        has_learning_rate=False,
        # Plain descent on clipped gradients stalls on a separable quadratic once the other
        # coordinates converge (the last one is clipped to the next, vanishing, magnitude), so
        # the convergence checks clip at half the largest magnitude instead (floor(cN) = 0 there).
        convergence_kwargs=dict(fraction=0.05, threshold_scale=0.5),
        outer_learning_rate=0.05,
        quadratic_steps=1000,
        logistic_steps=2000,
    ),
    battery.Case(
        name="sgd-coordinate-clipped",
        factory=optim.sgd_coordinate_clipped,
        kwargs=dict(learning_rate=0.05, fraction=0.1),
    ),
    battery.Case(
        name="adam-coordinate-clipped",
        factory=optim.adam_coordinate_clipped,
        kwargs=dict(learning_rate=1e-2, fraction=0.1, update_fraction=0.05),
    ),
]


@battery.parametrize(BATTERY)
def test_battery(case, check):
    check(case)
