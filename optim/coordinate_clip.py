"""Coordinate-wise clipping: pull the globally largest fraction of coordinates down to the next one.

Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers",
https://arxiv.org/abs/2306.00204 (2023). Only a small fraction of coordinates causes SGD's bad
directional sharpness; clipping exactly those makes SGD behave much more like Adam.

The threshold is a global order statistic over every leaf of the tree. It is found exactly by a
radix selection on the bit patterns of ``|x|`` (which order like the values), 16 bits per pass:
for float32 (and bfloat16/float16, whose values float32 holds exactly) pass one histograms the
high 16 bits, pass two the low 16 bits of the coordinates in the chosen high bin; for float64
four passes walk the 64-bit patterns the same way, so a float64 threshold is exact too. Each
pass reads the tree once and reduces a 65,536-bin histogram; under ``jit`` with
sharded inputs XLA reduces the histograms across devices (no gradient is gathered, whichever
axis of a leaf is sharded), and inside ``shard_map`` the histograms are ``psum``-ed over
``axis_name``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim.explicit_sharding import replicated_like
from optim.hyperparams import check_range, is_concrete_number
from optim.moments import compute_dtype, reject_complex

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


def _unsigned(dtype: Any) -> Any:
    return jnp.uint64 if jnp.dtype(dtype).itemsize == 8 else jnp.uint32


def _abs_bits(x: jax.Array, dtype: Any) -> jax.Array:
    magnitude = jnp.abs(x.astype(dtype))
    return jax.lax.bitcast_convert_type(magnitude, _unsigned(dtype))


def _histogram(keys: jax.Array, weights: jax.Array | None) -> jax.Array:
    # keys keep the leaf's shape (no reshape(-1)): a leaf sharded along any axis is histogrammed
    # shard by shard and only the histogram is reduced; flattening one sharded along a later
    # axis would gather it first
    keys = keys.astype(jnp.int32)
    ones = jnp.ones_like(keys) if weights is None else weights
    # on an Explicit mesh: each device histograms its shard, the result is all-reduced
    return jnp.zeros(_BINS, jnp.int32).at[keys].add(ones, out_sharding=replicated_like(keys))


def _select_bin(hist: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The bin holding the ``rank``-th largest key (1-based), and that rank inside the bin."""
    at_or_above = jnp.cumsum(hist[::-1])[::-1]  # at_or_above[d] = #keys >= d
    chosen = jnp.sum(at_or_above >= rank).astype(jnp.int32) - 1
    above = jnp.where(chosen + 1 < _BINS, at_or_above[jnp.minimum(chosen + 1, _BINS - 1)], 0)
    return jnp.maximum(chosen, 0), rank - above


def top_fraction_threshold(
    tree: Any, fraction: float | jax.Array, *, axis_name: str | None = None
) -> jax.Array:
    """The ``(floor(fraction * N) + 1)``-th largest ``|x|`` over all ``N`` coordinates.

    Returns 0 when that rank exceeds ``N`` (``fraction == 1``). Exact: ties and repeated values
    are counted as in a sort. NaNs count as larger than every number. The result's dtype is
    ``promote_types(float32, *leaf dtypes)``: float64 when a leaf is float64, else float32.

    Args:
      tree: a pytree of arrays.
      fraction: in [0, 1]; a concrete number gives an exact integer rank, a traced one computes
        ``floor(fraction * N)`` in the result's dtype.
      axis_name: inside ``shard_map``, the mesh axis over which every leaf is split; histograms
        and the coordinate count are summed over it. None under plain ``jit``.
    """
    leaves = [x for x in jax.tree.leaves(tree) if x.size]
    dtype = compute_dtype(*(x.dtype for x in leaves))
    local = sum(x.size for x in leaves)
    if axis_name is None:
        total = jnp.asarray(local, jnp.int32)
    else:
        total = jax.lax.psum(jnp.asarray(local, jnp.int32), axis_name)
    if is_concrete_number(fraction) and axis_name is None:
        rank = jnp.asarray(math.floor(float(fraction) * local) + 1, jnp.int32)
    else:
        frac = jnp.asarray(fraction).astype(dtype)
        rank = jnp.floor(frac * total.astype(dtype)).astype(jnp.int32) + 1
    if not leaves:
        return jnp.zeros((), dtype)

    def reduce(hist):
        return hist if axis_name is None else jax.lax.psum(hist, axis_name)

    # Most significant digit first: each pass histograms the next 16 bits of the coordinates
    # whose higher bits equal the prefix chosen so far, and extends the prefix by one digit.
    unsigned = _unsigned(dtype)
    width = 8 * jnp.dtype(dtype).itemsize
    bits = [_abs_bits(x, dtype) for x in leaves]
    prefix, rank_left = jnp.zeros((), unsigned), rank
    for shift in range(width - _DIGIT_BITS, -1, -_DIGIT_BITS):
        top = shift == width - _DIGIT_BITS

        def weights(b, shift=shift, top=top, prefix=prefix):
            return None if top else ((b >> (shift + _DIGIT_BITS)) == prefix).astype(jnp.int32)

        hist = reduce(sum(_histogram((b >> shift) & (_BINS - 1), weights(b)) for b in bits))
        digit, rank_left = _select_bin(hist, rank_left)
        prefix = (prefix << _DIGIT_BITS) | digit.astype(unsigned)
    threshold = jax.lax.bitcast_convert_type(prefix, dtype)
    return jnp.where(rank > total, jnp.zeros((), dtype), threshold)


def clip_top(
    tree: Any,
    fraction: float | jax.Array,
    threshold_scale: float | jax.Array = 1.0,
    *,
    axis_name: str | None = None,
) -> Any:
    r"""Clips the globally largest ``fraction`` of coordinates of ``tree`` (Pan & Li's operator).

    With :math:`a` all :math:`|x|` of every leaf (:math:`N` of them),
    :math:`\theta` = the :math:`(\lfloor cN\rfloor + 1)`-th largest of :math:`a` (0 if
    :math:`c = 1`) and :math:`t = s\,\theta`:

    .. math:: x \leftarrow \operatorname{sign}(x)\, t \quad \text{wherever } |x| \ge t

    so the top :math:`\lfloor cN \rfloor` coordinates are pulled down to the next magnitude
    (:math:`s = 1`). :math:`c = 0` is the identity.

    Args:
      tree: a pytree of arrays (gradients or updates).
      fraction: :math:`c \in [0, 1]`.
      threshold_scale: :math:`s \ge 0`.
      axis_name: see :func:`top_fraction_threshold`.

    Returns:
      The clipped tree, with the input dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> clip_top({"a": jnp.array([1.0, -5.0, 3.0]), "b": jnp.array([2.0])}, 0.25)
      {'a': Array([ 1., -3.,  3.], dtype=float32), 'b': Array([2.], dtype=float32)}
    """
    if is_concrete_number(fraction) and float(fraction) == 0.0:
        return tree
    threshold = top_fraction_threshold(tree, fraction, axis_name=axis_name)
    limit = threshold * jnp.asarray(threshold_scale).astype(threshold.dtype)
    identity = jnp.asarray(fraction) == 0

    def clip(x):
        dtype = compute_dtype(x.dtype, limit.dtype)
        xc, t = x.astype(dtype), limit.astype(dtype)
        clipped = jnp.where(jnp.abs(xc) >= t, jnp.sign(xc) * t, xc)
        return jnp.where(identity, xc, clipped).astype(x.dtype)

    return jax.tree.map(clip, tree)


def coordinate_clip(
    fraction: float | jax.Array,
    threshold_scale: float | jax.Array = 1.0,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    r"""A stateless optax transform applying :func:`clip_top` to whatever passes through it.

    Placed first in a chain it clips gradients (the authors' placement for SGD with momentum,
    signSGD and Lion); placed last it clips the final update direction. A fixed threshold is
    ``optax.clip``; this one is the global top-``fraction`` order statistic.

    Args:
      fraction: :math:`c \in [0, 1]` (required: it has no canonical default).
      threshold_scale: :math:`s \ge 0`, the threshold multiplier.
      axis_name: see :func:`top_fraction_threshold`.

    Raises:
      ValueError: a concrete argument out of range (the message names it).
      TypeError: complex params (at ``init``): magnitudes of complex numbers are not ordered
        like the real coordinates this operator clips.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(coordinate_clip(0.01), optax.sgd(0.1, momentum=0.9))
      >>> state = tx.init({"w": jnp.zeros(4)})

    References:
      Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers,
      https://arxiv.org/abs/2306.00204, 2023.
    """
    check_range("fraction", fraction, 0.0, 1.0)
    check_range("threshold_scale", threshold_scale, 0.0)

    def init_fn(params):
        reject_complex(params, "coordinate_clip")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return clip_top(updates, fraction, threshold_scale, axis_name=axis_name), state

    return optax.GradientTransformation(init_fn, update_fn)
