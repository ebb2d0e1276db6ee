"""Low-bit codecs for exchanging outer gradients: bf16, int8 and 4-bit E3M0, with block scales.

Streaming DiLoCo (Douillard et al., *Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch*, https://arxiv.org/abs/2501.18512, 2025) sends the replicas' outer gradients
(pseudo-gradients) as 4-bit floats and accumulates them in float32 with no measurable loss. The
formats, for an array ``[..., n]`` cut into blocks of ``block_size`` consecutive elements along its
last axis (bytes per element at the default ``block_size = 256``):

======  ===============================================  ====================================  =====
format  payload per element                              scales                                bytes
======  ===============================================  ====================================  =====
fp32    the value in ``promote_types(dtype, float32)``   none                                  4
bf16    bfloat16                                         none                                  2
int8    ``round(x / s * 127)``, in ``[-127, 127]``       float32 ``s = max |x|`` per block     1.016
e3m0    1 sign and 3 exponent bits, no mantissa (4 b)    float32 ``s = max |x|`` per block     0.516
======  ===============================================  ====================================  =====

E3M0 codes ``c`` (4 bits, two per byte: ``byte = c[2i] | c[2i+1] << 4``): bit 3 is the sign,
bits 0-2 the exponent ``e``; ``e = 0`` is zero and ``e = 1..7`` is ``s * 2**(e - 7)``, so the
magnitudes are ``0, s/64, s/32, ..., s/2, s``. Encoding rounds ``|x|`` to the nearest of them in
linear scale, ties up (below ``s/128`` to zero; a negative value that rounds to zero is code 0):
relative error at most 1/3 above ``s/64``, absolute error at most ``s/128`` below. The rounding
compares ``|x|`` with the midpoints exactly (no division), so it is the exact nearest magnitude.

The maths runs in ``promote_types(dtype, float32)`` (bf16 in float32, float64 stays float64); the
scales are float32 (they go on the wire) and the encoder uses the same float32 scale as the decoder.

Non-finite values are never hidden: a block of int8 or e3m0 that holds a NaN or an Inf gets a NaN
scale (its codes are 0) and decodes to NaN, so callers detect a non-finite result after the
exchange; fp32 and bf16 carry NaN and Inf as they are.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("fp32", "bf16", "int8", "e3m0")


class Quantized(NamedTuple):
    """An encoded array ``[..., n]``.

    Attributes:
      payload: what goes on the wire, ``[..., n]`` in ``promote_types(dtype, float32)`` (fp32),
        bfloat16 or int8, or ``[..., n // 2]`` uint8 (e3m0, two codes a byte).
      scales: float32 per block, ``[..., n // block_size]``; empty ``[..., 0]`` for fp32 and bf16.
    """

    payload: jax.Array
    scales: jax.Array


def check_format(fmt: str) -> None:
    """Checks that ``fmt`` is one of :data:`FORMATS`.

    Raises:
      ValueError: ``fmt`` is not in :data:`FORMATS` (the message names ``fmt`` and its value).

    Example:
      >>> check_format("e3m0")
    """
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}, got fmt={fmt!r}")


def block_multiple(fmt: str, block_size: int) -> int:
    """The length granularity :func:`quantize` needs along the last axis.

    Args:
      fmt: one of :data:`FORMATS`.
      block_size: elements per scale; a positive int, even for e3m0 (validated for every format).

    Returns:
      1 for fp32 and bf16, ``block_size`` for int8 and e3m0.

    Raises:
      ValueError: an unknown ``fmt`` or a bad ``block_size``.

    Example:
      >>> block_multiple("e3m0", 256), block_multiple("bf16", 256)
      (256, 1)
    """
    check_format(fmt)
    integral = isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool)
    if not integral or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got block_size={block_size!r}")
    if fmt == "e3m0" and block_size % 2:
        raise ValueError(f"`block_size` must be even for e3m0, got block_size={block_size!r}")
    return int(block_size) if fmt in ("int8", "e3m0") else 1


def _check_length(n: int, fmt: str, block_size: int) -> None:
    if n % block_multiple(fmt, block_size):
        raise ValueError(
            f"`n` (the last axis) must be a multiple of block_size={block_size} for "
            f"fmt={fmt!r}, got n={n}"
        )


def payload_bytes(n: int, fmt: str, *, block_size: int = 256) -> int:
    """Exact bytes of ``payload`` and ``scales`` of :func:`quantize` for ``n`` float32 elements.

    Args:
      n: the number of elements, a multiple of :func:`block_multiple`.
      fmt: one of :data:`FORMATS`.
      block_size: elements per scale (int8, e3m0).

    Returns:
      ``4 n`` (fp32), ``2 n`` (bf16), ``n + 4 n / block_size`` (int8) or
      ``n / 2 + 4 n / block_size`` (e3m0).

    Raises:
      ValueError: a bad ``fmt`` or ``block_size``, or ``n`` negative or not a multiple.

    Example:
      >>> payload_bytes(1024, "e3m0"), payload_bytes(1024, "int8"), payload_bytes(1024, "fp32")
      (528, 1040, 4096)
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got n={n!r}")
    _check_length(n, fmt, block_size)
    scales = 4 * (n // block_size)
    return {"fp32": 4 * n, "bf16": 2 * n, "int8": n + scales, "e3m0": n // 2 + scales}[fmt]


def _compute_dtype(dtype) -> np.dtype:
    with jax.numpy_dtype_promotion("standard"):  # strict promotion refuses bf16 with float32
        return jnp.promote_types(dtype, jnp.float32)


def quantize(x: jax.Array, fmt: str, *, block_size: int = 256) -> Quantized:
    """Encodes ``x`` (``[..., n]``) in ``fmt``, in blocks of ``block_size`` along the last axis.

    Args:
      x: a floating array with at least one axis; ``n`` must be a multiple of
        :func:`block_multiple`. Leading axes are independent.
      fmt: one of :data:`FORMATS` (see the module docstring).
      block_size: elements per scale (int8, e3m0; even for e3m0).

    Returns:
      A :class:`Quantized`. For int8 and e3m0, a block with a NaN or Inf has a NaN scale.

    Raises:
      ValueError: an unknown ``fmt``, a bad ``block_size``, a scalar ``x`` or a last axis that is
        not a multiple.

    Example:
      >>> q = quantize(jnp.array([4.0, -2.0, 0.0, 0.0625], jnp.float32), "e3m0", block_size=4)
      >>> q.payload.tolist(), q.scales.tolist()
      ([231, 16], [4.0])
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"`x` must have at least one axis, got shape {x.shape}")
    *lead, n = x.shape
    _check_length(n, fmt, block_size)  # validates fmt and block_size
    compute = _compute_dtype(x.dtype)
    if fmt in ("fp32", "bf16"):
        payload = x.astype(compute if fmt == "fp32" else jnp.bfloat16)
        return Quantized(payload, jnp.zeros((*lead, 0), jnp.float32))
    blocks = x.astype(compute).reshape(*lead, n // block_size, block_size)
    finite = jnp.all(jnp.isfinite(blocks), axis=-1, keepdims=True)
    scale = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True).astype(jnp.float32)  # the wire's
    ok = finite & jnp.isfinite(scale)  # a float64 block above the float32 range is non-finite too
    scale = jnp.where(ok, scale, jnp.nan)
    s = jnp.where(ok & (scale > 0), scale, 1).astype(compute)  # the decoder's scale; 1 if unused
    v = jnp.where(ok, blocks, 0)  # a non-finite block encodes as codes 0 under its NaN scale
    if fmt == "int8":
        q = jnp.clip(jnp.round(v / s * 127), -127, 127).astype(jnp.int8)
        return Quantized(q.reshape(x.shape), scale[..., 0])
    # e3m0: e = how many midpoints |x| reaches; the midpoint below s 2**(e-7) is s 2**-7 for e = 1
    # and 0.75 m for m = s 2**(e-7), e >= 2, tested as |x| - m/2 >= m/4: the subtraction is exact
    # (Sterbenz) wherever the comparison is close, so nothing rounds (for s above ~2**-100).
    a = jnp.abs(v)
    e = (a >= s * 2.0**-7).astype(jnp.uint8)
    for k in range(2, 8):
        m = s * 2.0 ** (k - 7)
        e = e + (a - m / 2 >= m / 4).astype(jnp.uint8)
    sign = jnp.where((v < 0) & (e > 0), jnp.uint8(8), jnp.uint8(0))
    pairs = (e | sign).reshape(*lead, n // 2, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << jnp.uint8(4))
    return Quantized(packed, scale[..., 0])


def dequantize(
    q: Quantized, fmt: str, *, block_size: int = 256, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Decodes :func:`quantize`'s output, computing in ``promote_types(dtype, float32)``.

    int8 decodes as ``q * (s * (1 / 127))`` (``q s / 127`` in an order no backend rewrites), e3m0
    as ``sign * s * 2**(e - 7)`` (0 for ``e = 0``), exactly; a block with a NaN scale decodes to
    NaN, an all-zero block to exact zeros.

    Args:
      q: a :class:`Quantized` of :func:`quantize` with the same ``fmt`` and ``block_size``.
      fmt: one of :data:`FORMATS`.
      block_size: elements per scale (int8, e3m0).
      dtype: the dtype of the result.

    Returns:
      The decoded array ``[..., n]`` in ``dtype``.

    Raises:
      ValueError: a bad ``fmt`` or ``block_size``, or scales whose shape does not match the payload.

    Example:
      >>> q = quantize(jnp.array([4.0, -2.0, 0.0, 0.0625], jnp.float32), "e3m0", block_size=4)
      >>> dequantize(q, "e3m0", block_size=4).tolist()
      [4.0, -2.0, 0.0, 0.0625]
    """
    block_multiple(fmt, block_size)
    if fmt in ("fp32", "bf16"):
        return q.payload.astype(dtype)
    compute = _compute_dtype(dtype)
    *lead, n = q.payload.shape
    n = 2 * n if fmt == "e3m0" else n
    _check_length(n, fmt, block_size)
    if tuple(q.scales.shape) != (*lead, n // block_size):
        raise ValueError(
            f"`q.scales` must have shape {(*lead, n // block_size)} for n={n} and "
            f"block_size={block_size}, got shape {q.scales.shape}"
        )
    s = q.scales.astype(compute)[..., None]
    if fmt == "int8":
        values = q.payload.astype(compute)
    else:
        codes = jnp.stack([q.payload & jnp.uint8(15), q.payload >> jnp.uint8(4)], axis=-1)
        codes = codes.reshape(*lead, n)
        table = jnp.asarray([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], compute)  # exact
        magnitude = table[codes & jnp.uint8(7)]
        values = jnp.where(codes >= 8, -magnitude, magnitude)
    blocks = values.reshape(*lead, n // block_size, block_size)
    # int8: q * (s * (1/127)), a fixed order of two products (XLA turns "/ 127" into "* (1/127)")
    out = blocks * (s * (1 / 127)) if fmt == "int8" else blocks * s
    return out.reshape(*lead, n).astype(dtype)
