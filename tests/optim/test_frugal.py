"""FRUGAL against an independent float64 NumPy reference in every projection mode across several
refreshes (random choices injected from the state), the GaLore baseline against
``optax.contrib.galore``, memory, one compilation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from optim.frugal import default_projectable, keyed_indices
from tests.optim import battery, precision, reference

SHAPES = {"embed": (16, 6), "a": (8, 12), "b": (12, 8), "stack": (3, 8, 8), "bias": (12,)}
PROJECTABLE = {"embed": False, "a": True, "b": True, "stack": True, "bias": False}


def _grads(steps, seed):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]


def _run(tx, ref, steps, choose_from_state=None, blocks=None, seed=0, dtype="float32"):
    rng = np.random.default_rng(100 + seed)
    p64 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    jdtype = jnp.dtype(dtype)
    params = precision.cast(p64, jdtype)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for s, g in enumerate(_grads(steps, seed), start=1):
        params, state = step(params, state, precision.cast(g, jdtype))
        inner = state[0]
        choose = (
            None
            if choose_from_state is None
            else (lambda name, layer, mat, inner=inner: choose_from_state(inner, name, layer, mat))
        )
        p64 = ref.step(p64, g, choose=choose, blocks=blocks)
        for k in SHAPES:
            assert params[k].dtype == jdtype
            np.testing.assert_allclose(
                params[k],
                p64[k],
                **precision.tolerance(dtype, rtol=2e-4, atol=2e-5),
                err_msg=f"step {s}, leaf {k}",
            )
    return state


def _side(mode, mat):
    """The side the original projects, decided on its PyTorch (out, in) = mat.T layout."""
    if mode == "columns":  # the original's columns (axis 1 of (out, in)) are our rows
        return "rows"
    if mode == "rows":
        return "cols"
    if mode == "randk":
        return "flat"
    out_dim, in_dim = mat.T.shape
    # GaLore's rule on (out, in): out >= in projects the right factor there, our rows here
    return "rows" if out_dim >= in_dim else "cols"


@precision.DTYPES
@pytest.mark.parametrize("mode", ["columns", "rows", "randk", "randperm", "random", "svd"])
@pytest.mark.parametrize("free_rule", ["sign_sgd", "sgd"])
def test_matrix_modes_match_reference(mode, free_rule, dtype):
    with precision.precision(dtype):
        _matrix_mode(mode, free_rule, dtype)


def _matrix_mode(mode, free_rule, dtype):
    tx = optim.frugal(
        1e-2,
        density=0.25,
        update_gap=4,
        projection=mode,
        free_rule=free_rule,
        free_lr_scale=0.5,
        proj_lr_scale=2.0,
        weight_decay=0.01,
        projectable=PROJECTABLE,
    )
    ref = reference.Frugal(
        PROJECTABLE,
        lr=1e-2,
        mode=mode,
        T=4,
        free_rule=free_rule,
        free_scale=0.5,
        proj_scale=2.0,
        wd=0.01,
    )

    def choose(state, name, layer, mat):
        side = _side(mode, mat)
        if mode == "svd":  # the reference's own float64 SVD, of the PyTorch-layout weight
            torch_weight = mat.T
            u, _, vh = np.linalg.svd(torch_weight, full_matrices=False)
            out_dim, in_dim = torch_weight.shape
            if out_dim >= in_dim:  # down = G_t B^T there, i.e. B G = A^T G here (A = B^T)
                return "proj_rows", vh[: round(in_dim * 0.25)].T
            return "proj_cols", u[:, : round(out_dim * 0.25)].T  # down = A^T G_t there
        sub = np.asarray(state.subspace[name][layer])
        if mode == "randk":  # the entries come from 4 stored round keys
            count = int(mat.size * 0.25)
            return side, np.asarray(keyed_indices(jnp.asarray(sub), mat.size, count))
        if mode == "random":
            return ("proj_cols" if side == "cols" else "proj_rows", sub.astype(np.float64))
        return side, sub

    _run(tx, ref, 12, choose_from_state=choose, dtype=dtype)


def _block_reference_schedule(order, density):
    names = ["a", "b", "stack[0]", "stack[1]", "stack[2]"]  # unstacked, then stacks by layer
    n, n_act = len(names), round(len(names) * density)

    def active(r):
        if order == "ascending":
            idx = [(r * n_act + i) % n for i in range(n_act)]
        elif order == "descending":
            idx = [(n - 1 - r * n_act - i) % n for i in range(n_act)]
        else:  # mirror: pairs (0, n-1), (1, n-2), ... inwards, then back to the ends
            pairs = [(j, n - 1 - j) for j in range((n + 1) // 2)]
            h = n_act // 2
            idx = [b for i in range(h) for b in pairs[(r * h + i) % len(pairs)]]
        return {names[i] for i in idx}

    return active


@precision.DTYPES
@pytest.mark.parametrize("order", ["descending", "ascending", "mirror"])
def test_block_mode_matches_reference_schedule(order, dtype):
    tx = optim.frugal(
        1e-2,
        density=0.4,
        update_gap=3,
        projection="block",
        block_order=order,
        projectable=PROJECTABLE,
    )
    ref = reference.Frugal(PROJECTABLE, lr=1e-2, mode="block", T=3)
    with precision.precision(dtype):
        _run(tx, ref, 15, blocks=_block_reference_schedule(order, 0.4), dtype=dtype)


@precision.DTYPES
def test_block_mode_without_reset_keeps_staying_blocks_and_zeroes_new_ones(dtype):
    # 5 blocks, 3 active, ascending: {a, b, s0}, {s1, s2, a}, {b, s0, s1}, ... so every refresh
    # keeps one block active (its moments carry over, possibly to another slot) and activates
    # two that start from zero (sharing slots with blocks that just left must not leak).
    tx = optim.frugal(
        1e-2,
        density=0.6,
        update_gap=2,
        projection="block",
        block_order="ascending",
        reset_state=False,
        projectable=PROJECTABLE,
    )
    ref = reference.Frugal(PROJECTABLE, lr=1e-2, mode="block", T=2, reset=False)
    names = ["a", "b", "stack[0]", "stack[1]", "stack[2]"]
    with precision.precision(dtype):
        _run(tx, ref, 10, blocks=lambda r: {names[(3 * r + i) % 5] for i in range(3)}, dtype=dtype)


def test_block_order_follows_layer_numbers_not_sorted_keys():
    # pytree order is layers_0, layers_1, layers_10, layers_11, layers_2, ...: descending must
    # start at the last layer, layers_11, and then walk down through layers_10.
    params = {f"layers_{i}": {"w": jnp.zeros((4, 4), jnp.float32)} for i in range(12)}
    tx = optim.frugal(
        1.0,
        density=1 / 12,
        update_gap=1,
        free_rule="none",
        projectable=lambda p: jax.tree.map(lambda _: True, p),
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        moved.append([k for k, v in updates.items() if np.any(np.asarray(v["w"]) != 0)])
    assert moved == [["layers_11"], ["layers_10"], ["layers_9"]]


def test_block_order_mirror_cycles_through_pairs():
    params = {f"layers_{i}": {"w": jnp.zeros((4, 4), jnp.float32)} for i in range(6)}
    tx = optim.frugal(
        1.0,
        density=2 / 6,
        update_gap=1,
        block_order="mirror",
        free_rule="none",
        projectable=lambda p: jax.tree.map(lambda _: True, p),
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = []
    for _ in range(4):
        updates, state = tx.update(grads, state, params)
        moved.append(sorted(int(k[7:]) for k, v in updates.items() if np.any(v["w"] != 0)))
    assert moved == [[0, 5], [1, 4], [2, 3], [0, 5]]


def test_map_params_limitation_is_as_documented():
    # FrugalState's docstring says optax.tree.map_params cannot map FRUGAL's state (its pools
    # depend on the param shapes the placeholder hides) and points to eval_shape-based
    # derivation, which test_sharded_state_is_derived_and_stable_through_refreshes exercises.
    # If optax ever maps it, this fails and the docstring must change.
    params = {"a": jnp.zeros((8, 4), jnp.float32), "bias": jnp.zeros(4, jnp.float32)}
    tx = optim.frugal(1e-2, density=0.5, projectable={"a": True, "bias": False})
    assert "map_params" in optim.FrugalState.__doc__
    with pytest.raises(ValueError):
        optax.tree.map_params(tx, lambda p: p, tx.init(params))


def test_block_mode_random_order_uses_its_recorded_choice():
    tx = optim.frugal(
        1e-2,
        density=0.4,
        update_gap=3,
        projection="block",
        block_order="random",
        projectable=PROJECTABLE,
        seed=5,
    )
    ref = reference.Frugal(PROJECTABLE, lr=1e-2, mode="block", T=3)
    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    chosen = []
    for g in _grads(9, 1):
        _, state = step({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
        chosen.append(tuple(np.asarray(x).tolist() for x in state[0].subspace))
    # shape classes: (8, 12) "a", (12, 8) "b", (8, 8) the stack's 3 layers: round(n * 0.4) each
    assert [len(c) for c in chosen[0]] == [0, 0, 1]
    assert len({c[2][0] for c in chosen}) > 1  # the stack's active layer changes at refreshes
    assert all(chosen[i] == chosen[i - 1] for i in range(1, 9) if i % 3)
    names = ["stack[0]", "stack[1]", "stack[2]"]
    _run(tx, ref, 9, blocks=lambda r: {names[chosen[3 * r][2][0]]}, seed=1)


def test_galore_baseline_equals_optax_galore_on_square_matrices():
    # On a square kernel FRUGAL projects the left factor (A^T G, the original's right factor of
    # its (out, in) weight), as optax's GaLore with reduction_axis=0 does: the same computation.
    params = {
        "w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32),
        "bias": jnp.zeros(8, jnp.float32),
    }
    ours = optim.frugal(
        1e-2,
        density=0.25,
        update_gap=100,
        projection="svd",
        free_rule="none",
        reset_state=False,
        projectable={"w": True, "bias": False},
    )
    dims = {
        "w": optax.contrib.GaLoreDimensionNumbers(reduction_axis=0, output_axis=1),
        "bias": None,
    }
    theirs = optax.contrib.galore(1e-2, rank=2, update_proj_gap=100, weight_dimension_numbers=dims)
    s1, s2 = ours.init(params), theirs.init(params)
    for g in _grads(10, 3):
        grads = {
            "w": jnp.asarray(g["a"][:, :8], jnp.float32),
            "bias": jnp.asarray(g["bias"][:8], jnp.float32),
        }
        u1, s1 = ours.update(grads, s1, params)
        with jax.numpy_dtype_promotion("standard"):
            u2, s2 = theirs.update(grads, s2, params)
        for k in params:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-4, atol=1e-6)


def _state_ratio(params, mode):
    state = jax.eval_shape(optim.frugal(1e-3, projection=mode).init, params)[0]
    mask = default_projectable(params)
    proj = sum(
        x.size * 4 for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m
    )
    size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    return size((state.active_mu, state.active_nu, state.subspace)) / (2 * proj)


@pytest.mark.parametrize("scan", [False, True])
def test_state_memory_on_the_reference_lm(scan):
    from jaxlib_ext.model import LanguageModel, LMConfig

    lm = LanguageModel(
        LMConfig(d_model=64, num_layers=4, num_heads=4, d_ff=256, max_len=32, scan_layers=scan)
    )
    ratios = {m: _state_ratio(lm.abstract_params, m) for m in optim.frugal_projections()}
    for mode in ("block", "columns", "rows", "randk", "randperm"):
        assert ratios[mode] <= 0.26, ratios
    for mode in ("svd", "random"):  # + the projector: rho * (1 + n / 2m) <= 1.5 rho per matrix
        assert ratios[mode] <= 0.32, ratios


@pytest.mark.parametrize(("size", "count"), [(1, 1), (7, 3), (96, 24), (1000, 1000), (4097, 50)])
def test_keyed_indices_are_distinct_and_in_range(size, count):
    keys = jax.random.bits(jax.random.key(size), (4,), jnp.uint32)
    idx = np.asarray(keyed_indices(keys, size, count))
    assert idx.shape == (count,) and len(set(idx.tolist())) == count
    assert idx.min() >= 0 and idx.max() < size
    other = np.asarray(keyed_indices(keys ^ jnp.uint32(1), size, count))
    if count < size:
        assert not np.array_equal(np.sort(idx), np.sort(other))


def test_refresh_is_traced_once():
    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    for mode in ("block", "svd"):
        tx = optim.frugal(1e-2, update_gap=2, projection=mode, projectable=PROJECTABLE)
        update = jax.jit(tx.update)
        state = tx.init(params)
        for g in _grads(5, 0):
            _, state = update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
        assert update._cache_size() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(density=0.0), "`density` must be in"),
        (dict(density=1.5), "`density` must be in"),
        (dict(update_gap=0), "`update_gap` must be in"),
        (dict(projection="pca"), "`projection` must be one of"),
        (dict(block_order="sideways"), "`block_order` must be one of"),
        (dict(free_rule="adam"), "`free_rule` must be one of"),
        (dict(learning_rate=-1.0), "`learning_rate`"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.frugal(**{"learning_rate": 1e-3, **kwargs})


def test_bad_layouts_raise_naming_the_leaf():
    params = {"conv": jnp.zeros((3, 3, 4, 8)), "w": jnp.zeros((8, 8))}
    with pytest.raises(ValueError, match=r"needs matrices .*\['conv'\] has shape \(3, 3, 4, 8\)"):
        optim.frugal(1e-3, projection="svd", projectable={"conv": True, "w": True}).init(params)
    odd = {"w": jnp.zeros((4, 4)), "v": jnp.zeros((4, 4)), "u": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match="mirror.*even number of active blocks.*= 1"):
        optim.frugal(
            1e-3,
            density=0.34,
            block_order="mirror",
            projectable=lambda p: jax.tree.map(lambda _: True, p),
        ).init(odd)


FRUGAL_STATIC = (  # the arguments that fix shapes or control flow
    "density",
    "update_gap",
    "projection",
    "block_order",
    "free_rule",
    "reset_state",
    "projectable",
    "seed",
)
BATTERY = [
    battery.Case(
        name="frugal-block",
        factory=optim.frugal,
        kwargs=dict(learning_rate=1e-2, update_gap=5, density=0.5),
        static_args=FRUGAL_STATIC,
        quadratic_steps=1500,
        quadratic_tol=3e-2,
        logistic_steps=1500,
    ),
    battery.Case(
        name="frugal-svd",
        factory=optim.frugal,
        kwargs=dict(learning_rate=1e-2, update_gap=5, density=0.5, projection="svd"),
        static_args=FRUGAL_STATIC,
        quadratic_steps=1500,
        quadratic_tol=3e-2,
        logistic_steps=1500,
    ),
]


@battery.parametrize(BATTERY)
def test_battery(case, check):
    check(case)


@pytest.mark.parametrize("mode", ["block", "svd", "columns"])
def test_sharded_state_is_derived_and_stable_through_refreshes(devices, mode):
    from jaxlib_ext import train
    from jaxlib_ext.model import LanguageModel, LMConfig
    from parallel.mesh import make_mesh
    from parallel.rules import activation_constraint

    mesh = make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    lm = LanguageModel(
        LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16),
        activation_sharding=activation_constraint(mesh),
    )
    tx = optim.frugal(1e-2, density=0.5, update_gap=2, projection=mode)
    shardings = train.train_state_shardings(lm, tx, mesh)
    frugal_sh = shardings.opt_state[0]
    big = [
        s
        for s, x in zip(
            jax.tree.leaves(frugal_sh),
            jax.tree.leaves(jax.eval_shape(tx.init, lm.abstract_params)[0]),
            strict=True,
        )
        if x.size >= 64 * 32 // 4
    ]
    assert big and all(s.spec != jax.sharding.PartitionSpec() for s in big), (
        "no large FRUGAL buffer is replicated"
    )
    state = train.init_train_state(lm, tx, shardings, seed=0)
    bsh = train.batch_sharding(mesh, global_batch=8)
    traces = []
    loss_fn = train.lm_loss(lm)

    def counted_loss(params, batch):
        traces.append(1)  # runs once per trace, i.e. per compilation
        return loss_fn(params, batch)

    step = train.make_train_step(counted_loss, tx, shardings, bsh)
    batch = train.shard_batch(np.random.default_rng(0).integers(0, 256, (8, 17), np.int32), bsh)
    losses = []
    for _ in range(5):  # refreshes before steps 1, 3 and 5
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert len(traces) == 1, "one compilation for every step, refreshes included"
    for leaf, sh in zip(
        jax.tree.leaves(state.opt_state), jax.tree.leaves(shardings.opt_state), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


@pytest.mark.parametrize("mode", ["block", "columns"])
def test_init_gives_every_buffer_its_own_array_so_the_state_can_be_donated(mode):
    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    tx = optim.frugal(1e-2, update_gap=2, projection=mode, projectable=PROJECTABLE)
    state = tx.init(params)  # not jitted: a shared zero array would be donated twice below
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len({id(x) for x in leaves}) == len(leaves)
    step = jax.jit(lambda s, g: tx.update(g, s, params), donate_argnums=0)
    grads = {k: jnp.ones(s, jnp.float32) for k, s in SHAPES.items()}
    for _ in range(3):
        _, state = step(state, grads)
