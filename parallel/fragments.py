"""Fragments: the parameter groups that Streaming DiLoCo synchronizes one at a time.

A model's parameters are split into ``P`` fragments of transformer blocks (Douillard et al.,
*Streaming DiLoCo with overlapping communication*, arXiv 2501.18512, 2025, section 2.2):

* ``"strided"`` (the paper's default, slightly better): fragment ``p`` holds layers
  ``p, p + P, p + 2P, ...``;
* ``"sequential"``: fragment ``p`` holds a contiguous run of layers (as equal as possible).

Parameters outside the layer stack belong to a fragment too: the output side (``output_keys``,
by default the final norm and the head) goes with the fragment of the last layer, everything else
(embeddings, positions) with the fragment of the first layer.

Both model layouts are supported and give the same fragments: an *unrolled* stack
(``params["blocks"][i]``: a fragment takes whole leaves) and a *scanned* stack
(``params["blocks"]`` leaves with a leading ``[L, ...]`` layer axis: a fragment takes the rows of
its layers, so one leaf is split over all fragments). A fragment is plain static data (leaf
indices and row indices), computed from shapes only, so a jitted step can pick it by index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from parallel.rules import path_names

PATTERNS = ("strided", "sequential")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One leaf of the parameters, or some layer rows of a scanned leaf.

    Attributes:
      leaf: index of the leaf in ``jax.tree.leaves(params)``.
      path: the leaf's path, ``"blocks/0/attn/wq"`` (for reading).
      rows: the layer rows of a scanned ``[L, ...]`` leaf that belong here, or None for the
        whole leaf.
    """

    leaf: int
    path: str
    rows: tuple[int, ...] | None = None

    def shape(self, leaf_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of this piece of a leaf of ``leaf_shape``."""
        shape = tuple(leaf_shape)
        return shape if self.rows is None else (len(self.rows), *shape[1:])

    def take(self, x: Any, *, axis: int = 0) -> Any:
        """This piece of ``x`` (the leaf), rows taken along ``axis``."""
        if self.rows is None:
            return x
        return x[(slice(None),) * axis + (np.asarray(self.rows),)]

    def put(self, x: Any, value: Any, *, axis: int = 0) -> Any:
        """``x`` (the leaf) with this piece replaced by ``value``."""
        if self.rows is None:
            return value
        return x.at[(slice(None),) * axis + (np.asarray(self.rows),)].set(value)


@dataclasses.dataclass(frozen=True)
class Fragment:
    """The pieces of one fragment and the layers they come from."""

    index: int
    layers: tuple[int, ...]
    pieces: tuple[Piece, ...]

    def take(self, leaves: Sequence[Any], *, axis: int = 0) -> list[Any]:
        """The fragment's arrays from a list of leaves (``jax.tree.leaves(params)``)."""
        return [p.take(leaves[p.leaf], axis=axis) for p in self.pieces]

    def put(self, leaves: Sequence[Any], values: Sequence[Any], *, axis: int = 0) -> list[Any]:
        """``leaves`` with the fragment's pieces replaced by ``values``."""
        out = list(leaves)
        for piece, value in zip(self.pieces, values, strict=True):
            out[piece.leaf] = piece.put(out[piece.leaf], value, axis=axis)
        return out

    def size(self, leaves: Sequence[Any]) -> int:
        """Elements in the fragment (``leaves`` may be arrays or ``ShapeDtypeStruct``s)."""
        return sum(int(np.prod(p.shape(leaves[p.leaf].shape), dtype=np.int64)) for p in self.pieces)


def _layer_groups(num_layers: int, num_fragments: int, pattern: str) -> list[list[int]]:
    if pattern == "strided":
        return [list(range(p, num_layers, num_fragments)) for p in range(num_fragments)]
    bounds = np.linspace(0, num_layers, num_fragments + 1).round().astype(int)
    return [list(range(bounds[p], bounds[p + 1])) for p in range(num_fragments)]


def make_fragments(
    params: Any,
    num_fragments: int,
    pattern: str = "strided",
    *,
    layers_key: str = "blocks",
    output_keys: Sequence[str] = ("final_norm", "head"),
) -> tuple[Fragment, ...]:
    """Splits ``params`` into ``num_fragments`` fragments of layers (see the module docstring).

    Args:
      params: the parameters of ONE model copy (arrays or ``ShapeDtypeStruct``s), a nested dict
        whose ``layers_key`` entry is the layer stack: ``{0: {...}, 1: {...}}`` (unrolled) or a
        dict of ``[L, ...]`` arrays (scanned). Without such an entry each top-level entry counts
        as one "layer", in order.
      num_fragments: ``P >= 1``, at most the number of layers.
      pattern: ``"strided"`` (default) or ``"sequential"``.
      layers_key: the top-level key of the layer stack.
      output_keys: top-level keys that go with the last layer's fragment (the rest of the
        non-stack parameters go with the first layer's).

    Returns:
      ``P`` fragments; every element of ``params`` is in exactly one.

    Raises:
      ValueError: ``num_fragments`` below 1 or above the number of layers, an unknown
        ``pattern``, or scanned leaves whose leading (layer) dimensions differ.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"embed": jnp.zeros(4), "blocks": {i: {"w": jnp.zeros(2)} for i in range(4)},
      ...           "head": jnp.zeros(3)}
      >>> [f.layers for f in make_fragments(params, 2)]
      [(0, 2), (1, 3)]
      >>> [[p.path for p in f.pieces] for f in make_fragments(params, 2, "sequential")]
      [['blocks/0/w', 'blocks/1/w', 'embed'], ['blocks/2/w', 'blocks/3/w', 'head']]
    """
    if pattern not in PATTERNS:
        raise ValueError(f"`pattern` must be one of {PATTERNS}, got {pattern=}")
    if not isinstance(num_fragments, int) or num_fragments < 1:
        raise ValueError(f"`num_fragments` must be an int >= 1, got {num_fragments=}")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [path_names(path) for path, _ in flat]
    paths = ["/".join(map(str, n)) for n in names]
    in_stack = [len(n) > 1 and n[0] == layers_key for n in names]
    stack_keys = [n[1] for n, s in zip(names, in_stack, strict=True) if s]
    scanned = bool(stack_keys) and not any(isinstance(k, int) for k in stack_keys)
    if scanned:
        depths = {flat[i][1].shape[0] for i, s in enumerate(in_stack) if s}
        if len(depths) != 1:
            raise ValueError(f"scanned leaves under {layers_key!r} differ in layers: {depths}")
        num_layers = depths.pop()
    elif any(in_stack):
        num_layers = 1 + max(stack_keys)
    else:  # no layer stack: top-level entries in order are the "layers"
        tops = list(dict.fromkeys(n[0] for n in names))
        num_layers = len(tops)
    if num_fragments > num_layers:
        raise ValueError(
            f"`num_fragments` must be at most the number of layers ({num_layers}), got "
            f"{num_fragments=}"
        )
    groups = _layer_groups(num_layers, num_fragments, pattern)
    fragment_of = {layer: p for p, group in enumerate(groups) for layer in group}
    pieces: list[list[Piece]] = [[] for _ in range(num_fragments)]
    for i, (n, path) in enumerate(zip(names, paths, strict=True)):
        if scanned and in_stack[i]:
            for p, group in enumerate(groups):
                rows = None if len(group) == num_layers else tuple(group)
                pieces[p].append(Piece(i, path, rows))
            continue
        if in_stack[i]:
            layer = n[1]
        elif not any(in_stack):
            layer = tops.index(n[0])
        else:
            layer = num_layers - 1 if n[0] in output_keys else 0
        pieces[fragment_of[layer]].append(Piece(i, path))
    return tuple(
        Fragment(p, tuple(groups[p]), tuple(sorted(pieces[p], key=lambda x: x.leaf)))
        for p in range(num_fragments)
    )
