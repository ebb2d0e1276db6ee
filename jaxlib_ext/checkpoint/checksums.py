"""Checksums of arrays' logical bytes that do not depend on how the arrays are sharded.

A checkpoint records one per leaf and checks it on restore. Both sums wrap modulo 2**32, so the
order of addition does not matter: the same array gives the same checksum on one device, on a
mesh of 8 or spread over several processes, and each device only sums its own shard (the tests
check the compiled program: nothing of the leaf's size is moved or stored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logical_words(x: jax.Array) -> jax.Array:
    """The logical bytes of ``x`` as uint32 words, in ``x``'s shape (8-byte types: a trailing
    axis of 2 halves)."""
    width = x.dtype.itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if width == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if width == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


@jax.jit
def checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per leaf, two uint32 sums over its logical bytes: plain, and weighted by each word's
    row-major position ``i`` with ``i % 65521 + 1``.

    Integer sums wrap identically in any order, so the value does not depend on the sharding,
    device count or process count the array lives on. Positions come from iotas over the
    leaf's own shape (no reshape), so every device sums its own shard: nothing is gathered,
    and nothing of the leaf's size is stored (checked by the tests on the compiled program).
    """
    out = []
    for x in leaves:
        words = logical_words(x)
        position = jnp.zeros(words.shape, jnp.uint32)
        stride = 1
        for dim in reversed(range(words.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim)
            position = position + iota * jnp.uint32(stride % 2**32)
            stride *= words.shape[dim]
        weights = position % jnp.uint32(65521) + 1
        zero = jnp.uint32(0)
        sums = jax.lax.reduce(  # one variadic reduce: XLA fuses it, no word array is stored
            (words, words * weights),
            (zero, zero),
            lambda a, b: (a[0] + b[0], a[1] + b[1]),
            tuple(range(words.ndim)),
        )
        out.append(jnp.stack(sums))
    return out


def checksum_strings(leaves: list[jax.Array]) -> list[str]:
    """:func:`checksums` as 16 hex digits per leaf, the form a checkpoint manifest records.

    Example:
      >>> import jax.numpy as jnp
      >>> checksum_strings([jnp.arange(3, dtype=jnp.int32)])
      ['0000000300000008']
    """
    sums = jax.device_get(checksums(leaves))
    return [f"{int(a):08x}{int(b):08x}" for a, b in sums]


__all__ = ["checksum_strings", "checksums", "logical_words"]
