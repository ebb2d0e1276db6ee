"""Low-bit codecs for exchanging outer gradients: bf16, int8 and 4-bit E3M0, with block scales.

Streaming DiLoCo (Douillard et al., *Streaming DiLoCo with overlapping communication*, arXiv
2501.18512, 2025) sends the replicas' outer gradients as 4-bit floats and accumulates them in
float32 with no measurable loss. The formats, for an array ``[..., n]`` cut into blocks of
``block_size`` consecutive elements along its last axis:

======  =====================================================  ==================================
format  payload per element                                    scales
======  =====================================================  ==================================
fp32    the value in ``promote_types(dtype, float32)``: 4 B     none
bf16    bfloat16: 2 B                                          none
int8    ``round(127 x / s)``: 1 B                              float32 ``s = max |x|`` per block
e3m0    1 sign and 3 exponent bits, no mantissa: 1/2 B         float32 ``s = max |x|`` per block
======  =====================================================  ==================================

E3M0 codes ``c`` (4 bits, two per byte: ``byte = c[2i] | c[2i+1] << 4``): bit 3 is the sign,
bits 0-2 the exponent ``e``; ``e = 0`` is zero and ``e = 1..7`` is ``s * 2**(e - 7)``, so the
magnitudes are ``0, s/64, s/32, ..., s/2, s``. Encoding rounds ``|x| / s`` to the nearest of them
(ties up): relative error at most 1/3 above ``s/64``, absolute error at most ``s/128`` below.

Non-finite values are never hidden: a block of int8 or e3m0 that holds a NaN or an Inf gets a
NaN scale and decodes to NaN; fp32 and bf16 carry NaN and Inf as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FORMATS = ("fp32", "bf16", "int8", "e3m0")


class Quantized(NamedTuple):
    """An encoded array. ``payload``: what goes on the wire; ``scales``: float32 per block
    (shape ``[..., n // block_size]``, empty ``[..., 0]`` for fp32 and bf16)."""

    payload: jax.Array
    scales: jax.Array


def check_format(fmt: str) -> None:
    """Raises ``ValueError`` naming ``fmt`` unless it is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}, got fmt={fmt!r}")


def block_multiple(fmt: str, block_size: int = 256) -> int:
    """The length granularity :func:`quantize` needs along the last axis.

    Example:
      >>> block_multiple("e3m0", 256), block_multiple("bf16", 256)
      (256, 1)
    """
    check_format(fmt)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got block_size={block_size!r}")
    if fmt == "e3m0" and block_size % 2:
        raise ValueError(f"`block_size` must be even for e3m0, got block_size={block_size}")
    return block_size if fmt in ("int8", "e3m0") else 1


def payload_bytes(n: int, fmt: str, *, block_size: int = 256) -> int:
    """Bytes of payload and scales of :func:`quantize` for ``n`` float32 elements.

    Example:
      >>> payload_bytes(1024, "e3m0"), payload_bytes(1024, "fp32")
      (528, 4096)
    """
    unit = block_multiple(fmt, block_size)
    if n % unit:
        raise ValueError(f"`n` must be a multiple of {unit} for {fmt}, got n={n}")
    per_element = {"fp32": 4, "bf16": 2, "int8": 1, "e3m0": 0.5}[fmt]
    scales = 4 * (n // block_size) if fmt in ("int8", "e3m0") else 0
    return int(n * per_element) + scales


def _compute_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def _blocks(x: jax.Array, fmt: str, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``x`` as ``[..., n / B, B]`` in its compute dtype and the block scales ``[..., n / B]``
    (NaN for a block holding a non-finite value)."""
    n = x.shape[-1]
    unit = block_multiple(fmt, block_size)
    if n % unit:
        raise ValueError(
            f"the last axis ({n=}) must be a multiple of block_size={block_size} for {fmt}"
        )
    blocks = x.astype(_compute_dtype(x.dtype)).reshape(*x.shape[:-1], n // block_size, block_size)
    finite = jnp.all(jnp.isfinite(blocks), axis=-1)
    scale = jnp.max(jnp.abs(jnp.where(jnp.isfinite(blocks), blocks, 0)), axis=-1)
    scale = jnp.where(finite, scale, jnp.nan)
    return blocks, scale


def _safe_ratio(blocks: jax.Array, scale: jax.Array) -> jax.Array:
    """``|x| / s`` per element, 0 where the block scale is 0."""
    s = scale.astype(blocks.dtype)[..., None]
    return jnp.abs(blocks) / jnp.where(s == 0, 1, s)


def quantize(x: jax.Array, fmt: str, *, block_size: int = 256) -> Quantized:
    """Encodes ``x`` (``[..., n]``) in ``fmt`` (see the module docstring).

    Args:
      x: a floating array; ``n`` must be a multiple of :func:`block_multiple`.
      fmt: one of :data:`FORMATS`.
      block_size: elements per scale (int8, e3m0; even for e3m0).

    Returns:
      A :class:`Quantized`: payload float (fp32), bfloat16, int8 or uint8 (e3m0, ``[..., n/2]``).

    Raises:
      ValueError: an unknown ``fmt``, a bad ``block_size`` or a length that is not a multiple.

    Example:
      >>> q = quantize(jnp.array([4.0, -2.0, 0.0, 0.0625]), "e3m0", block_size=4)
      >>> q.payload.tolist(), q.scales.tolist()
      ([231, 16], [4.0])
    """
    block_multiple(fmt, block_size)  # validates fmt and block_size
    empty = jnp.zeros((*x.shape[:-1], 0), jnp.float32)
    if fmt == "fp32":
        return Quantized(x.astype(_compute_dtype(x.dtype)), empty)
    if fmt == "bf16":
        return Quantized(x.astype(jnp.bfloat16), empty)
    blocks, scale = _blocks(x, fmt, block_size)
    ratio = _safe_ratio(blocks, scale)
    negative = blocks < 0
    if fmt == "int8":
        q = jnp.clip(jnp.round(ratio * 127), 0, 127).astype(jnp.int8)
        q = jnp.where(negative, -q, q).reshape(x.shape)
        return Quantized(q, scale.astype(jnp.float32))
    # e3m0: ratio in [2**(k-1), 2**k) -> 2**(k-1) or 2**k, whichever is nearer (ties up)
    mantissa, exponent = jnp.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [.5, 1)
    power = exponent - 1 + (mantissa >= 0.75).astype(exponent.dtype)  # nearest 2**power
    code = jnp.where(ratio >= 2.0**-7, jnp.clip(power + 7, 1, 7), 0).astype(jnp.uint8)
    sign = jnp.where(negative & (code > 0), 8, 0).astype(jnp.uint8)  # zero is always code 0
    code = (code | sign).reshape(x.shape)
    pairs = code.reshape(*x.shape[:-1], -1, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << jnp.uint8(4))
    return Quantized(packed, scale.astype(jnp.float32))


def dequantize(
    q: Quantized, fmt: str, *, block_size: int = 256, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Decodes :func:`quantize`'s output into ``dtype`` (``[..., n]``).

    Example:
      >>> q = quantize(jnp.array([4.0, -2.0, 0.0, 0.0625]), "e3m0", block_size=4)
      >>> dequantize(q, "e3m0", block_size=4).tolist()
      [4.0, -2.0, 0.0, 0.0625]
    """
    block_multiple(fmt, block_size)
    if fmt in ("fp32", "bf16"):
        return q.payload.astype(dtype)
    scale = q.scales.astype(dtype)[..., None]
    if fmt == "int8":
        values = q.payload.astype(dtype)
        blocks = values.reshape(*values.shape[:-1], -1, block_size)
        return (blocks * (scale / 127)).reshape(values.shape)
    low, high = q.payload & jnp.uint8(15), q.payload >> jnp.uint8(4)
    code = jnp.stack([low, high], axis=-1).reshape(*q.payload.shape[:-1], -1)
    exponent = (code & jnp.uint8(7)).astype(jnp.int32)
    table = jnp.asarray([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], dtype)  # exact powers
    magnitude = table[exponent]
    signed = jnp.where(code >= 8, -magnitude, magnitude).astype(dtype)
    blocks = signed.reshape(*signed.shape[:-1], -1, block_size)
    return (blocks * scale).reshape(signed.shape)
