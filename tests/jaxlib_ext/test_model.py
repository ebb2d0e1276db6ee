"""The reference LM: shapes, logical axes, causality, scan == unrolled, MoE vs a NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlib_ext.model import LanguageModel, LMConfig, MoeMlp

SMALL = dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=16)


def _tokens(seed=0, shape=(2, 16)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256, jnp.int32)


@pytest.mark.parametrize("experts", [0, 4])
@pytest.mark.parametrize("scan", [False, True])
def test_shapes_and_logical_axes(scan, experts):
    lm = LanguageModel(LMConfig(**SMALL, scan_layers=scan, num_experts=experts))
    params = lm.init(0)
    logits, aux = jax.jit(lm.apply)(params, _tokens())
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert (float(aux) > 0) == bool(experts)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    axes = lm.logical_axes
    for path, leaf in leaves:
        names = axes
        for key in path:
            names = names[key.key]
        assert isinstance(names, tuple) and len(names) == leaf.ndim, (path, names)
        if scan and "blocks" in str(path[0]):
            assert names[0] == "layers"
    assert jax.tree.structure(params) == jax.tree.structure(lm.abstract_params)
    assert lm.num_params() == sum(x.size for x in jax.tree.leaves(params))


def test_init_is_deterministic_per_seed():
    lm = LanguageModel(LMConfig(**SMALL))
    a, b, c = lm.init(0), lm.init(0), lm.init(1)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b)))
    assert not bool(jnp.all(a["head"] == c["head"]))


def test_causal_future_tokens_do_not_change_past_logits():
    lm = LanguageModel(LMConfig(**SMALL))
    params = lm.init(0)
    tokens = _tokens()
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 256)
    a, _ = lm.apply(params, tokens)
    b, _ = lm.apply(params, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("experts", [0, 4])
def test_scanned_layers_compute_the_same_function(experts):
    unrolled = LanguageModel(LMConfig(**SMALL, num_experts=experts))
    scanned = LanguageModel(LMConfig(**SMALL, num_experts=experts, scan_layers=True))
    params = unrolled.init(3)
    blocks = [params["blocks"][i] for i in range(SMALL["num_layers"])]
    stacked = {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned.abstract_params)
    a, aux_a = unrolled.apply(params, _tokens())
    b, aux_b = scanned.apply(stacked, _tokens())
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(aux_a, aux_b, rtol=1e-5)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_moe_matches_a_numpy_float64_reference():
    cfg = LMConfig(**SMALL, num_experts=4, top_k=2)
    moe = MoeMlp(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model), jnp.float32)
    out, aux, _ = moe(x)
    xs = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    router, wi, wo = (np.asarray(p[...], np.float64) for p in (moe.router, moe.wi, moe.wo))
    logits = xs @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.zeros_like(xs)
    counts = np.zeros(4)
    for t in range(xs.shape[0]):
        top = np.argsort(-probs[t])[:2]
        gates = probs[t, top] / probs[t, top].sum()
        for g, e in zip(gates, top, strict=True):
            expected[t] += g * (_gelu(xs[t] @ wi[e]) @ wo[e])
            counts[e] += 1
    np.testing.assert_allclose(
        np.asarray(out).reshape(-1, cfg.d_model), expected, rtol=1e-4, atol=1e-5
    )
    fraction = counts / (xs.shape[0] * 2)
    np.testing.assert_allclose(float(aux), 4 * np.sum(fraction * probs.mean(0)), rtol=1e-5)


def test_bfloat16_compute_with_float32_params():
    lm = LanguageModel(LMConfig(**SMALL, dtype="bfloat16"))
    params = lm.init(0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _ = lm.apply(params, _tokens())
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    grads = jax.grad(lambda p: lm.apply(p, _tokens())[0].mean())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_sequence_longer_than_max_len_is_rejected():
    lm = LanguageModel(LMConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        lm.apply(lm.init(0), _tokens(shape=(1, 17)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "num_heads": 4}, "divisible by `num_heads`"),
        ({"num_layers": 0}, "`num_layers` must be a positive int"),
        ({"num_experts": -1}, "`num_experts` must be >= 0"),
        ({"num_experts": 2, "top_k": 3}, "`top_k` must be in"),
        ({"dtype": "float16"}, "`dtype` must be"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**{**SMALL, **kwargs})
