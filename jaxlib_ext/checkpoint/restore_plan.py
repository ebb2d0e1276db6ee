"""Which saved leaf fills which leaf of a restore target: param-keyed optimizer state.

optax keeps optimizer state by position (``opt_state[0].mu['dense']['kernel']``), so adding a
transform to a chain (``adamw`` -> ``chain(clip_by_global_norm(1.0), adamw)``) or switching the
optimizer (``adam`` -> ``spam``) moves every buffer. This module gives every leaf an *address*
that survives such edits and pairs saved leaves with target leaves by it.

A leaf's address is ``(node, field, owner)``:

* ``owner``: the parameter the leaf belongs to, ``"blocks/0/attn/wq"``: the longest suffix of
  its path that is a parameter's path (parameters themselves: their own path);
* ``field``: the name in front of that suffix, ``"mu"``, ``"nu"``, ``"count"``, ``"key"``;
* ``node``: the class of the state holding the field, ``"ScaleByAdamState"`` (recorded in the
  manifest for the saved side; read off the target's tree for the other).

:func:`plan_restore` pairs leaves in three passes, each only between leaves of equal shape and
dtype that no earlier pass paired: (1) the same path in the same kind of node, (2) the same
address (the n-th leaf with an address pairs with the n-th one), (3) the same ``(field,
owner)`` in order, across kinds of node (``ScaleByAdamState.mu`` -> ``ScaleBySpamState.mu``).
Parameters, and leaves that are not a field of a state class (entries of plain dicts and lists),
pair only by path. Whatever remains is reported by path: target leaves that need an
initial value and saved leaves that are not used. Nothing is ever zero-filled.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from parallel.rules import path_names

PARAMS = "params"
PASSES = ("path", "address", "field")


def _joined(path: Sequence[Any]) -> str:
    return "/".join(map(str, path_names(path)))


def leaf_key(path: Sequence[Any]) -> str:
    """A state path as a storage key: ``opt_state/0/mu/blocks/0/mlp/wi``."""
    return _joined(path) or "_root"


def node_classes(tree: Any) -> dict[str, str]:
    """``{path: class name}`` of every node of ``tree`` that is not a dict, list or tuple.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> state = {"opt_state": optax.adam(1e-3).init({"w": jnp.zeros(2)})}
      >>> node_classes(state)["opt_state/0"]
      'ScaleByAdamState'
    """
    out: dict[str, str] = {}

    def visit(node: Any, prefix: tuple) -> None:
        children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
        if len(children) == 1 and children[0][0] == ():
            return  # a leaf
        if type(node) not in (dict, list, tuple):
            out[_joined(prefix)] = type(node).__name__
        for (entry,), child in children:
            visit(child, (*prefix, entry))

    visit(tree, ())
    return out


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What pairing needs to know about one leaf: its stored shape and dtype (PRNG keys as
    their key data) and its address."""

    shape: tuple[int, ...]
    dtype: str
    node: str | None
    field: str | None
    owner: str | None


def address(key: str, param_keys: set[str], nodes: Mapping[str, str]) -> tuple:
    """``(node, field, owner)`` of the leaf stored under ``key``.

    Example:
      >>> address("opt_state/1/0/mu/dense/w", {"dense/w"}, {"opt_state/1/0": "ScaleByAdamState"})
      ('ScaleByAdamState', 'mu', 'dense/w')
    """
    parts = key.split("/")
    if parts[0] == PARAMS and "/".join(parts[1:]) in param_keys:
        return (PARAMS, None, "/".join(parts[1:]))
    owner, cut = None, len(parts)
    for start in range(1, len(parts)):  # longest suffix first
        suffix = "/".join(parts[start:])
        if suffix in param_keys:
            owner, cut = suffix, start
            break
    named = [i for i in range(cut) if not parts[i].isdigit()]
    if not named:
        return (None, None, owner)
    at = named[-1]
    return (nodes.get("/".join(parts[:at])), parts[at], owner)


def describe(
    leaves: Mapping[str, tuple[Sequence[int], str]], nodes: Mapping[str, str]
) -> dict[str, LeafInfo]:
    """:class:`LeafInfo` for ``{key: (shape, dtype)}``, with the ``params/...`` keys as the
    parameters."""
    param_keys = {k[len(PARAMS) + 1 :] for k in leaves if k.startswith(PARAMS + "/")}
    out = {}
    for key, (shape, dtype) in leaves.items():
        node, field, owner = address(key, param_keys, nodes)
        out[key] = LeafInfo(tuple(int(d) for d in shape), str(dtype), node, field, owner)
    return out


@dataclasses.dataclass
class RestorePlan:
    """Where every target leaf comes from.

    Attributes:
      sources: ``{target key: saved key}`` for the leaves read from the checkpoint.
      how: ``{target key: "path" | "address" | "field"}``: the pass that paired it.
      initialized: ``{target key: reason}``: leaves no saved leaf can fill; a restore takes
        them from ``init`` or raises.
      unused: saved keys that fill nothing.
    """

    sources: dict[str, str]
    how: dict[str, str]
    initialized: dict[str, str]
    unused: list[str]

    def __str__(self) -> str:
        counts = {kind: sum(h == kind for h in self.how.values()) for kind in PASSES}
        lines = [
            f"{len(self.sources)} leaves restored ("
            + ", ".join(f"{n} by {kind}" for kind, n in counts.items())
            + f"), {len(self.initialized)} initialized, {len(self.unused)} saved leaves unused"
        ]
        lines += [
            f"  {self.how[t]:<11} {t} <- {s}"
            for t, s in self.sources.items()
            if self.how[t] != "path"
        ]
        lines += [f"  initialized {t}: {why}" for t, why in self.initialized.items()]
        lines += [f"  unused      {s}" for s in self.unused]
        return "\n".join(lines)


def plan_restore(saved: Mapping[str, LeafInfo], target: Mapping[str, LeafInfo]) -> RestorePlan:
    """Pairs target leaves with saved leaves (see the module docstring for the passes).

    Example:
      >>> import optax, jax, jax.numpy as jnp
      >>> params = {"w": jnp.zeros(3)}
      >>> def info(tx):
      ...     tree = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
      ...     leaves = {leaf_key(p): (x.shape, x.dtype)
      ...               for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
      ...     return describe(leaves, node_classes(tree))
      >>> old = info(optax.adam(1e-3))
      >>> new = info(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))
      >>> plan = plan_restore(old, new)
      >>> plan.sources["opt_state/1/0/mu/w"], plan.initialized
      ('opt_state/0/mu/w', {})
    """
    sources: dict[str, str] = {}
    how: dict[str, str] = {}
    used: set[str] = set()

    def fits(t: str, s: str) -> bool:
        return (target[t].shape, target[t].dtype) == (saved[s].shape, saved[s].dtype)

    def pair(t: str, s: str, kind: str) -> None:
        sources[t], how[t] = s, kind
        used.add(s)

    for key, info in target.items():  # pass 1: same path, same kind of node
        if key in saved and fits(key, key):
            node = saved[key].node
            if info.node is None or node is None or info.node == node:
                pair(key, key, "path")

    def grouped(side: Mapping[str, LeafInfo], taken, by) -> dict[tuple, list[str]]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for key, info in side.items():
            if key not in taken and info.node not in (None, PARAMS) and info.field is not None:
                groups[by(info)].append(key)
        return groups

    for kind, by in (
        ("address", lambda i: (i.node, i.field, i.owner)),
        ("field", lambda i: (i.field, i.owner)),
    ):
        wanted = grouped(target, sources, by)
        offered = grouped(saved, used, by)
        for group, keys in wanted.items():
            candidates = offered.get(group, [])
            for t in keys:
                match = next((s for s in candidates if s not in used and fits(t, s)), None)
                if match is not None:
                    pair(t, match, kind)

    initialized = {}
    for key, info in target.items():
        if key in sources:
            continue
        if key in saved:
            have = saved[key]
            initialized[key] = (
                f"saved as {have.dtype}{list(have.shape)} in {have.node or 'a tree'}, "
                f"target {info.dtype}{list(info.shape)} in {info.node or 'a tree'}"
            )
        else:
            initialized[key] = "no saved leaf with this path or address"
    unused = [key for key in saved if key not in used]
    return RestorePlan(sources, how, initialized, unused)


__all__ = [
    "LeafInfo",
    "RestorePlan",
    "address",
    "describe",
    "leaf_key",
    "node_classes",
    "plan_restore",
]
