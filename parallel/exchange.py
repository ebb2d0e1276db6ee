"""The mean of per-replica arrays over a replica mesh axis, exchanged in low precision.

Used inside ``jax.shard_map`` (the replica axis manual), where every device holds its shard of
its replica's arrays. :func:`replica_mean` returns the mean over the ``M`` replicas, identical on
all of them:

* ``"fp32"``: one ``psum`` (all-reduce) of the arrays as they are, in their compute dtype.
* ``"bf16" | "int8" | "e3m0"``: a quantized all-reduce in two phases, written so that only
  the quantized bytes cross the replica axis: the device's arrays are flattened into one bucket,
  padded and cut into ``M`` chunks; every chunk is quantized (:mod:`parallel.quantize`) and an
  ``all_to_all`` sends chunk ``r`` to replica ``r``; replica ``r`` dequantizes the ``M`` chunks
  it received and averages them in float32 (or the input's wider dtype); the averaged chunk is
  quantized again and ``all_gather``-ed, so every replica decodes the same codes and holds the
  same mean. Each value is quantized twice (once as it is sent, once as an average).

Wire bytes per device for ``n`` local elements (padded to ``n'``, a multiple of ``M`` times the
format's block), with ``b`` the bytes per element of the format and ``s`` its scale bytes per
element (:func:`parallel.quantize.payload_bytes`):

* fp32 all-reduce: ``2 (M - 1) / M * 4 n``;
* quantized: ``all_to_all`` + ``all_gather`` = ``2 (M - 1) / M * (b + s) n'``; for e3m0 with a
  256-element block, ``b + s = 0.5 + 4 / 256``: 1/8 of fp32 plus the scales.

With ``M = 1`` nothing is exchanged and nothing is quantized: the mean is the array itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from parallel.quantize import Quantized, block_multiple, dequantize, payload_bytes, quantize


def compute_dtype(dtype: Any) -> jnp.dtype:
    """``promote_types(dtype, float32)`` for floating dtypes, also under strict promotion:
    bfloat16/float16 compute in float32, float32 and float64 stay as they are."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def padded_length(n: int, fmt: str, num_replicas: int, block_size: int = 256) -> int:
    """The bucket length that :func:`replica_mean` pads ``n`` local elements to."""
    if fmt == "fp32" or num_replicas == 1:
        return n
    unit = num_replicas * block_multiple(fmt, block_size)
    return -(-n // unit) * unit


def exchange_wire_bytes(n: int, fmt: str, num_replicas: int, block_size: int = 256) -> float:
    """Bytes one device sends (= receives) in :func:`replica_mean` of ``n`` local elements of
    float32 (the ring / pairwise formulas of :mod:`jaxlib_ext.costs`)."""
    m = num_replicas
    if m == 1:
        return 0.0
    if fmt == "fp32":
        return 2 * (m - 1) / m * 4 * n
    padded = padded_length(n, fmt, m, block_size)
    return 2 * (m - 1) / m * payload_bytes(padded, fmt, block_size=block_size)


def replica_mean(
    arrays: Sequence[jax.Array],
    *,
    axis_name: str,
    num_replicas: int,
    fmt: str = "fp32",
    block_size: int = 256,
) -> list[jax.Array]:
    """The mean over ``axis_name`` of every array, exchanged in ``fmt``; call inside
    ``shard_map`` with ``axis_name`` manual.

    Args:
      arrays: this device's arrays (any shapes, floating dtypes).
      axis_name: the replica mesh axis.
      num_replicas: its size ``M``.
      fmt: ``"fp32"`` (exact, an all-reduce), ``"bf16"``, ``"int8"`` or ``"e3m0"``.
      block_size: elements per quantization scale (int8, e3m0).

    Returns:
      The means, in ``promote_types(dtype, float32)`` of each array. Non-finite values are never
      hidden: a NaN or Inf in any replica's array makes the mean non-finite (for int8/e3m0, the
      whole quantization block becomes NaN).
    """
    arrays = list(arrays)
    dtypes = [compute_dtype(x.dtype) for x in arrays]
    if num_replicas == 1 or fmt == "fp32":  # with one replica: nothing moves, nothing rounds
        return [jax.lax.pmean(x.astype(d), axis_name) for x, d in zip(arrays, dtypes, strict=True)]
    compute = max(dtypes, key=lambda d: d.itemsize)
    sizes = [math.prod(x.shape) for x in arrays]
    bucket = jnp.concatenate([x.astype(compute).reshape(-1) for x in arrays])
    n = bucket.shape[0]
    padded = padded_length(n, fmt, num_replicas, block_size)
    chunks = jnp.pad(bucket, (0, padded - n)).reshape(num_replicas, -1)

    def send(q: Quantized, collective) -> Quantized:
        # bfloat16 travels as its 16 bits (XLA:CPU would widen a bf16 collective to f32)
        wire = lambda a: (
            jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a
        )
        back = lambda a, like: (
            jax.lax.bitcast_convert_type(a, like.dtype) if a.dtype != like.dtype else a
        )
        parts = [back(collective(wire(a)), a) if a.size else a for a in q]
        return Quantized(*parts)

    to_owner = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
    received = send(quantize(chunks, fmt, block_size=block_size), to_owner)
    mean = jnp.mean(dequantize(received, fmt, block_size=block_size, dtype=compute), axis=0)
    gather = lambda a: jax.lax.all_gather(a, axis_name, axis=0, tiled=True, to="invarying")
    averaged = send(quantize(mean[None], fmt, block_size=block_size), gather)
    full = dequantize(averaged, fmt, block_size=block_size, dtype=compute).reshape(-1)[:n]
    out, start = [], 0
    for x, size, d in zip(arrays, sizes, dtypes, strict=True):
        out.append(full[start : start + size].reshape(x.shape).astype(d))
        start += size
    return out
