"""Logical-axis sharding rules: parameters name their axes, one table maps names to mesh axes.

Every parameter of the library's models carries a tuple of *logical* axis names (``("embed",
"mlp")``, ``("layers", "embed", "heads", "kv")``...). A rules table maps each logical name to zero,
one or several *mesh* axes; everything else (parameter, batch and optimizer-state shardings) is
derived from it:

* :func:`logical_to_spec` and :func:`logical_sharding` turn one array's logical axes into a
  ``PartitionSpec`` / ``NamedSharding`` (checking divisibility, naming the array when it fails);
* :func:`tree_shardings` and :func:`shard_tree` do it for a whole pytree;
* :func:`state_param_paths` and :func:`derive_state_shardings` give any optax state (any chain,
  from ``jax.eval_shape(tx.init, params)``) the shardings of the parameters its buffers belong to.

Mesh axes that a rule names but the mesh lacks are ignored, so one table serves a 1-device mesh,
an FSDP-only mesh and a ``data x fsdp`` mesh alike.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]
"""``((logical_name, mesh_axes), ...)``; ``mesh_axes`` is a name, a sequence of names or None."""

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", None),
    ("position", None),
    ("heads", None),
    ("kv", None),
    ("mlp", None),
    ("expert", None),
    ("layers", None),
)
"""Data parallelism over ``data`` x ``fsdp`` and ZeRO-3-style parameter sharding over ``fsdp``.

Every weight matrix of the reference LM has an ``embed`` axis, so every large parameter and its
optimizer state are split over ``fsdp``; the batch is split over both axes. Logical names that no
rule lists are replicated.
"""


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for item in rules:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"each rule must be a (logical_name, mesh_axes) pair, got {item!r}")
        name, target = item
        if target is None:
            axes: tuple[str, ...] = ()
        elif isinstance(target, str):
            axes = (target,)
        else:
            axes = tuple(target)
        table.setdefault(name, axes)  # the first rule for a name wins, as in flax
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None
) -> PartitionSpec:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` of mesh axes.

    Args:
      logical_axes: one logical name (or None) per array dimension.
      rules: the rules table.
      mesh: when given, mesh axes it does not have are dropped.

    Returns:
      The spec; a mesh axis is used at most once (the first dimension that claims it keeps it).
    """
    table = _rule_table(rules)
    used: set[str] = set()
    entries: list[Any] = []
    for name in logical_axes:
        axes = table.get(name, ()) if name is not None else ()
        kept = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.axis_names))
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*entries)


def logical_sharding(
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Rules,
    *,
    name: str = "array",
) -> NamedSharding:
    """A ``NamedSharding`` for an array of ``shape`` with the given logical axes.

    Raises:
      ValueError: the number of logical names differs from the rank, or a dimension is not
        divisible by the product of the mesh axes it is split over. The message names ``name``.
    """
    shape = tuple(shape)
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"{name}: logical axes {tuple(logical_axes)} do not match its shape {shape}"
        )
    spec = logical_to_spec(logical_axes, rules, mesh)
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=True)):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else entry
        ways = 1
        for axis in axes:
            ways *= mesh.shape[axis]
        if size % ways:
            raise ValueError(
                f"cannot shard {name} of shape {shape} along dim {dim} (logical "
                f"{logical_axes[dim]!r}) over mesh axes {axes} of total size {ways}: "
                f"{size} is not divisible by {ways}. Use a mesh whose axes divide the model "
                f"dimensions, or change the rules."
            )
    return NamedSharding(mesh, spec)


def indivisible_dims(
    shape: Sequence[int], sharding: NamedSharding
) -> list[tuple[int, tuple[str, ...], int]]:
    """``(dim, mesh axes, ways)`` for every dimension of ``shape`` that ``sharding`` splits over
    mesh axes whose total size does not divide it (JAX cannot place such an array).

    Example:
      >>> import jax
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> indivisible_dims((3, 4), NamedSharding(mesh, PartitionSpec("x")))
      []
    """
    out = []
    for dim, entry in enumerate(_spec_entries(sharding, len(shape))):
        axes = _axes_of(entry)
        ways = math.prod(sharding.mesh.shape[a] for a in axes)
        if ways > 1 and shape[dim] % ways:
            out.append((dim, axes, ways))
    return out


def replicate_dims(sharding: NamedSharding, dims: Sequence[int]) -> NamedSharding:
    """``sharding`` with the given dimensions replicated instead of split."""
    spec = list(sharding.spec)
    for dim in dims:
        if dim < len(spec):
            spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def activation_constraint(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """``f(x, logical_axes)``: pins an activation to the sharding its logical axes map to.

    Pass it to a model (``LanguageModel(config, activation_sharding=...)``) so that activations
    stay batch-sharded through the network, as the rules say, rather than as XLA's propagation
    happens to choose.
    """

    def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        sharding = logical_sharding(x.shape, logical_axes, mesh, rules, name="an activation")
        return jax.lax.with_sharding_constraint(x, sharding)

    return constrain


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(tree: Any, logical_axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s).

    ``logical_axes`` has the structure of ``tree`` with a tuple of logical names at every leaf.
    """
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    axes_leaves = treedef.flatten_up_to(logical_axes)
    out = []
    for (path, leaf), axes in zip(paths_and_leaves, axes_leaves, strict=True):
        if not _is_axes(axes):
            raise TypeError(
                f"logical axes of {jax.tree_util.keystr(path)} must be a tuple of "
                f"names, got {axes!r}"
            )
        out.append(
            logical_sharding(
                leaf.shape, axes, mesh, rules, name=f"parameter {jax.tree_util.keystr(path)}"
            )
        )
    return treedef.unflatten(out)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Places every leaf of ``tree`` with the matching sharding (``jax.device_put``)."""
    return jax.device_put(tree, shardings)


def _key_name(key: Any) -> Hashable:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def path_names(path: Sequence[Any]) -> tuple[Hashable, ...]:
    """A key path as plain names: ``DictKey('w')`` and ``GetAttrKey('w')`` both become ``'w'``."""
    return tuple(_key_name(k) for k in path)


def state_param_paths(state: Any, params: Any) -> Any:
    """For each leaf of an optimizer state, the path of the parameter it belongs to, or None.

    A state leaf belongs to parameter ``p`` when ``p``'s path is a suffix of the leaf's path and
    the shapes are equal (optax stores per-parameter buffers as params-shaped subtrees, e.g.
    ``ScaleByAdamState.mu['dense']['kernel']``); the longest such suffix wins. Counters,
    hyperparameters and buffers of other shapes map to None.

    Args:
      state: an optax state (arrays or ``jax.ShapeDtypeStruct`` leaves), typically
        ``jax.eval_shape(tx.init, params)``.
      params: the parameters (arrays or ``ShapeDtypeStruct`` leaves).

    Returns:
      A pytree with the structure of ``state`` whose leaves are the owning parameter's path as a
      ``"/"``-joined string (``"dense/kernel"``), or None.
    """
    owners, treedef = _state_owners(state, params)
    return treedef.unflatten([None if o is None else "/".join(map(str, o)) for o in owners])


def _state_owners(state: Any, params: Any, *, same_shape: bool = True) -> tuple[list, Any]:
    by_suffix: dict[tuple[Hashable, ...], tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_suffix[path_names(path)] = tuple(leaf.shape)
    longest = max((len(p) for p in by_suffix), default=0)

    def match(path, leaf):
        names = path_names(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for n in range(min(longest, len(names)), 0, -1):
            candidate = names[-n:]
            if candidate in by_suffix and (not same_shape or by_suffix[candidate] == shape):
                return candidate
        return None

    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    return [match(p, leaf) for p, leaf in leaves_with_paths], treedef


def _spec_entries(sharding: NamedSharding, ndim: int) -> list[Any]:
    entries = list(sharding.spec)
    return entries + [None] * (ndim - len(entries))


def _axes_of(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _largest_divisible(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh) -> PartitionSpec:
    """Shards the largest dimension that ``axes`` divide over ``axes``; else replicates."""
    ways = math.prod(mesh.shape[a] for a in axes)
    candidates = [d for d, size in enumerate(shape) if axes and size % ways == 0 and size >= ways]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: shape[d])
    entries: list[Any] = [None] * len(shape)
    entries[dim] = axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*entries)


def _like_param(shape, param_shape, param_sharding, mesh, fallback_axes) -> PartitionSpec:
    """A buffer owned by a parameter but of another shape (a projected moment, a projector):
    each of the parameter's sharded dimensions shards a buffer dimension of the same size."""
    entries: list[Any] = [None] * len(shape)
    used: set[str] = set()
    for p_dim, entry in enumerate(_spec_entries(param_sharding, len(param_shape))):
        axes = _axes_of(entry)
        if not axes or used & set(axes):
            continue
        for dim, size in enumerate(shape):
            if entries[dim] is None and size == param_shape[p_dim]:
                entries[dim] = entry
                used.update(axes)
                break
    if any(e is not None for e in entries):
        return PartitionSpec(*entries)
    return _largest_divisible(shape, fallback_axes, mesh)


def derive_state_shardings(state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a parameter's buffers get that parameter's sharding.

    Works for any optax chain (masked, ``MultiSteps``, ``inject_hyperparams``...). Per leaf:

    * params-shaped buffers of parameter ``p`` (:func:`state_param_paths`) get ``p``'s sharding;
    * other buffers under ``p``'s path (a low-rank moment ``[m, r]``, a projector, a factored
      second moment) shard each dimension whose size equals one of ``p``'s sharded dimensions
      over the same mesh axes (so ``[m, r]`` follows ``p = [m, n]`` sharded on ``m``), else as
      below;
    * buffers of no parameter with 2+ dimensions (FRUGAL's active-block pools) shard their largest
      dimension divisible by the mesh axes the parameters are sharded over, so that no large
      buffer is replicated on every device;
    * everything else (counters, hyperparameters, keys, index vectors) is replicated.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from parallel.mesh import make_mesh
      >>> mesh = make_mesh({"fsdp": -1})
      >>> params = {"w": jnp.zeros((8, 2))}
      >>> p_sh = tree_shardings(params, {"w": ("embed", None)}, mesh, DEFAULT_RULES)
      >>> state = jax.eval_shape(optax.adam(1e-3).init, params)
      >>> s_sh = derive_state_shardings(state, params, p_sh, mesh)
      >>> s_sh[0].mu["w"] == p_sh["w"], s_sh[0].count.spec
      (True, P())
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    by_path = {path_names(p): s for p, s in flat_shardings}
    shape_of = {path_names(p): tuple(x.shape) for p, x in flat_params}
    fallback: list[str] = []
    for _, sharding in flat_shardings:
        for entry in sharding.spec:
            fallback += [a for a in _axes_of(entry) if a not in fallback]
    replicated = NamedSharding(mesh, PartitionSpec())
    exact, treedef = _state_owners(state, params)
    loose, _ = _state_owners(state, params, same_shape=False)
    out = []
    for leaf, owner, near in zip(jax.tree.leaves(state), exact, loose, strict=True):
        shape = tuple(getattr(leaf, "shape", ()))
        if owner is not None:
            out.append(by_path[owner])
        elif near is not None and shape:
            spec = _like_param(shape, shape_of[near], by_path[near], mesh, tuple(fallback))
            out.append(NamedSharding(mesh, spec))
        elif len(shape) >= 2:
            out.append(NamedSharding(mesh, _largest_divisible(shape, tuple(fallback), mesh)))
        else:
            out.append(replicated)
    return treedef.unflatten(out)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: a restore or compile target."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
