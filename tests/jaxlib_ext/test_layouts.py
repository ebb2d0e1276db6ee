"""Layout conversions: exact inverses on real train states, and restores across layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlib_ext import checkpoint as C
from jaxlib_ext import train
from jaxlib_ext.checkpoint import layouts as L
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.mesh import make_mesh

TX = optax.adamw(1e-3)
BATCH = np.random.default_rng(0).integers(0, 256, (8, 17), np.int32)


def _config(**kw):
    return LMConfig(d_model=32, num_layers=3, num_heads=2, d_ff=64, max_len=16, **kw)


def _trained_state(lm, mesh, steps=1):
    shardings = train.train_state_shardings(lm, TX, mesh)
    state = train.init_train_state(lm, TX, shardings, seed=0)
    step = train.make_train_step(train.lm_loss(lm), TX, shardings, train.batch_sharding(mesh))
    for _ in range(steps):
        state, _ = step(state, train.shard_batch(BATCH, train.batch_sharding(mesh)))
    return state


def _target(lm, mesh):
    shardings = train.train_state_shardings(lm, TX, mesh)
    return train.abstract_train_state(lm, TX, shardings)


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.fixture
def mesh(devices):
    return make_mesh({"data": 2, "fsdp": 4}, devices=devices)


def test_scanned_and_unrolled_layers_convert_exactly(mesh):
    scanned = L.flatten(_trained_state(LanguageModel(_config(scan_layers=True)), mesh))
    unrolled_shapes = L.flatten(_target(LanguageModel(_config()), mesh))
    split = L.UnstackLayers("blocks", 3)(scanned)
    # the per-layer form has exactly the unrolled model's leaves (params and adam moments)
    shapes = lambda flat: {k: v.shape for k, v in flat.items()}
    assert shapes(split) == shapes(unrolled_shapes)
    np.testing.assert_array_equal(
        np.asarray(split["opt_state/0/mu/blocks/2/attn/wq"]),
        np.asarray(scanned["opt_state/0/mu/blocks/attn/wq"][2]),
    )
    _assert_same(L.UnstackLayers("blocks", 3).inverse()(split), scanned)


@pytest.mark.parametrize("direction", ["scanned->unrolled", "unrolled->scanned"])
def test_restore_across_the_layer_layout(tmp_path, mesh, devices, direction):
    scan_saved = direction == "scanned->unrolled"
    saved_lm = LanguageModel(_config(scan_layers=scan_saved))
    loaded_lm = LanguageModel(_config(scan_layers=not scan_saved))
    state = _trained_state(saved_lm, mesh, steps=2)
    layout = L.UnstackLayers("blocks", 3) if scan_saved else L.StackLayers("blocks", 3)
    load_mesh = make_mesh({"fsdp": 4}, devices=devices[:4])
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state)
        restored, _ = ckpt.restore(_target(loaded_lm, load_mesh), layouts=[layout])
    _assert_same(L.flatten(restored), layout(L.flatten(state)))
    # the same model either way: equal losses on a batch
    loss = lambda lm, params: train.lm_loss(lm)(params, jnp.asarray(BATCH))[0]
    np.testing.assert_allclose(
        float(loss(loaded_lm, restored.params)), float(loss(saved_lm, state.params)), rtol=1e-5
    )


EXPERTS = "*mlp/w[io]"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_owner_order_round_trips(mesh, seed):
    lm = LanguageModel(_config(num_experts=4, top_k=2))
    canonical = L.flatten(_trained_state(lm, mesh))
    canonical["order"] = jnp.arange(4, dtype=jnp.int32)
    order = np.random.default_rng(seed).permutation(4)
    to_owner = L.PermuteAxis(EXPERTS, tuple(order), record="order")
    owned = to_owner(canonical)
    assert owned["order"].tolist() == order.tolist()
    for key in ("params/blocks/1/mlp/wi", "opt_state/0/nu/blocks/1/mlp/wo"):
        for slot, expert in enumerate(order):  # slot j holds expert order[j]
            np.testing.assert_array_equal(
                np.asarray(owned[key][slot]), np.asarray(canonical[key][expert])
            )
    back = L.PermuteAxis.to_canonical(owned, EXPERTS, record="order")
    _assert_same(back(owned), canonical)
    _assert_same(to_owner.inverse()(owned), canonical)


def test_expert_sharded_owner_ordered_checkpoint_restores_replicated(tmp_path, devices):
    experts = make_mesh({"expert": 4, "data": 2}, devices=devices)
    rng = np.random.default_rng(0)
    canonical = {"wi": rng.normal(size=(4, 8, 16)).astype(np.float32)}
    order = (3, 1, 0, 2)
    saved = L.PermuteAxis("wi", order, record="order")(
        {**canonical, "order": np.arange(4, dtype=np.int32)}
    )
    state = {
        "wi": jax.device_put(saved["wi"], NamedSharding(experts, P("expert"))),
        "order": jnp.asarray(saved["order"]),
    }
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        replicated = NamedSharding(make_mesh({"fsdp": 8}, devices=devices), P())
        target = {
            "wi": jax.ShapeDtypeStruct((4, 8, 16), jnp.float32, sharding=replicated),
            "order": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=replicated),
        }
        as_saved, _ = ckpt.restore(target)  # owner order, replicated
        layout = L.PermuteAxis.to_canonical(as_saved, "wi", record="order")
        restored, _ = ckpt.restore(target, layouts=[layout])
    np.testing.assert_array_equal(np.asarray(restored["wi"]), canonical["wi"])
    assert restored["order"].tolist() == [0, 1, 2, 3]
    assert restored["wi"].sharding == replicated


def test_replicas_stack_and_unstack(tmp_path, mesh):
    single = L.flatten(_trained_state(LanguageModel(_config()), mesh).params)
    stacked = L.StackReplicas("*", 4)(single)
    assert stacked["head"].shape == (4, *single["head"].shape)
    _assert_same(L.UnstackReplicas("*", 4)(stacked), single)
    drifted = dict(stacked, head=stacked["head"].at[2, 0, 0].add(1.0))
    with pytest.raises(ValueError, match="head: the 4 replicas differ"):
        L.UnstackReplicas("*", 4)(drifted)
    mean = L.UnstackReplicas("*", 4, reduce="mean")(drifted)["head"]
    np.testing.assert_allclose(np.asarray(mean[0, 0]), np.asarray(single["head"][0, 0]) + 0.25)
    # a replica-stacked checkpoint restores into one copy
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"params": stacked})
        target = {"params": {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in single.items()}}
        restored, _ = ckpt.restore(target, layouts=[L.UnstackReplicas("params/*", 4)])
    _assert_same(restored["params"], single)


def test_fused_and_split_projections_round_trip(mesh):
    state = L.flatten(_trained_state(LanguageModel(_config()), mesh))
    fuse = L.FuseProjection("wqkv", ("wq", "wk", "wv"), (32, 32, 32))
    fused = fuse(state)
    assert fused["opt_state/0/mu/blocks/0/attn/wqkv"].shape == (32, 96)
    assert "params/blocks/0/attn/wq" not in fused
    np.testing.assert_array_equal(
        np.asarray(fused["params/blocks/1/attn/wqkv"][:, 32:64]),
        np.asarray(state["params/blocks/1/attn/wk"]),
    )
    _assert_same(fuse.inverse()(fused), state)


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="`permutation` must be a permutation"):
        L.PermuteAxis("*", (0, 0, 1))
    with pytest.raises(ValueError, match="`num_layers` must be a positive int"):
        L.UnstackLayers("blocks", 0)
    with pytest.raises(ValueError, match="cannot stack p/blocks/w: layers \\[0, 2\\]"):
        L.StackLayers("blocks", 3)({"p/blocks/0/w": jnp.ones(2), "p/blocks/2/w": jnp.ones(2)})
    with pytest.raises(ValueError, match="cannot fuse p/wqkv: only \\['wk', 'wq'\\]"):
        L.FuseProjection("wqkv", ("wq", "wk", "wv"), (1, 1, 1))(
            {"p/wq": jnp.ones((2, 1)), "p/wk": jnp.ones((2, 1))}
        )
    with pytest.raises(ValueError, match="`reduce`"):
        L.UnstackReplicas("*", 2, reduce="max")
