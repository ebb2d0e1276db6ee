"""A small decoder-only language model in Flax NNX, with logical axis names on every parameter.

The reference model of the library's tests, benchmarks and demo: pre-norm transformer blocks
(RMSNorm, causal multi-head attention, GELU MLP or a top-k mixture-of-experts MLP), learned position
embeddings and an untied output head. Options: ``scan_layers`` stacks the blocks' parameters along
a leading ``layers`` axis and runs them with ``nnx.scan`` (one compiled block); ``num_experts > 0``
replaces the MLPs with MoE MLPs whose experts are computed densely (every token through every
expert, weighted by the router's renormalised top-k gates): the plain reference that the expert-
parallel strategies of :mod:`parallel.moe` are checked against; ``LanguageModel(config,
moe_strategy=...)`` runs them under one of those strategies instead (ep, fsdp or fssdp).

Every parameter is an ``nnx.Param`` with ``logical_axes`` metadata, e.g. ``("embed", "mlp")``.
:class:`LanguageModel` gives the functional view used everywhere else: parameters are a plain nested
dict of arrays, ``apply(params, tokens)`` is pure, and ``logical_axes`` has the structure of the
parameters with a tuple of axis names at each leaf (for :func:`parallel.rules.tree_shardings`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from parallel.moe.routing import load_balancing_loss, route

_STACK_METADATA = {nnx.PARTITION_NAME: "layers", "logical_axes": "layers"}
ACTIVATION_AXES = ("batch", "seq", "embed")
"""Logical axes of the residual stream ``[B, T, d_model]`` at every block boundary."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shape and options of the reference LM.

    Attributes:
      vocab_size: token vocabulary (256 for bytes).
      d_model: residual width; must be divisible by ``num_heads``.
      num_layers: transformer blocks.
      num_heads: attention heads.
      d_ff: hidden width of the MLP (of each expert for MoE).
      max_len: longest sequence (size of the position table).
      num_experts: 0 for dense MLPs, else the experts of every MoE MLP.
      top_k: experts per token (MoE only).
      router_aux_weight: weight of the load-balancing loss (MoE only).
      scan_layers: stack the blocks and run them with ``nnx.scan``.
      dtype: compute dtype of activations and matmuls (``"float32"`` or ``"bfloat16"``).
      param_dtype: dtype the parameters are stored in.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    num_experts: int = 0
    top_k: int = 2
    router_aux_weight: float = 0.01
    scan_layers: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {name}={value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"`d_model` must be divisible by `num_heads`, got d_model={self.d_model}, "
                f"num_heads={self.num_heads}"
            )
        if self.num_experts < 0:
            raise ValueError(f"`num_experts` must be >= 0, got num_experts={self.num_experts}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"`top_k` must be in [1, num_experts={self.num_experts}], got top_k={self.top_k}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(
                    f"`{name}` must be 'float32' or 'bfloat16', got {name}={getattr(self, name)!r}"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _param(rngs: nnx.Rngs, shape, axes, fan_in: int | None, dtype) -> nnx.Param:
    """A normal(0, 1/sqrt(fan_in)) parameter (0.02 when ``fan_in`` is None) named by ``axes``."""
    std = 0.02 if fan_in is None else fan_in**-0.5
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: LMConfig):
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype), logical_axes=("embed",))
        self.dtype = cfg.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(d)) v with a causal mask; ``[B, T, H, D]`` in and out.

    Scores and softmax in float32 whatever the input dtype. (``jax.nn.dot_product_attention``
    computes the same, but its gradient mixes bfloat16 and float32 implicitly, which fails under
    ``jax_numpy_dtype_promotion="strict"``.)
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    length = q.shape[1]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
    def __init__(self, cfg: LMConfig, rngs: nnx.Rngs, constrain):
        self.constrain = constrain
        d, h, k, dt = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.param_dtype
        # 2-D kernels (heads x head_dim merged on one axis), as matrix-based optimizers expect
        self.wq = _param(rngs, (d, h * k), ("embed", "heads"), d, dt)
        self.wk = _param(rngs, (d, h * k), ("embed", "heads"), d, dt)
        self.wv = _param(rngs, (d, h * k), ("embed", "heads"), d, dt)
        self.wo = _param(rngs, (h * k, d), ("heads", "embed"), d * 2 * cfg.num_layers, dt)
        self.num_heads = h
        self.dtype = cfg.dtype

    def __call__(self, x):
        w = lambda p: p[...].astype(self.dtype)
        b, t, _ = x.shape

        def heads(p):
            split = (x @ w(p)).reshape(b, t, self.num_heads, -1)
            return self.constrain(split, ("batch", "seq", "heads", "kv"))

        q, k, v = heads(self.wq), heads(self.wk), heads(self.wv)
        out = causal_attention(q, k, v)
        return out.reshape(b, t, -1) @ w(self.wo)


class Mlp(nnx.Module):
    def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
        d, f, dt = cfg.d_model, cfg.d_ff, cfg.param_dtype
        self.wi = _param(rngs, (d, f), ("embed", "mlp"), d, dt)
        self.wo = _param(rngs, (f, d), ("mlp", "embed"), f * 2 * cfg.num_layers, dt)
        self.dtype = cfg.dtype

    def __call__(self, x, moe_state=None):
        del moe_state
        h = jax.nn.gelu(x @ self.wi[...].astype(self.dtype))
        return h @ self.wo[...].astype(self.dtype), jnp.zeros((), jnp.float32), None


class MoeMlp(nnx.Module):
    """Top-k routed experts: computed densely (the reference), or by a sharded strategy.

    ``gates = softmax(x @ router)``; the top-k gates of each token are renormalised to sum to 1
    (:func:`parallel.moe.route`); ``y = sum_e gate_e * expert_e(x)``. The load-balancing loss is
    Switch-Transformer style: ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k
    assignments to expert ``e`` and ``P_e`` its mean router probability (1 when balanced).

    Without a ``strategy`` every token goes through every expert, weighted by its combine
    weights (zero outside its top-k): the plain reference the sharded strategies must match.
    With a :class:`parallel.moe.MoeStrategy`, the experts run as it says (ep, fsdp or fssdp)
    from the layer's :class:`parallel.moe.MoeLayerState` and return its stats.
    """

    def __init__(self, cfg: LMConfig, rngs: nnx.Rngs, strategy=None):
        d, f, e, dt = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.param_dtype
        self.router = _param(rngs, (d, e), ("embed", "expert"), d, dt)
        self.wi = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), d, dt)
        self.wo = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), f * 2 * cfg.num_layers, dt)
        self.top_k, self.num_experts, self.dtype = cfg.top_k, e, cfg.dtype
        self.strategy = strategy

    def __call__(self, x, moe_state=None):
        routing = route(x, self.router[...], self.top_k)
        aux = load_balancing_loss(routing)
        if self.strategy is not None:
            if moe_state is None:
                moe_state = self.strategy.init_layer_state(self.num_experts)
            out, stats = self.strategy.layer(
                x, routing, self.wi[...], self.wo[...], moe_state, self.dtype
            )
            return out, aux, stats
        assigned = jax.nn.one_hot(routing.experts, self.num_experts, dtype=jnp.float32)
        combine = jnp.einsum("btk,btke->bte", routing.gates, assigned)
        h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, self.wi[...].astype(self.dtype)))
        y = jnp.einsum("btef,efd->bted", h, self.wo[...].astype(self.dtype))
        out = jnp.einsum("bte,bted->btd", combine.astype(self.dtype), y)
        return out, aux, None


def _no_constraint(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    del logical_axes
    return x


class Block(nnx.Module):
    def __init__(self, cfg: LMConfig, rngs: nnx.Rngs, constrain=_no_constraint, strategy=None):
        self.constrain = constrain
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs, constrain)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MoeMlp(cfg, rngs, strategy) if cfg.num_experts else Mlp(cfg, rngs)

    def __call__(self, x, moe_state=None):
        """``(x, aux_loss, moe_stats)``; ``moe_stats`` is None unless the MLP has a strategy."""
        x = self.constrain(x, ACTIVATION_AXES)
        x = x + self.attn(self.attn_norm(x))
        y, aux, stats = self.mlp(self.mlp_norm(x), moe_state)
        return x + y, aux, stats


class TransformerLM(nnx.Module):
    """The NNX module: ``model(tokens, moe_state=None) -> (logits [B, T, V] float32, aux_loss,
    moe_stats)``; ``moe_state``/``moe_stats`` are per-layer dicts ``{i: {"mlp": ...}}`` when the
    MoE layers run under a strategy (unrolled layers only), else None."""

    def __init__(self, cfg: LMConfig, rngs: nnx.Rngs, constrain=_no_constraint, strategy=None):
        d, dt = cfg.d_model, cfg.param_dtype
        self.cfg = cfg
        self.constrain = constrain
        self.embed = _param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), None, dt)
        self.position = _param(rngs, (cfg.max_len, d), ("position", "embed"), None, dt)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK_METADATA)
            def stacked(rngs):
                return Block(cfg, rngs, constrain)

            self.blocks = stacked(rngs)
        else:
            blocks = [Block(cfg, rngs, constrain, strategy) for _ in range(cfg.num_layers)]
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(cfg)
        self.head = _param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), d, dt)

    def __call__(self, tokens, moe_state=None):
        cfg = self.cfg
        if tokens.shape[-1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds max_len={cfg.max_len}")
        # Both tables are gathered over their FSDP-sharded embed dimension before use, as every
        # FSDP weight is: their gradients are then summed over the batch as [V, D] and [T, D]
        # and reduce-scattered. Left to XLA, the [B, T, D] activation gradient itself was
        # resharded from batch- to embed-sharding for the lookup's scatter-add (an "[SPMD]
        # Involuntary full rematerialization" of the whole activation on 2 x 4 meshes).
        table = self.constrain(self.embed[...], ("vocab", None))
        position = self.constrain(self.position[...], ("position", None))
        x = table[tokens] + position[: tokens.shape[-1]]
        x = x.astype(cfg.dtype)
        aux = jnp.zeros((), jnp.float32)
        if cfg.scan_layers:

            @nnx.scan(
                in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=_STACK_METADATA
            )
            def run(carry, block):
                x, aux = carry
                x, block_aux, _ = block(x)
                return x, aux + block_aux

            x, aux = run((x, aux), self.blocks)
            stats = None
        else:
            stats = {}
            for i, block in enumerate(self.blocks):
                layer_state = None if moe_state is None else moe_state[i]["mlp"]
                x, block_aux, layer_stats = block(x, layer_state)
                aux = aux + block_aux
                stats[i] = {"mlp": layer_stats}
            stats = stats if cfg.num_experts and stats[0]["mlp"] is not None else None
        logits = self.final_norm(x) @ self.head[...].astype(cfg.dtype)
        return logits.astype(jnp.float32), aux / cfg.num_layers, stats


def _is_param(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class LanguageModel:
    """The functional view of :class:`TransformerLM`: plain-dict parameters and a pure ``apply``.

    Example:
      >>> lm = LanguageModel(LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16))
      >>> params = lm.init(seed=0)
      >>> logits, aux = lm.apply(params, jnp.zeros((2, 16), jnp.int32))
      >>> logits.shape
      (2, 16, 256)
      >>> lm.logical_axes["blocks"][0]["mlp"]["wi"]
      ('embed', 'mlp')
    """

    def __init__(self, config: LMConfig, *, activation_sharding=None, moe_strategy=None):
        """Args:
        config: the model's shape and options.
        activation_sharding: optional ``f(x, logical_axes) -> x`` applied to the residual
          stream at every block boundary (logical axes :data:`ACTIVATION_AXES`), e.g.
          :func:`parallel.rules.activation_constraint`, to pin activations to the batch
          sharding instead of leaving the choice to XLA's propagation.
        moe_strategy: optional :class:`parallel.moe.MoeStrategy` (ep, fsdp or fssdp) that runs
          the MoE layers instead of the dense reference; needs ``num_experts > 0`` and
          ``scan_layers=False``. Its per-layer state comes from :meth:`init_moe_state` and goes
          through :meth:`apply_moe`.

        Raises:
          ValueError: a strategy on a dense or scanned model, or one the experts do not fit.
        """
        if moe_strategy is not None:
            if not config.num_experts:
                raise ValueError("`moe_strategy` needs num_experts > 0, got num_experts=0")
            if config.scan_layers:
                raise ValueError("`moe_strategy` needs scan_layers=False, got scan_layers=True")
            moe_strategy.check(config.num_experts, config.top_k)
        self.config = config
        self.moe_strategy = moe_strategy
        self._constrain = activation_sharding or _no_constraint
        abstract = nnx.eval_shape(
            lambda: TransformerLM(config, nnx.Rngs(0), self._constrain, moe_strategy)
        )
        self._graphdef, self._template = nnx.split(abstract, nnx.Param)
        self.logical_axes = nnx.to_pure_dict(
            jax.tree.map(
                lambda v: v.get_metadata()["logical_axes"], self._template, is_leaf=_is_param
            )
        )
        self.abstract_params = nnx.to_pure_dict(self._template)

    def init(self, seed: int | jax.Array = 0) -> dict:
        """Fresh parameters (a nested dict of arrays). Jit it with ``out_shardings`` to shard."""
        model = TransformerLM(self.config, nnx.Rngs(seed), self._constrain, self.moe_strategy)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def apply(self, params: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(logits [B, T, vocab] float32, aux_loss)`` for int tokens ``[B, T]``; pure.

        Under a MoE strategy the experts are in the identity owner order with an empty load
        window (:meth:`apply_moe` takes the real state).
        """
        logits, aux, _ = self.apply_moe(params, tokens, None)
        return logits, aux

    def apply_moe(
        self, params: dict, tokens: jax.Array, moe_state: dict | None
    ) -> tuple[jax.Array, jax.Array, dict | None]:
        """``(logits, aux_loss, moe_stats)`` with the MoE layers' state from
        :meth:`init_moe_state` (stats: ``{"blocks": {i: {"mlp": MoeLayerStats}}}``, None for the
        dense reference)."""
        state = jax.tree.map(lambda v: v, self._template, is_leaf=_is_param)
        nnx.replace_by_pure_dict(state, params)
        blocks = None if moe_state is None else moe_state["blocks"]
        logits, aux, stats = nnx.merge(self._graphdef, state)(tokens, blocks)
        return logits, aux, None if stats is None else {"blocks": stats}

    def init_moe_state(self) -> dict | None:
        """The MoE layers' state under the strategy, ``{"blocks": {i: {"mlp": MoeLayerState}}}``
        (identity owner order, empty load window), or None without a strategy."""
        if self.moe_strategy is None:
            return None
        init = self.moe_strategy.init_layer_state
        layers = range(self.config.num_layers)
        return {"blocks": {i: {"mlp": init(self.config.num_experts)} for i in layers}}

    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))
