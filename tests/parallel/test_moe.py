"""MoE execution strategies: exactness against float64 and dense references, the sparse
collectives, placement and re-sharding, wire bytes against their formulas, one compilation,
bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlib_ext.costs import analyze
from parallel.mesh import make_mesh
from parallel.moe import (
    MoeStrategy,
    balanced_order,
    expert_wire_bytes,
    plan_placement,
    plan_replication,
    reorder_index,
    replicate_rows,
    replicated_wire_bytes,
    route,
    sparse_all_gather,
    sparse_reduce_scatter,
    sparse_wire_bytes,
    token_wire_bytes,
)
from parallel.moe.dispatch import (
    capacity,
    emulated_ragged_all_to_all,
    ragged_all_to_all_supported,
)
from parallel.moe.routing import Routing
from tests.parallel import moe_reference as ref

E, D_MODEL, D_FF, BATCH, SEQ, K = 16, 8, 16, 16, 4, 2
VARIANTS = [
    ("ep", {}),
    ("fsdp", {}),
    ("fssdp", {"slots": 8}),  # m = D * c: the top experts replicated everywhere
    ("fssdp", {"slots": 4, "materialize": "all_gather"}),  # m < D c: slots dealt by load
    ("fssdp", {"slots": 3}),  # m < D: the top-3 copied everywhere by an all-reduce
    ("fssdp", {"slots": 2, "remat": True}),
    ("fssdp", {"slots": 8, "remat": True}),
    ("fsdp", {"remat": True}),
    ("ep", {"capacity_factor": 100.0}),  # clipped to the no-drop capacity
    ("ep", {"dispatch": "ragged-emulated"}),  # the ragged path's offsets, on CPU
    ("fssdp", {"slots": 4, "dispatch": "ragged-emulated"}),
]


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh({"data": 8}, devices=devices)


def _inputs(seed=0, num_experts=E, skew=0.0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (BATCH, SEQ, D_MODEL), jnp.float32)
    router = jax.random.normal(k[1], (D_MODEL, num_experts), jnp.float32)
    router = router + skew * jnp.linspace(1.0, 0.0, num_experts)  # lower ids hotter
    wi = jax.random.normal(k[2], (num_experts, D_MODEL, D_FF), jnp.float32) * 0.3
    wo = jax.random.normal(k[3], (num_experts, D_FF, D_MODEL), jnp.float32) * 0.3
    return x, router, wi, wo


def _put(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P(mesh.axis_names))) for a in arrays]


def _dense(x, routing, wi, wo):
    """The dense reference maths of ``jaxlib_ext.model.MoeMlp`` (every token through every
    expert, weighted by combine weights that are zero outside its top-k)."""
    combine = jnp.einsum("btk,btke->bte", routing.gates, jax.nn.one_hot(routing.experts, E))
    h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, wi))
    return jnp.einsum("bte,bted->btd", combine, jnp.einsum("btef,efd->bted", h, wo))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(("kind", "knobs"), VARIANTS)
def test_layer_matches_float64_reference(mesh, kind, knobs):
    strategy = MoeStrategy(kind, mesh, **knobs)
    x, router, wi, wo = _inputs()
    routing = route(x, router, K)
    layer = jax.jit(lambda x, r, wi, wo: strategy.layer(x, r, wi, wo, strategy.init_layer_state(E)))
    out, stats = layer(*_put(mesh, x), routing, *_put(mesh, wi, wo))
    expected = ref.moe_output(
        x.reshape(-1, D_MODEL), routing.experts.reshape(-1, K), routing.gates.reshape(-1, K), wi, wo
    )
    # float32 against float64, same routing: round-off only
    assert _rel(out.reshape(-1, D_MODEL), expected) <= 1e-5
    assert float(jnp.sum(stats.rows)) == BATCH * SEQ * K  # no copy dropped
    np.testing.assert_array_equal(stats.counts, np.bincount(routing.experts.reshape(-1), None, E))


@pytest.mark.parametrize(("kind", "knobs"), VARIANTS)
def test_gradients_match_the_dense_reference(mesh, kind, knobs):
    strategy = MoeStrategy(kind, mesh, **knobs)
    x, router, wi, wo = _inputs(seed=1)
    state = strategy.init_layer_state(E)

    def loss(layer_fn):
        def f(x, router, wi, wo):
            y = layer_fn(x, route(x, router, K), wi, wo)
            return jnp.sum(y * y)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

    want_loss, want = loss(_dense)(x, router, wi, wo)
    got_loss, got = loss(lambda *a: strategy.layer(*a, state)[0])(
        *_put(mesh, x), router, *_put(mesh, wi, wo)
    )
    assert abs(float(got_loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    for name, g, w in zip(("x", "router", "wi", "wo"), got, want, strict=True):
        assert _rel(g, w) <= 1e-5, name


def test_two_axis_mesh_and_owner_order(devices):
    """Experts over data x fsdp (2 x 4), stored in a shuffled owner order: still the reference."""
    mesh = make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    x, router, wi, wo = _inputs(seed=2)
    routing = route(x, router, K)
    order = jnp.asarray(np.random.default_rng(0).permutation(E), jnp.int32)
    want = np.asarray(_dense(x, routing, wi, wo))
    for kind, knobs in (("ep", {}), ("fsdp", {}), ("fssdp", {"slots": 8})):
        strategy = MoeStrategy(kind, mesh, **knobs)
        state = strategy.init_layer_state(E)._replace(order=order)
        stored = [w[order] for w in (wi, wo)]
        out, _ = jax.jit(strategy.layer)(*_put(mesh, x), routing, *_put(mesh, *stored), state)
        assert _rel(out, want) <= 1e-5, kind


def test_capacity_factor_drops_exactly_the_copies_beyond_capacity(mesh):
    strategy = MoeStrategy("ep", mesh, capacity_factor=2.0)
    x, router, wi, wo = _inputs(seed=3, skew=3.0)
    routing = route(x, router, K)
    tokens_per_device = BATCH * SEQ // 8
    c = capacity(tokens_per_device, K, 8, E // 8, 2.0)
    assert c == 4  # ceil(2.0 * 8 tokens * 2 / 8 devices): below the 16 that never drops
    out, stats = jax.jit(strategy.layer)(
        *_put(mesh, x), routing, *_put(mesh, wi, wo), strategy.init_layer_state(E)
    )
    experts = np.asarray(routing.experts).reshape(-1, K)
    keep = ref.capacity_keep(experts, np.arange(E) // (E // 8), 8, c)
    assert not keep.all()
    expected = ref.moe_output(
        x.reshape(-1, D_MODEL), experts, routing.gates.reshape(-1, K), wi, wo, keep=keep
    )
    assert _rel(out.reshape(-1, D_MODEL), expected) <= 1e-5
    assert float(jnp.sum(stats.rows)) == keep.sum()


def _shard_map(mesh, body, n_in):
    spec = P("data")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * n_in, out_specs=spec))


def _random_tables(rng, num_devices=8, per_device=2, send=1, slots=3):
    send_idx = rng.integers(0, per_device, (num_devices, send)).astype(np.int32)
    recv_idx = rng.integers(0, num_devices * send, (num_devices, slots)).astype(np.int32)
    return send_idx, recv_idx


def test_sparse_reduce_scatter_of_gathered_ones_counts_copies(mesh):
    rng = np.random.default_rng(0)
    send, recv = _random_tables(rng, send=2, slots=5)
    ones = jnp.ones((16, 3), jnp.float32)  # 2 rows per device

    def body(x, send, recv):
        copies = sparse_all_gather(x, send[0], recv[0], "data")
        return sparse_reduce_scatter(copies, send[0], recv[0], "data", x.shape[0])

    counts = _shard_map(mesh, body, 3)(*_put(mesh, ones, send, recv))
    expected = np.zeros(16)
    for device in range(8):
        for slot in recv[device]:
            owner, j = divmod(int(slot), 2)
            expected[owner * 2 + send[owner, j]] += 1
    np.testing.assert_array_equal(np.asarray(counts)[:, 0], expected)
    assert expected.max() > 1  # some rows have several copies


def test_sparse_pair_gradients_agree_with_a_dense_gather_scatter(mesh):
    """grad of sparse_all_gather == sparse_reduce_scatter == a dense index scatter-add."""
    rng = np.random.default_rng(1)
    send, recv = _random_tables(rng, send=1, slots=3)
    chunks = rng.normal(size=(16, 4)).astype(np.float32)
    cotangent = rng.normal(size=(8 * 3, 4)).astype(np.float32)

    def gathered(x, send, recv):
        return sparse_all_gather(x, send[0], recv[0], "data")

    forward = _shard_map(mesh, gathered, 3)
    # dense reference: slot (device i, j) holds global row owner * 2 + send[owner, r]
    flat_rows = np.array([(s // 1) * 2 + send[s // 1, s % 1] for s in recv.reshape(-1)])
    np.testing.assert_array_equal(forward(*_put(mesh, chunks, send, recv)), chunks[flat_rows])
    expected_grad = np.zeros_like(chunks)
    np.add.at(expected_grad, flat_rows, cotangent)
    args = _put(mesh, chunks, send, recv)
    _, vjp = jax.vjp(lambda x: forward(x, *args[1:]), args[0])
    (grad,) = vjp(jax.device_put(cotangent, NamedSharding(mesh, P("data"))))

    def scatter(c, send, recv):
        return sparse_reduce_scatter(c, send[0], recv[0], "data", 2)

    explicit = _shard_map(mesh, scatter, 3)(*_put(mesh, cotangent, send, recv))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(explicit, expected_grad, rtol=1e-6, atol=1e-6)


def test_placement_replicates_the_hottest_expert_of_each_owner(mesh):
    loads = jnp.asarray(np.random.default_rng(0).permutation(E) + 1.0, jnp.float32)
    order = jnp.arange(E, dtype=jnp.int32)
    place = plan_placement(loads, order, 8, slots=8, send_per_device=1)
    hottest = [int(np.argmax(np.asarray(loads)[2 * d : 2 * d + 2])) + 2 * d for d in range(8)]
    holds = np.asarray(place.holds)
    for e in range(E):
        assert holds[:, e].all() == (e in hottest)  # broadcast ones everywhere, others owner-only
    assert holds.sum(axis=1).tolist() == [9] * 8  # 2 owned + 7 copies (own broadcast is owned)
    slot = np.asarray(place.slot)
    assert (slot[np.arange(8), [2 * d for d in range(8)]] == 0).all()  # owned rows first


def test_placement_deals_slots_in_proportion_to_load(mesh):
    loads = jnp.asarray([100.0, 1] + [1.0] * 14, jnp.float32)
    order = jnp.arange(E, dtype=jnp.int32)
    place = plan_placement(loads, order, 8, slots=2, send_per_device=1)
    holds = np.asarray(place.holds)
    assert holds[:, 0].all()  # the dominant expert gets a copy on every device
    assert np.asarray(place.recv).shape == (8, 2)


@pytest.mark.parametrize("slots", [0, 4, 8])
def test_fssdp_tokens_stay_local_on_copies(mesh, slots):
    strategy = MoeStrategy("fssdp", mesh, slots=slots)
    x, router, wi, wo = _inputs(seed=4, skew=4.0)
    routing = route(x, router, K)
    _, stats = jax.jit(strategy.layer)(
        *_put(mesh, x), routing, *_put(mesh, wi, wo), strategy.init_layer_state(E)
    )
    experts = np.asarray(routing.experts).reshape(8, -1)
    owner_sent = sum(int(np.sum(experts[d] // 2 != d)) for d in range(8))
    if slots == 0:
        assert float(jnp.sum(stats.sent)) == owner_sent  # EP: everything not owned travels
    else:
        assert float(jnp.sum(stats.sent)) < owner_sent


def test_skewed_routing_is_balanced_by_fssdp_after_a_resharding(mesh):
    """The two hottest experts start on one owner (ids 0 and 1); EP's straggler gets > 2x the
    mean. After Algorithm 2 (hot experts spread over owners) FSSDP's copies bring it near 1."""
    x, router, wi, wo = _inputs(seed=5, skew=6.0)
    routing = route(x, router, K)
    counts = jnp.asarray(np.bincount(np.asarray(routing.experts).reshape(-1), None, E))
    imbalance = {}
    for name, kind, slots, reshard in (
        ("ep", "ep", 0, False),
        ("ep resharded", "ep", 0, True),
        ("fssdp", "fssdp", 8, False),
        ("fssdp resharded", "fssdp", 8, True),
    ):
        strategy = MoeStrategy(kind, mesh, slots=slots)
        state = strategy.init_layer_state(E)
        if reshard:
            state = state._replace(order=balanced_order(counts, 8, strategy.hot_experts))
        stored = [w[state.order] for w in (wi, wo)]
        _, stats = jax.jit(strategy.layer)(*_put(mesh, x), routing, *_put(mesh, *stored), state)
        imbalance[name] = float(jnp.max(stats.rows) / jnp.mean(stats.rows))
    assert imbalance["ep"] > 2.0, imbalance
    assert imbalance["fssdp resharded"] <= 1.25, imbalance
    assert imbalance["fssdp resharded"] < imbalance["ep resharded"], imbalance


def test_balanced_order_matches_the_reference_greedy():
    rng = np.random.default_rng(2)
    loads = rng.zipf(1.5, size=32).astype(np.float32)
    for hot in (0, 8, 16):
        order = np.asarray(balanced_order(jnp.asarray(loads), 8, hot))
        assert sorted(order.tolist()) == list(range(32))
        owners = np.empty(32, int)
        owners[order] = np.arange(32) // 4
        np.testing.assert_array_equal(owners, ref.greedy_owners(loads, 8, hot))


def test_reorder_index_moves_rows_between_orders():
    canonical = np.arange(10.0) * 10
    old, new = np.random.default_rng(3).permutation(10), np.random.default_rng(4).permutation(10)
    stored = canonical[old]
    index = np.asarray(reorder_index(jnp.asarray(old), jnp.asarray(new)))
    np.testing.assert_array_equal(stored[index], canonical[new])


def _grad_program(strategy, num_experts=E):
    x, router, wi, wo = _inputs(num_experts=num_experts)
    routing = route(x, router, K)
    state = strategy.init_layer_state(num_experts)

    def loss(x, gates, wi, wo):
        y, _ = strategy.layer(x, Routing(routing.experts, gates, routing.probs), wi, wo, state)
        return jnp.sum(y * y)

    args = _put(strategy.mesh, x, routing.gates, wi, wo)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), args


@pytest.mark.parametrize(
    ("kind", "knobs", "num_experts"),
    [("ep", {}, 16), ("fsdp", {}, 16), ("fsdp", {}, 32), ("fssdp", {"slots": 8}, 16),
     ("fssdp", {"slots": 8}, 32), ("fssdp", {"slots": 16}, 32),
     ("fssdp", {"slots": 4, "materialize": "all_gather"}, 16), ("fssdp", {"slots": 2}, 16),
     ("fssdp", {"slots": 2}, 32)],
)  # fmt: skip
def test_wire_bytes_of_the_compiled_step_equal_the_formulas(mesh, kind, knobs, num_experts):
    strategy = MoeStrategy(kind, mesh, **knobs)
    program, args = _grad_program(strategy, num_experts)
    wire = analyze(program, *args).wire_bytes()
    expert_bytes = 2 * D_MODEL * D_FF * 4
    expert = expert_wire_bytes(strategy, num_experts, expert_bytes)
    tokens = token_wire_bytes(strategy, BATCH * SEQ // 8, K, num_experts, D_MODEL * 4)
    assert wire["all-gather"] == expert["all-gather"]
    assert wire["reduce-scatter"] == expert["reduce-scatter"]
    assert wire["all-to-all"] == tokens["all-to-all"]
    # besides the experts, only fssdp's all-reduce of the [E] counts its placement reads
    counts = 2 * num_experts * 4 * 7 / 8 if kind == "fssdp" else 0.0
    assert wire["all-reduce"] == pytest.approx(expert["all-reduce"] + counts, rel=1e-12)
    if kind == "ep":
        assert set(expert.values()) == {0.0}
    if kind == "fsdp":
        assert wire["all-gather"] == num_experts * expert_bytes * 7 / 8  # all of them
    if strategy.materialize_path == "all_gather":  # c = ceil(m / D) per device, whatever E is
        c = -(-knobs["slots"] // 8)
        assert wire["all-gather"] == sparse_wire_bytes(8, c, expert_bytes)
    if strategy.materialize_path == "all_reduce":  # m experts, forward and backward
        assert expert["all-reduce"] == 2 * replicated_wire_bytes(8, knobs["slots"], expert_bytes)


def test_remat_gathers_the_experts_again_for_the_backward(mesh):
    """The program asks for a second gather in the backward (counted in the jaxpr); XLA:CPU
    merges it with the forward's (common-subexpression elimination), so the compiled CPU
    program moves the no-remat bytes; other backends keep the re-gather."""

    def gathers(strategy):
        program, args = _grad_program(strategy)
        return str(jax.make_jaxpr(program)(*args)).count("all_gather[")

    for kind, knobs in (("fssdp", {"slots": 8}), ("fsdp", {})):
        plain = gathers(MoeStrategy(kind, mesh, **knobs))
        again = gathers(MoeStrategy(kind, mesh, remat=True, **knobs))
        assert (plain, again) == (2, 4), kind  # wi and wo, then both again


def test_placement_changes_every_step_without_recompiling(mesh):
    strategy = MoeStrategy("fssdp", mesh, slots=8, current_routing=False)
    x, router, wi, wo = _inputs(seed=6)
    routing = route(x, router, K)
    traces = []

    @jax.jit
    def layer(x, routing, wi, wo, state):
        traces.append(1)
        return strategy.layer(x, routing, wi, wo, state)

    args = _put(mesh, x)
    weights = _put(mesh, wi, wo)
    outs, copies = [], []
    for seed in range(3):
        loads = jnp.asarray(np.random.default_rng(seed).permutation(E), jnp.float32)
        state = strategy.init_layer_state(E)._replace(loads=jnp.tile(loads, (5, 1)))
        out, _ = layer(*args, routing, *weights, state)
        place = plan_placement(loads, state.order, 8, 8, 1)
        copies.append(np.asarray(place.holds).sum(0).tolist())
        outs.append(np.asarray(out))
    assert len(traces) == 1
    assert copies[0] != copies[1] != copies[2]  # different experts materialized
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)  # same maths


def test_bad_strategy_arguments_name_the_argument(mesh):
    cases = [
        (dict(kind="tp"), "kind"),
        (dict(kind="ep", slots=2), "slots"),
        (dict(kind="fssdp", slots=-1), "slots"),
        (dict(kind="ep", capacity_factor=0.0), "capacity_factor"),
        (dict(kind="ep", capacity_factor=-1.0), "capacity_factor"),
        (dict(kind="fssdp", load_window=0), "load_window"),
        (dict(kind="fssdp", reshard_every=-1), "reshard_every"),
        (dict(kind="ep", axis_name="model"), "axis_name"),
        (dict(kind="ep", dispatch="nccl"), "dispatch"),
        (dict(kind="fssdp", slots=2, materialize="broadcast"), "materialize"),
        (dict(kind="ep", dispatch="ragged", capacity_factor=1.0), "capacity_factor"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            MoeStrategy(mesh=mesh, **kwargs)
    with pytest.raises(ValueError, match="num_experts"):
        MoeStrategy("ep", mesh).check(12, 2)  # 12 experts over 8 owners
    with pytest.raises(ValueError, match="slots"):
        MoeStrategy("fssdp", mesh, slots=32).check(16, 2)
    with pytest.raises(ValueError, match="top_k"):
        MoeStrategy("fsdp", mesh).check(16, 17)


def test_explicit_axis_mesh(devices):
    """jax.make_mesh's default (Explicit) axes work as well as Auto ones."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=devices)
    strategy = MoeStrategy("fssdp", mesh, slots=8)
    x, router, wi, wo = _inputs(seed=7)
    routing = route(x, router, K)
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, wi, wo)]
    r = Routing(*(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in routing))
    out, _ = jax.jit(strategy.layer)(sharded[0], r, *sharded[1:], strategy.init_layer_state(E))
    assert _rel(out, _dense(x, routing, wi, wo)) <= 1e-5


def test_emulated_ragged_all_to_all_follows_the_documented_example(devices):
    """The example of ``jax.lax.ragged_all_to_all``'s docstring, on 2 devices."""
    mesh = make_mesh({"x": 2}, devices=devices[:2])
    a = lambda *rows: jnp.asarray(rows, jnp.int32)
    operand = a([1, 2, 2], [3, 4, 0])
    output = a([0, 0, 0, 0], [0, 0, 0, 0])
    input_offsets = a([0, 1], [0, 1])
    send_sizes = a([1, 2], [1, 1])
    output_offsets = a([0, 0], [1, 2])
    recv_sizes = a([1, 1], [2, 1])

    def body(*args):
        return emulated_ragged_all_to_all(*(x[0] for x in args), axis_name="x")[None]

    spec = P("x")
    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
    result = run(
        *map(put, (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes))
    )
    assert np.asarray(result).tolist() == [[1, 3, 0, 0], [2, 2, 4, 0]]


def test_dispatch_is_padded_on_cpu_and_the_ragged_program_differentiates(mesh):
    assert not ragged_all_to_all_supported("cpu")  # XLA:CPU: UNIMPLEMENTED
    assert MoeStrategy("ep", mesh).dispatch_path == "padded"
    assert MoeStrategy("fsdp", mesh).dispatch_path == "none"
    ragged = MoeStrategy("fssdp", mesh, slots=8, dispatch="ragged")
    assert ragged.dispatch_path == "ragged"
    program, args = _grad_program(ragged)
    jaxpr = str(jax.make_jaxpr(program)(*args))  # traced, not compiled (no CPU kernel)
    # forward: rows, slot ids, results back; backward: the transposes of the two float ones
    assert jaxpr.count("ragged_all_to_all[") == 5


def test_replicate_rows_copies_everywhere_and_sums_gradients_onto_owners(mesh):
    rng = np.random.default_rng(5)
    chunks = rng.normal(size=(16, 3)).astype(np.float32)  # 2 rows per device
    rows = np.array([13, 2, 7], np.int32)
    cotangent = rng.normal(size=(8 * 3, 3)).astype(np.float32)  # per device, per copy

    def body(x, rows):
        return replicate_rows(x, rows[0], "data")

    rows_per_device = np.broadcast_to(rows, (8, 3))
    run = _shard_map(mesh, body, 2)
    args = _put(mesh, chunks, rows_per_device)
    out = np.asarray(run(*args)).reshape(8, 3, 3)
    np.testing.assert_array_equal(out, np.broadcast_to(chunks[rows], (8, 3, 3)))
    _, vjp = jax.vjp(lambda x: run(x, args[1]), args[0])
    (grad,) = vjp(jax.device_put(cotangent, NamedSharding(mesh, P("data"))))
    expected = np.zeros_like(chunks)
    np.add.at(expected, np.tile(rows, 8), cotangent)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


def test_replication_holds_the_top_experts_everywhere(mesh):
    loads = jnp.asarray(np.random.default_rng(6).permutation(E) + 1.0, jnp.float32)
    order = jnp.asarray(np.random.default_rng(7).permutation(E), jnp.int32)
    place = plan_replication(loads, order, 8, slots=3)
    top = np.argsort(-np.asarray(loads))[:3]
    holds = np.asarray(place.holds)
    assert holds[:, top].all()
    assert holds.sum() == E + 3 * 8 - 3  # owners already hold their own
    stored = np.asarray(order)[np.asarray(place.send[0])]
    assert stored.tolist() == top.tolist()  # the rows to copy hold the top experts
    assert MoeStrategy("fssdp", mesh, slots=3).materialize_path == "all_reduce"
    assert MoeStrategy("fssdp", mesh, slots=8).materialize_path == "all_gather"
