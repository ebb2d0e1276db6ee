"""Train state and train step: derived shardings, any optax transform, donation, one compile,
the same numbers on 1 device and on an 8-device data x FSDP mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlib_ext import data, train
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.mesh import make_mesh
from parallel.rules import activation_constraint

CFG = LMConfig(d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=16)


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh({"data": 2, "fsdp": 4}, devices=devices)


@pytest.fixture(scope="module")
def batches():
    corpus = data.load_corpus(max_bytes=1 << 18)
    tb = data.TokenBatches(corpus, batch_size=8, seq_len=16)
    out, state = [], tb.initial_state(0)
    for _ in range(12):
        batch, state = tb.batch(state)
        out.append(batch)
    return out


def _setup(mesh, tx, cfg=CFG, constrain=True):
    lm = LanguageModel(cfg, activation_sharding=activation_constraint(mesh) if constrain else None)
    shardings = train.train_state_shardings(lm, tx, mesh)
    bsh = train.batch_sharding(mesh, global_batch=8)
    state = train.init_train_state(lm, tx, shardings, seed=0)
    step = train.make_train_step(train.lm_loss(lm), tx, shardings, bsh)
    return lm, state, step, bsh


def test_state_is_born_sharded(mesh):
    _, state, _, _ = _setup(mesh, optax.adamw(1e-3))
    kernel = state.params["blocks"][0]["mlp"]["wi"]
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (8, 64)
    mu = state.opt_state[0].mu["blocks"][0]["mlp"]["wi"]
    assert mu.sharding.is_equivalent_to(kernel.sharding, 2)
    assert state.step.sharding.spec == P()


@pytest.mark.parametrize(
    "tx",
    [
        optax.adamw(3e-3),
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.3, momentum=0.9)),
        optax.inject_hyperparams(optax.lion)(learning_rate=3e-4),
        optax.MultiSteps(optax.adam(3e-3), every_k_schedule=2),
    ],
    ids=["adamw", "clip+sgd", "inject-lion", "multisteps"],
)
def test_any_optax_transform_trains(mesh, batches, tx):
    _, state, step, bsh = _setup(mesh, tx)
    batch = train.shard_batch(batches[0], bsh)
    losses = []
    for _ in range(16):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert int(state.step) == 16
    assert set(metrics) >= {
        "loss",
        "grad_norm",
        "update_norm",
        "param_norm",
        "tokens",
        "cross_entropy",
        "aux_loss",
    }
    assert int(metrics["tokens"]) == 8 * 16


def test_step_donates_the_state_and_compiles_once(mesh, batches):
    _, state, step, bsh = _setup(mesh, optax.adamw(1e-3))
    old = state
    state, _ = step(state, train.shard_batch(batches[0], bsh))
    assert old.params["head"].is_deleted() and old.opt_state[0].mu["head"].is_deleted()
    for b in batches[1:4]:
        state, _ = step(state, train.shard_batch(b, bsh))
    assert step._cache_size() == 1


def test_one_device_and_eight_devices_agree(devices, batches):
    tx = optax.adamw(1e-3)
    results = []
    for mesh in (
        make_mesh({"data": 1, "fsdp": 1}, devices=devices[:1]),
        make_mesh({"data": 2, "fsdp": 4}, devices=devices),
    ):
        _, state, step, bsh = _setup(mesh, tx)
        losses = []
        for b in batches[:6]:
            state, metrics = step(state, train.shard_batch(b, bsh))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=2e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        results[0][1],
        results[1][1],
    )


def test_moe_and_scanned_model_train_sharded(mesh, batches):
    cfg = LMConfig(
        d_model=32, num_layers=2, num_heads=4, d_ff=32, max_len=16, num_experts=4, scan_layers=True
    )
    _, state, step, bsh = _setup(mesh, optax.adam(3e-3), cfg)
    wi = state.params["blocks"]["mlp"]["wi"]
    assert wi.sharding.spec == P(None, None, "fsdp", None)  # [layers, expert, embed, mlp]
    batch = train.shard_batch(batches[0], bsh)
    first = None
    for _ in range(10):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first
    assert float(metrics["aux_loss"]) > 0


def test_model_that_cannot_be_sharded_names_the_parameter(devices):
    mesh = make_mesh({"fsdp": 3}, devices=devices[:3])
    lm = LanguageModel(CFG)
    with pytest.raises(ValueError, match=r"cannot shard parameter .*not divisible by 3"):
        train.train_state_shardings(lm, optax.adam(1e-3), mesh)


def test_batch_that_cannot_be_sharded(mesh):
    with pytest.raises(ValueError, match="the batch.*6 is not divisible by 8"):
        train.batch_sharding(mesh, global_batch=6)


def test_shard_batch_places_rows(mesh):
    bsh = train.batch_sharding(mesh, global_batch=8)
    x = train.shard_batch(np.arange(8 * 3, dtype=np.int32).reshape(8, 3), bsh)
    assert x.sharding == bsh and x.addressable_shards[0].data.shape == (1, 3)
    np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))


def test_loss_is_next_token_cross_entropy():
    lm = LanguageModel(CFG)
    params = lm.init(0)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
    loss, extra = train.lm_loss(lm)(params, batch)
    logits, _ = lm.apply(params, batch[:, :-1])
    logp = jax.nn.log_softmax(logits)
    manual = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(float(loss), float(manual), rtol=1e-6)
    np.testing.assert_allclose(float(extra["cross_entropy"]), float(manual), rtol=1e-6)


def test_a_non_finite_step_is_skipped_with_apply_if_finite(mesh, batches):
    """What the demo does by default (``--skip-nonfinite``): a step whose gradient holds a NaN
    leaves params and optimizer state bit-exactly as they were, and training goes on."""
    import optim

    tx = optax.apply_if_finite(optim.spam(1e-3, reset_interval=100), max_consecutive_errors=3)
    lm = LanguageModel(CFG, activation_sharding=activation_constraint(mesh))
    shardings = train.train_state_shardings(lm, tx, mesh)
    bsh = train.batch_sharding(mesh, global_batch=8)
    state = train.init_train_state(lm, tx, shardings, seed=0)
    base = train.lm_loss(lm)

    def loss_fn(params, batch):  # a token id of 256 marks the poisoned batch
        loss, metrics = base(params, jnp.minimum(batch, 255))
        return loss * jnp.where(jnp.max(batch) > 255, jnp.nan, 1.0), metrics

    step = train.make_train_step(loss_fn, tx, shardings, bsh)
    state, _ = step(state, train.shard_batch(batches[0], bsh))
    plain = lambda x: np.asarray(
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    )
    before = jax.tree.map(plain, (state.params, state.opt_state.inner_state))
    poisoned = batches[1].copy()
    poisoned[0, 0] = 256
    state, metrics = step(state, train.shard_batch(poisoned, bsh))
    assert not np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(plain, (state.params, state.opt_state.inner_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert int(state.opt_state.total_notfinite) == 1
    state, metrics = step(state, train.shard_batch(batches[2], bsh))
    assert np.isfinite(float(metrics["loss"])) and int(state.opt_state.notfinite_count) == 0
