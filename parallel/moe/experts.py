"""The expert feed-forward network over rows grouped by the local expert slot they go to.

Every strategy ends in the same computation on each device: rows ``[R, d]`` (token copies), each
tagged with the local slot (an index into the expert weights the device holds) it must go through,
``y_r = gelu(x_r @ wi[s_r]) @ wo[s_r]``. The rows are sorted by slot and multiplied with
``jax.lax.ragged_dot`` (grouped matmul, no capacity, no padding); rows tagged with the slot
``num_slots`` (padding) are sorted last, belong to no group and come back as zeros.

On XLA:CPU ``ragged_dot`` costs about ``num_slots`` times the useful FLOPs (it is lowered densely),
so expert compute is *counted* in useful FLOPs (:func:`useful_flops`), never timed on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def grouped_ffn(
    rows: jax.Array,
    slots: jax.Array,
    wi: jax.Array,
    wo: jax.Array,
    dtype: jnp.dtype,
    *,
    name: str | None = None,
) -> jax.Array:
    """``gelu(rows @ wi[slot]) @ wo[slot]`` per row; rows with ``slot == wi.shape[0]`` give 0.

    Args:
      rows: ``[R, d]`` token rows.
      slots: ``[R]`` int32 local slot of each row, in ``[0, S]`` (``S`` = padding).
      wi: ``[S, d, f]`` and ``wo``: ``[S, f, d]`` the expert weights this device holds.
      dtype: compute dtype of the matmuls (the model's activation dtype).
      name: when given, the hidden pre-activation is tagged with ``checkpoint_name(name)``
        (what a re-materialization policy keeps).

    Example:
      >>> wi = jnp.ones((2, 3, 4)); wo = jnp.ones((2, 4, 3))
      >>> grouped_ffn(jnp.zeros((3, 3)), jnp.array([1, 2, 0]), wi, wo, jnp.float32).shape
      (3, 3)
    """
    num_slots = wi.shape[0]
    order = jnp.argsort(slots, stable=True)
    sizes = jnp.sum(jax.nn.one_hot(slots, num_slots, dtype=jnp.int32), axis=0)
    grouped = jnp.take(rows, order, axis=0).astype(dtype)
    hidden = jax.lax.ragged_dot(grouped, wi.astype(dtype), sizes)
    if name is not None:
        hidden = checkpoint_name(hidden, name)
    hidden = jax.nn.gelu(hidden)
    out = jax.lax.ragged_dot(hidden, wo.astype(dtype), sizes)
    return jnp.take(out, jnp.argsort(order), axis=0)


def useful_flops(rows: int | jax.Array, d_model: int, d_ff: int) -> int | jax.Array:
    """Forward FLOPs of ``rows`` token rows through one expert: two matmuls, ``4 d f`` each row."""
    return rows * 4 * d_model * d_ff
