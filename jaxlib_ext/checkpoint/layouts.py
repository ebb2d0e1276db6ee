"""Layout conversions of a flat train state, as data, each with an exact inverse.

The same model state can be laid out in several ways: one ``[L, ...]`` tensor per weight for a
scanned stack of layers or one tensor per layer; experts ``[E, ...]`` in their own order or in
the order of their owners after a re-sharding; one copy of the parameters or ``M`` replicas
stacked ``[M, ...]`` (streaming DiLoCo); fused ``wqkv`` or split ``wq, wk, wv`` projections. A
:class:`Layout` converts a state in one layout into the other. It works on the *flat* form a
checkpoint stores, ``{"params/blocks/0/attn/wq": array, "opt_state/0/mu/blocks/0/attn/wq":
array, ...}``, so one conversion moves the parameters and every optimizer buffer shaped like
them together. Each layout is a frozen dataclass (plain data: it can be printed, compared and
recorded) with ``inverse()``; ``layout.inverse()(layout(state)) == state`` bit for bit.

A leaf a layout's pattern names but whose shape does not fit (a FRUGAL projection of a stacked
weight, a sparse SPAM moment) is left as it is; a restore then reports it by path if the target
wants it in the other layout (see :mod:`jaxlib_ext.checkpoint.restore_plan`).

Pass layouts to :meth:`jaxlib_ext.checkpoint.Checkpointer.restore` to restore a checkpoint saved
in one layout into a target in another, or call them on ``flatten(state)`` directly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_ext.checkpoint.restore_plan import leaf_key

Flat = dict[str, Any]


def flatten(tree: Any) -> Flat:
    """``{storage key: leaf}`` of a pytree, with the keys a checkpoint uses."""
    return {leaf_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def convert(state: Mapping[str, Any], layouts: Sequence[Layout]) -> Flat:
    """Applies ``layouts`` in order to a flat state (arrays, or ``ShapeDtypeStruct``s: then the
    result describes the converted shapes)."""
    state = dict(state)
    if state and all(isinstance(x, jax.ShapeDtypeStruct) for x in state.values()):
        return jax.eval_shape(lambda s: convert(s, layouts), state)
    for layout in layouts:
        state = layout(state)
    return state


def _split(key: str) -> list[str]:
    return key.split("/")


def _find(parts: list[str], prefix: list[str]) -> int | None:
    """Where ``prefix`` starts in ``parts``, followed by at least one more segment."""
    n = len(prefix)
    for at in range(len(parts) - n):
        if parts[at : at + n] == prefix:
            return at
    return None


class Layout:
    """A conversion of flat states; subclasses are frozen dataclasses."""

    def __call__(self, state: Mapping[str, Any]) -> Flat:
        raise NotImplementedError

    def inverse(self) -> Layout:
        raise NotImplementedError

    def touches(self, key: str) -> bool:
        """Whether this layout may read the leaf stored under ``key``."""
        raise NotImplementedError


def _check_layers(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class UnstackLayers(Layout):
    """Scanned layers -> one leaf per layer: ``.../blocks/mlp/wi`` ``[L, ...]`` becomes
    ``.../blocks/0/mlp/wi`` ... ``.../blocks/{L-1}/mlp/wi``.

    Args:
      stack: the path of the stacked module, ``"blocks"`` (several segments allowed).
      num_layers: ``L``; leaves under ``stack`` whose leading dimension differs stay as they are.

    Example:
      >>> import jax.numpy as jnp
      >>> state = {"params/blocks/w": jnp.arange(6.0).reshape(3, 2), "params/head": jnp.ones(2)}
      >>> split = UnstackLayers("blocks", 3)(state)
      >>> sorted(split), split["params/blocks/2/w"].tolist()
      (['params/blocks/0/w', 'params/blocks/1/w', 'params/blocks/2/w', 'params/head'], [4.0, 5.0])
      >>> StackLayers("blocks", 3)(split)["params/blocks/w"].shape
      (3, 2)
    """

    stack: str
    num_layers: int

    def __post_init__(self):
        _check_layers("num_layers", self.num_layers)

    def _match(self, key: str) -> tuple[list[str], int] | None:
        parts, prefix = _split(key), _split(self.stack)
        at = _find(parts, prefix)
        if at is None or parts[at + len(prefix)].isdigit():
            return None
        return parts, at + len(prefix)

    def touches(self, key: str) -> bool:
        return self._match(key) is not None

    def __call__(self, state):
        out = {}
        for key, x in state.items():
            match = self._match(key)
            if match is None or not x.shape or x.shape[0] != self.num_layers:
                out[key] = x
                continue
            parts, at = match
            for layer in range(self.num_layers):
                out["/".join([*parts[:at], str(layer), *parts[at:]])] = x[layer]
        return out

    def inverse(self) -> StackLayers:
        return StackLayers(self.stack, self.num_layers)


@dataclasses.dataclass(frozen=True)
class StackLayers(Layout):
    """One leaf per layer -> scanned layers; the inverse of :class:`UnstackLayers`.

    Every layer ``0..L-1`` of a leaf must be present (else a ``ValueError`` names the leaf).
    """

    stack: str
    num_layers: int

    def __post_init__(self):
        _check_layers("num_layers", self.num_layers)

    def _match(self, key: str) -> tuple[str, int] | None:
        parts, prefix = _split(key), _split(self.stack)
        at = _find(parts, prefix)
        if at is None:
            return None
        at += len(prefix)
        if not parts[at].isdigit() or at + 1 >= len(parts):
            return None
        return "/".join(parts[:at] + parts[at + 1 :]), int(parts[at])

    def touches(self, key: str) -> bool:
        return self._match(key) is not None

    def __call__(self, state):
        out, groups = {}, {}
        for key, x in state.items():
            match = self._match(key)
            if match is None:
                out[key] = x
            else:
                groups.setdefault(match[0], {})[match[1]] = x
        for key, layers in groups.items():
            if sorted(layers) != list(range(self.num_layers)):
                raise ValueError(
                    f"cannot stack {key}: layers {sorted(layers)} present, "
                    f"expected 0..{self.num_layers - 1}"
                )
            out[key] = jnp.stack([layers[i] for i in range(self.num_layers)])
        return out

    def inverse(self) -> UnstackLayers:
        return UnstackLayers(self.stack, self.num_layers)


@dataclasses.dataclass(frozen=True)
class PermuteAxis(Layout):
    """Reorders one axis of the leaves a glob pattern names: ``x' = take(x, permutation, axis)``
    (slot ``j`` of the result holds slot ``permutation[j]`` of the input).

    This converts expert tensors ``[E, ...]`` between the canonical expert order and an owner
    order (after a heterogeneous re-sharding, slot ``j`` holds expert ``order[j]``, with
    ``order`` recorded in the state): see :meth:`to_canonical`. Expert-sharded and replicated
    layouts of the same logical array need no conversion: a restore reshards onto the target.

    Args:
      pattern: ``fnmatch`` pattern over storage keys, ``"*mlp/w[io]"`` (matches the parameters
        and their optimizer moments alike).
      permutation: a permutation of ``range(E)``, as a tuple of ints.
      axis: the permuted axis; leaves whose ``axis`` does not have size ``E`` stay as they are.
      record: the key of an int ``[E]`` leaf that records the current order; it is permuted
        along with the data, so it always says which expert each slot holds.

    Example:
      >>> import jax.numpy as jnp
      >>> state = {"p/wi": jnp.array([[20.0], [0.0], [10.0]]), "p/order": jnp.array([2, 0, 1])}
      >>> canonical = PermuteAxis.to_canonical(state, "p/wi", record="p/order")
      >>> out = canonical(state)
      >>> out["p/wi"][:, 0].tolist(), out["p/order"].tolist()
      ([0.0, 10.0, 20.0], [0, 1, 2])
      >>> canonical.inverse()(out)["p/wi"][:, 0].tolist()
      [20.0, 0.0, 10.0]
    """

    pattern: str
    permutation: tuple[int, ...]
    axis: int = 0
    record: str | None = None

    def __post_init__(self):
        perm = tuple(int(i) for i in self.permutation)
        if sorted(perm) != list(range(len(perm))):
            raise ValueError(f"`permutation` must be a permutation of range(n), got {perm}")
        object.__setattr__(self, "permutation", perm)

    @classmethod
    def to_canonical(
        cls, state: Mapping[str, Any], pattern: str, *, record: str, axis: int = 0
    ) -> PermuteAxis:
        """The layout that puts experts back in canonical order, from the order recorded in
        ``state[record]`` (slot ``j`` holds expert ``state[record][j]``)."""
        order = np.asarray(jax.device_get(state[record]))
        return cls(pattern, tuple(int(i) for i in np.argsort(order, kind="stable")), axis, record)

    def touches(self, key: str) -> bool:
        return key == self.record or fnmatch.fnmatchcase(key, self.pattern)

    def __call__(self, state):
        perm = np.asarray(self.permutation)
        out = {}
        for key, x in state.items():
            axis = 0 if key == self.record else self.axis
            fits = x.ndim > axis and x.shape[axis] == perm.size
            out[key] = jnp.take(x, perm, axis=axis) if self.touches(key) and fits else x
        return out

    def inverse(self) -> PermuteAxis:
        inverse = np.argsort(np.asarray(self.permutation), kind="stable")
        return PermuteAxis(self.pattern, tuple(int(i) for i in inverse), self.axis, self.record)


@dataclasses.dataclass(frozen=True)
class StackReplicas(Layout):
    """One copy -> ``M`` replicas stacked ``[M, ...]`` (streaming DiLoCo's workers), for the
    leaves a glob pattern names. The inverse is :class:`UnstackReplicas`.

    Example:
      >>> import jax.numpy as jnp
      >>> stacked = StackReplicas("params/*", 2)({"params/w": jnp.array([1.0, 2.0])})
      >>> stacked["params/w"].tolist()
      [[1.0, 2.0], [1.0, 2.0]]
      >>> UnstackReplicas("params/*", 2)(stacked)["params/w"].tolist()
      [1.0, 2.0]
    """

    pattern: str
    replicas: int

    def __post_init__(self):
        _check_layers("replicas", self.replicas)

    def touches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)

    def __call__(self, state):
        return {
            k: jnp.broadcast_to(x, (self.replicas, *x.shape)) if self.touches(k) else x
            for k, x in state.items()
        }

    def inverse(self) -> UnstackReplicas:
        return UnstackReplicas(self.pattern, self.replicas)


@dataclasses.dataclass(frozen=True)
class UnstackReplicas(Layout):
    """``M`` stacked replicas ``[M, ...]`` -> one copy.

    Exact (and the inverse of :class:`StackReplicas`) when the replicas are equal, as they are
    right after a full synchronization; on concrete arrays, replicas that differ raise a
    ``ValueError`` naming the leaf. ``reduce="mean"`` averages them instead (the outer
    average of DiLoCo; not invertible).
    """

    pattern: str
    replicas: int
    reduce: str = "identical"

    def __post_init__(self):
        _check_layers("replicas", self.replicas)
        if self.reduce not in ("identical", "mean"):
            raise ValueError(f"`reduce` must be 'identical' or 'mean', got reduce={self.reduce!r}")

    def touches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)

    def _one(self, key: str, x):
        if not x.shape or x.shape[0] != self.replicas:
            raise ValueError(f"{key}: shape {x.shape} has no leading axis of {self.replicas}")
        if self.reduce == "mean":
            return jnp.mean(x, axis=0).astype(x.dtype)
        if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(x == x[:1])):
            raise ValueError(f"{key}: the {self.replicas} replicas differ; use reduce='mean'")
        return x[0]

    def __call__(self, state):
        return {k: self._one(k, x) if self.touches(k) else x for k, x in state.items()}

    def inverse(self) -> StackReplicas:
        return StackReplicas(self.pattern, self.replicas)


@dataclasses.dataclass(frozen=True)
class SplitProjection(Layout):
    """A fused projection -> its parts: ``.../wqkv`` ``[..., 3h]`` becomes ``.../wq``,
    ``.../wk``, ``.../wv`` (split along ``axis`` into ``sizes``). Inverse:
    :class:`FuseProjection`.

    Example:
      >>> import jax.numpy as jnp
      >>> state = {"params/attn/wqkv": jnp.arange(6.0).reshape(1, 6)}
      >>> split = SplitProjection("wqkv", ("wq", "wk", "wv"), (2, 2, 2))(state)
      >>> split["params/attn/wk"].tolist()
      [[2.0, 3.0]]
      >>> split_back = SplitProjection("wqkv", ("wq", "wk", "wv"), (2, 2, 2)).inverse()(split)
      >>> split_back["params/attn/wqkv"].tolist()
      [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    """

    fused: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    axis: int = -1

    def __post_init__(self):
        if len(self.parts) != len(self.sizes) or len(self.parts) < 2:
            raise ValueError(
                f"`parts` and `sizes` must have the same length >= 2, got parts={self.parts}, "
                f"sizes={self.sizes}"
            )

    def touches(self, key: str) -> bool:
        return _split(key)[-1] == self.fused

    def __call__(self, state):
        out = {}
        for key, x in state.items():
            if not self.touches(key) or x.shape[self.axis] != sum(self.sizes):
                out[key] = x
                continue
            stem = key[: -len(self.fused)]
            offsets = np.cumsum((0, *self.sizes))
            for name, lo, hi in zip(self.parts, offsets[:-1], offsets[1:], strict=True):
                out[stem + name] = jax.lax.slice_in_dim(x, int(lo), int(hi), axis=self.axis)
        return out

    def inverse(self) -> FuseProjection:
        return FuseProjection(self.fused, self.parts, self.sizes, self.axis)


@dataclasses.dataclass(frozen=True)
class FuseProjection(Layout):
    """Parts -> a fused projection; the inverse of :class:`SplitProjection`."""

    fused: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    axis: int = -1

    def touches(self, key: str) -> bool:
        return _split(key)[-1] in self.parts

    def __call__(self, state):
        out, groups = {}, {}
        for key, x in state.items():
            name = _split(key)[-1]
            if name in self.parts and x.shape[self.axis] == self.sizes[self.parts.index(name)]:
                groups.setdefault(key[: -len(name)], {})[name] = x
            else:
                out[key] = x
        for stem, found in groups.items():
            if set(found) != set(self.parts):
                raise ValueError(f"cannot fuse {stem}{self.fused}: only {sorted(found)} present")
            out[stem + self.fused] = jnp.concatenate([found[p] for p in self.parts], axis=self.axis)
        return out

    def inverse(self) -> SplitProjection:
        return SplitProjection(self.fused, self.parts, self.sizes, self.axis)


__all__ = [
    "FuseProjection",
    "Layout",
    "PermuteAxis",
    "SplitProjection",
    "StackLayers",
    "StackReplicas",
    "UnstackLayers",
    "UnstackReplicas",
    "convert",
    "flatten",
]
