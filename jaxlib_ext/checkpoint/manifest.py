"""The manifest of a checkpoint step: what was saved, with what, and how to check it.

A manifest is JSON: format and library version, the mesh, process count and (if given) rules
the step was saved with (information only), the class of every state node, ``extra`` (JSON:
the data pipeline's position, ...) and, for each leaf, its path, role (param / moment of
params/X / counter / rng / data state / other), dtype, shape, the PartitionSpec it was saved
with and a checksum of its logical bytes. ``reading`` says, for a reader without this library,
how the arrays are stored.

The manifest checksums itself: ``manifest_checksum`` is the SHA-256 of its canonical JSON (sorted
keys, no spaces) without that field, so any change to a field a restore reads (a leaf's shape,
dtype or key, ``extra``'s data position) raises :class:`CorruptCheckpointError`, which
``restore(fallback=True)`` handles. Manifests of format ``jaxlib-ext-checkpoint/1`` (before the
checksum) are still read, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxlib_ext.checkpoint.errors import CorruptCheckpointError, MissingStepError, SaveError
from jaxlib_ext.checkpoint.restore_plan import leaf_key, node_classes
from jaxlib_ext.checkpoint.steps import committed_steps, manifest_path
from parallel.rules import state_param_paths

FORMAT = "jaxlib-ext-checkpoint/2"
LEGACY_FORMAT = "jaxlib-ext-checkpoint/1"  # no manifest checksum
READING = (
    "Item 'arrays' is a flat dict {leaf path: array}: each key is the path of the leaf in the "
    "saved pytree joined by '/', e.g. 'opt_state/0/mu/blocks/0/attn/wq' (dict keys, list "
    "indices, attribute names); split the keys on '/' to nest it. A PRNG key is stored as its "
    "uint32 key data (leaves[path]['dtype'] names the key type). The jaxlib-ext README, "
    "section 'Reading a checkpoint with plain Orbax', has the few lines that do it; "
    "jaxlib_ext.checkpoint.Checkpointer(directory).restore(target) restores the typed state."
)
_log = logging.getLogger("jaxlib_ext.checkpoint")


def library_version() -> str:
    """The installed version of this library, or ``"unknown"`` in a source tree."""
    try:
        return metadata.version("jaxlib-ext")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def is_key(x: Any) -> bool:
    """Whether ``x`` (an array or ``ShapeDtypeStruct``) holds typed PRNG keys."""
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def leaf_roles(state: Any, keys: list[str]) -> dict[str, str]:
    """param / moment of param X / counter / rng / data state / other, for a TrainState-like
    tree (``params`` and ``opt_state`` attributes; leaves under ``data`` are data state)."""
    roles = dict.fromkeys(keys, "other")
    params = getattr(state, "params", None)
    opt_state = getattr(state, "opt_state", None)
    if params is not None:
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
            roles[leaf_key((jax.tree_util.GetAttrKey("params"), *path))] = "param"
    if params is not None and opt_state is not None:
        paths, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
        owners = treedef.flatten_up_to(state_param_paths(opt_state, params))
        for (path, _), owner in zip(paths, owners, strict=True):
            if owner is not None:
                roles[leaf_key((jax.tree_util.GetAttrKey("opt_state"), *path))] = (
                    f"moment of params/{owner}"
                )
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        key = leaf_key(path)
        if roles[key] != "other":
            continue
        if key.split("/")[0] in ("data", "data_state"):
            roles[key] = "data state"
        elif is_key(leaf):
            roles[key] = "rng"
        elif leaf.ndim == 0 and jnp.issubdtype(leaf.dtype, jnp.integer):
            roles[key] = "counter"
    return roles


def spec_string(x: Any) -> str | None:
    """The PartitionSpec of a leaf's ``NamedSharding`` as text, or None."""
    sharding = getattr(x, "sharding", None)
    return str(tuple(sharding.spec)) if isinstance(sharding, NamedSharding) else None


def _jsonable(axes: Any) -> Any:
    return list(axes) if isinstance(axes, (tuple, list)) else axes


def build_manifest(
    step: int,
    state: Any,
    stored: dict[str, jax.Array],
    checksums: list[str],
    *,
    extra: Any = None,
    rules: Any = None,
) -> dict:
    """The manifest of ``state`` saved as ``step``.

    Args:
      step: the step number.
      state: the pytree being saved.
      stored: ``{leaf key: the array stored for it}`` (PRNG keys as key data), in the order of
        ``state``'s leaves.
      checksums: the checksum string of each stored array, in the same order.
      extra: JSON-serializable data saved alongside.
      rules: the sharding rules the state was placed with, recorded for information.

    Returns:
      The manifest, a JSON-serializable dict.
    """
    leaves = [x for _, x in jax.tree_util.tree_flatten_with_path(state)[0]]
    keys = list(stored)
    roles = leaf_roles(state, keys)
    mesh = None
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if getattr(sharding, "mesh", None) is not None:
            mesh = {str(k): int(v) for k, v in sharding.mesh.shape.items()}
            break
    info = {
        "format": FORMAT,
        "library_version": library_version(),
        "step": int(step),
        "saved_mesh": mesh,
        "saved_process_count": jax.process_count(),
        "saved_rules": None if rules is None else [[n, _jsonable(a)] for n, a in rules],
        "leaves": {
            k: {
                "role": roles[k],
                "dtype": str(x.dtype),
                "shape": list(x.shape),
                "stored_dtype": str(stored[k].dtype),
                "stored_shape": list(stored[k].shape),
                "saved_spec": spec_string(x),
                "checksum": c,
            }
            for k, x, c in zip(keys, leaves, checksums, strict=True)
        },
        "nodes": node_classes(state),
        "extra": extra,
        "reading": READING,
    }
    try:
        info = json.loads(json.dumps(info))  # exactly what a reader will parse
    except (TypeError, ValueError) as err:
        raise SaveError(f"step {step}: `extra` is not JSON-serializable: {err}") from err
    info["manifest_checksum"] = manifest_checksum(info)
    return info


def manifest_checksum(info: dict) -> str:
    """The SHA-256 (hex) of ``info``'s canonical JSON, without its ``manifest_checksum`` field.

    Args:
      info: a manifest, as parsed from JSON.

    Returns:
      64 hex digits.

    Example:
      >>> manifest_checksum({"b": 1, "a": [2]}) == manifest_checksum({"a": [2], "b": 1})
      True
    """
    body = {k: v for k, v in info.items() if k != "manifest_checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_schema(info: dict, step: int) -> None:
    """Raises ``KeyError``/``TypeError``/``ValueError`` for any field a restore reads that is
    missing or of the wrong type."""
    if not isinstance(info, dict):
        raise TypeError(f"the manifest is a {type(info).__name__}, not an object")
    if info["step"] != step:
        raise ValueError(f"it records step {info['step']!r}")
    if not isinstance(info["leaves"], dict) or not isinstance(info.get("nodes", {}), dict):
        raise TypeError("`leaves` and `nodes` must be objects")
    for key, leaf in info["leaves"].items():
        shape = leaf.get("stored_shape", leaf["shape"])
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"leaf {key}: stored shape {shape!r}")
        jnp.dtype(leaf["stored_dtype"])
        if not isinstance(leaf["checksum"], str):
            raise TypeError(f"leaf {key}: checksum {leaf['checksum']!r}")


def manifest(directory: str | Path, step: int | None = None) -> dict:
    """The manifest of ``step`` (default: the latest) without loading any array.

    Args:
      directory: the checkpoint directory.
      step: the step; None for the latest.

    Returns:
      The manifest (see the module docstring).

    Raises:
      MissingStepError: no such step, or the directory does not exist (it is not created).
      CorruptCheckpointError: the manifest is unreadable, fails its checksum or lacks a field
        a restore reads.

    Example:
      >>> import tempfile
      >>> try:
      ...     manifest(tempfile.mkdtemp())
      ... except MissingStepError as err:
      ...     print(type(err).__name__)
      MissingStepError
    """
    root = Path(directory).absolute()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise MissingStepError(f"no checkpoint in {root}: the path {what}")
    steps = committed_steps(root)
    if not steps:
        raise MissingStepError(f"no checkpoint in {root}")
    step = steps[-1] if step is None else int(step)
    path = manifest_path(root, step)
    if step not in steps:
        raise MissingStepError(f"step {step} not in {root} (steps: {steps})")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or UTF-8
        raise CorruptCheckpointError(
            f"step {step}: manifest {path} unreadable: {type(err).__name__}: {err}"
        ) from err
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt == FORMAT:
        saved = info.get("manifest_checksum")
        if saved != manifest_checksum(info):
            raise CorruptCheckpointError(
                f"step {step}: manifest {path} fails its checksum (recorded {saved!r}): "
                "it was changed after the save"
            )
    elif fmt == LEGACY_FORMAT:
        _log.warning("step %d: manifest %s predates manifest checksums (%s)", step, path, fmt)
    else:
        raise CorruptCheckpointError(f"step {step}: {path} is not a {FORMAT} manifest")
    try:
        _check_schema(info, step)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(
            f"step {step}: manifest {path} is malformed: {type(err).__name__}: {err}"
        ) from err
    return info


__all__ = [
    "FORMAT",
    "LEGACY_FORMAT",
    "READING",
    "build_manifest",
    "is_key",
    "leaf_roles",
    "library_version",
    "manifest",
    "manifest_checksum",
]
