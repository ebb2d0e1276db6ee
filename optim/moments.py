"""Moment buffers shared by the optimizers: dtype-explicit EMAs and float32 bias corrections.

Every function casts explicitly, so the optimizers work under
``jax_numpy_dtype_promotion="strict"`` and with bfloat16 params and float32 state alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def zeros_like(params: Any, dtype: Any = None) -> Any:
    """Zeros shaped like ``params`` (``ShapeDtypeStruct`` leaves too), in ``dtype`` if given."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype or p.dtype), params)


def ema(moment: jax.Array, value: jax.Array, decay: Any, order: int = 1) -> jax.Array:
    """``decay * moment + (1 - decay) * value**order`` in ``moment``'s dtype."""
    v = value.astype(moment.dtype)
    d = jnp.asarray(decay).astype(moment.dtype)
    return d * moment + (1 - d) * (v if order == 1 else v**order)


def tree_ema(moments: optax.Updates, values: optax.Updates, decay: Any, order: int = 1):
    """:func:`ema` over matching pytrees."""
    return jax.tree.map(lambda m, v: ema(m, v, decay, order), moments, values)


def bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` in float32."""
    return 1 - jnp.asarray(decay).astype(jnp.float32) ** count.astype(jnp.float32)
