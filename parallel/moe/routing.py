"""Top-k routing of tokens to experts: the maths every MoE execution strategy shares.

``probs = softmax(x @ router)`` (float32); each token keeps its ``k`` most probable experts, whose
gates are renormalised to sum to 1. The dense reference (:class:`jaxlib_ext.model.MoeMlp`) and the
sharded strategies of :mod:`parallel.moe.strategy` call the same :func:`route`, so that "the same
routing" is a fact of the code, not a hope.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """The router's decision for a batch of tokens ``[..., d]``.

    Attributes:
      experts: ``[..., k]`` int32 canonical expert ids, most probable first.
      gates: ``[..., k]`` float32 weights of those experts, summing to 1 per token.
      probs: ``[..., E]`` float32 router probabilities (for the load-balancing loss).
    """

    experts: jax.Array
    gates: jax.Array
    probs: jax.Array


def route(x: jax.Array, router: jax.Array, top_k: int) -> Routing:
    """Routes tokens ``x [..., d]`` with router weights ``router [d, E]`` to ``top_k`` experts.

    Example:
      >>> r = route(jnp.ones((3, 4)), jnp.eye(4), top_k=2)
      >>> r.experts.shape, r.gates.sum(-1).tolist()
      ((3, 2), [1.0, 1.0, 1.0])
    """
    logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    return Routing(top_i.astype(jnp.int32), top_p / jnp.sum(top_p, -1, keepdims=True), probs)


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """Assignments per expert, ``[E]`` float32, from ``experts [..., k]`` (a token's top-k
    experts are distinct, so this is also the number of tokens each expert sees)."""
    flat = experts.reshape(-1)
    return jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.float32), axis=0)


def load_balancing_loss(routing: Routing) -> jax.Array:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` (1 when perfectly balanced):
    ``f_e`` the fraction of top-k assignments to expert ``e``, ``P_e`` its mean probability."""
    num_experts = routing.probs.shape[-1]
    top_k = routing.experts.shape[-1]
    assigned = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)
    lead = tuple(range(routing.probs.ndim - 1))
    fraction = jnp.mean(jnp.sum(assigned, axis=-2), axis=lead) / top_k
    return num_experts * jnp.sum(fraction * jnp.mean(routing.probs, axis=lead))
