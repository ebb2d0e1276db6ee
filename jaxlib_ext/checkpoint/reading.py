"""Reading one step into a target: pairing, placement, the Orbax read and the checksum check.

The caller (:class:`jaxlib_ext.checkpoint.Checkpointer`) chooses the step and handles fallback;
:func:`restore_step` reads exactly one step or raises a typed error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxlib_ext.checkpoint.awaited_reads import reads_awaited
from jaxlib_ext.checkpoint.checksums import checksum_strings
from jaxlib_ext.checkpoint.errors import (
    CorruptCheckpointError,
    IncompatibleLayoutError,
    StructureMismatchError,
)
from jaxlib_ext.checkpoint.layouts import Layout, convert
from jaxlib_ext.checkpoint.manifest import is_key
from jaxlib_ext.checkpoint.restore_plan import describe, leaf_key, node_classes, plan_restore
from jaxlib_ext.checkpoint.steps import ARRAYS
from parallel.rules import indivisible_dims, replicate_dims

_log = logging.getLogger("jaxlib_ext.checkpoint")


def short_error(message: str, limit: int = 400) -> str:
    """An I/O error's message without TensorStore's spec dump, at most ``limit`` characters."""
    message = message.split(" [tensorstore_spec", 1)[0]
    return message if len(message) <= limit else message[:limit] + " ..."


def stored_struct(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype a leaf is stored with (a PRNG key as its key data)."""
    if is_key(leaf):
        return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(tuple(leaf.shape), jnp.dtype(leaf.dtype))


def require_arrays(leaves: list[Any], keys: list[str], *, step: int | None, what: str) -> None:
    """Raises :class:`StructureMismatchError` naming the first leaf that is not an array-like
    (``jax.Array``, ``np.ndarray``, ``jax.ShapeDtypeStruct``: something with a shape and a
    dtype), e.g. a Python float.

    Args:
      leaves: the leaves.
      keys: their storage keys.
      step: the step (for the message), if known.
      what: ``"state"`` or ``"target"`` (for the message).
    """
    for key, leaf in zip(keys, leaves, strict=True):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            where = f"step {step}, " if step is not None else ""
            raise StructureMismatchError(
                f"{where}{what} leaf {key} is a {type(leaf).__name__} ({leaf!r}), not an array: "
                "make it one (jnp.asarray) or keep it in `extra`"
            )


class Pairing:
    """The target's leaves, the saved leaves (converted by ``layouts``) and the plan that
    pairs them."""

    def __init__(self, target: Any, info: dict, layouts: Sequence[Layout]):
        leaves_with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(target)
        self.keys = [leaf_key(p) for p, _ in leaves_with_paths]
        self.leaves = [x for _, x in leaves_with_paths]
        require_arrays(self.leaves, self.keys, step=info.get("step"), what="target")
        self.wanted = {k: stored_struct(x) for k, x in zip(self.keys, self.leaves, strict=True)}
        self.saved = {
            k: jax.ShapeDtypeStruct(
                tuple(v.get("stored_shape", v["shape"])), jnp.dtype(v["stored_dtype"])
            )
            for k, v in info["leaves"].items()
        }
        self.view = convert(self.saved, layouts) if layouts else self.saved
        nodes = info.get("nodes", {})
        self.plan = plan_restore(
            describe({k: (x.shape, x.dtype) for k, x in self.view.items()}, nodes),
            describe({k: (x.shape, x.dtype) for k, x in self.wanted.items()}, node_classes(target)),
        )

    def unfilled_message(self, step: int) -> str:
        """Why the checkpoint cannot fill the target, leaf by leaf, and what to do."""
        lacking = [k for k in self.plan.initialized if k not in self.view]
        lines = [f"step {step}: the checkpoint cannot fill every leaf of the target."]
        if lacking:
            lines.append(
                f"The target has leaves the checkpoint lacks: {lacking[:10]}"
                + (" ..." if len(lacking) > 10 else "")
            )
        for key in self.plan.initialized:
            if key in self.view:
                have, want = self.view[key], self.wanted[key]
                lines.append(
                    f"leaf {key}: saved {have.dtype}{list(have.shape)}, "
                    f"target {want.dtype}{list(want.shape)}"
                )
        lines.append(
            "Pass `init=` (e.g. the new optimizer's initial state) to initialize them; "
            "Checkpointer.plan() shows the whole pairing."
        )
        return "\n".join(lines)


def placement(step: int, key: str, leaf: Any, on_indivisible: str):
    """The sharding a target leaf is restored with: its own, checked for divisibility.

    Raises:
      IncompatibleLayoutError: a dimension cannot be split as asked and ``on_indivisible`` is
        ``"error"``.
    """
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return sharding
    bad = indivisible_dims(leaf.shape, sharding)
    if not bad:
        return sharding
    if on_indivisible == "replicate":
        return replicate_dims(sharding, [dim for dim, _, _ in bad])
    dim, axes, ways = bad[0]
    raise IncompatibleLayoutError(
        f"step {step}, leaf {key}: dimension {dim} of shape {tuple(leaf.shape)} cannot be split "
        f"over mesh axes {axes} ({ways} ways); use a mesh that divides it or "
        f"on_indivisible='replicate'"
    )


def _widened(sharding, ndim: int):
    """A sharding for the stored form of a leaf: trailing key-data dims replicated."""
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) >= ndim:
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def read_arrays(manager: ocp.CheckpointManager, root: Path, step: int, abstract: dict) -> dict:
    """Reads the arrays ``abstract`` names (``{key: ShapeDtypeStruct}``) from ``step``.

    Raises:
      CorruptCheckpointError: Orbax or TensorStore could not read them.
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    try:
        with reads_awaited():  # a failed read ends cleanly: the others are awaited first
            return manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        ARRAYS: ocp.args.PyTreeRestore(
                            abstract, restore_args=restore_args, partial_restore=True
                        )
                    }
                ),
            )[ARRAYS]
    except Exception as err:  # TensorStore/OCDBT errors for truncated or missing files
        raise CorruptCheckpointError(
            f"step {step}: the data under {root / str(step) / ARRAYS} could not "
            f"be read: {type(err).__name__}: {short_error(str(err))}"
        ) from err


def verify_checksums(
    root: Path, step: int, info: dict, loaded: dict[str, jax.Array], verify: str
) -> None:
    """Compares the loaded arrays' checksums with the manifest's.

    Args:
      root: the checkpoint directory (for the message).
      step: the step (for the message).
      info: the step's manifest.
      loaded: ``{key: array}`` as read.
      verify: ``"full"`` (every leaf), ``"sample"`` (about 8 leaves) or ``"none"``.

    Raises:
      CorruptCheckpointError: a leaf's checksum differs, naming the leaf and the data directory.
    """
    if verify == "none":
        return
    checked = sorted(loaded)
    if verify == "sample":
        checked = checked[:: max(1, len(checked) // 8)]
    saved = info["leaves"]
    sums = checksum_strings([loaded[k] for k in checked])
    for key, got in zip(checked, sums, strict=True):
        if got != saved[key]["checksum"]:
            raise CorruptCheckpointError(
                f"step {step}, leaf {key}: checksum {got} != saved "
                f"{saved[key]['checksum']} (data in {root / str(step) / ARRAYS})"
            )


def restore_step(
    manager: ocp.CheckpointManager,
    root: Path,
    info: dict,
    target: Any,
    *,
    step: int,
    init: Any,
    layouts: Sequence[Layout],
    on_indivisible: str,
    verify: str,
) -> tuple[Any, Any]:
    """Restores one step into ``target`` (see :meth:`Checkpointer.restore`).

    Returns:
      ``(state, extra)``.

    Raises:
      StructureMismatchError, CorruptCheckpointError, IncompatibleLayoutError.
    """
    pairing = Pairing(target, info, layouts)
    plan = pairing.plan
    if plan.initialized and init is None:
        raise StructureMismatchError(pairing.unfilled_message(step))
    init_leaves = None
    if init is not None:
        try:
            init_leaves = pairing.treedef.flatten_up_to(init)
        except (ValueError, TypeError) as err:
            raise StructureMismatchError(
                f"step {step}: `init` does not have the target's structure: {err}"
            ) from err
    if plan.initialized:
        _log.warning("step %d restored with leaves from `init`:\n%s", step, plan)
    elif plan.unused or "field" in plan.how.values():
        _log.warning(  # a partial move: another kind of optimizer state, saved leaves dropped
            "step %d restored into a state of another kind, not all of it carried over:\n%s",
            step,
            plan,
        )
    elif any(t != s for t, s in plan.sources.items()):
        _log.info("step %d restored into an edited state:\n%s", step, plan)

    placements = {}
    for key, leaf in zip(pairing.keys, pairing.leaves, strict=True):
        placements[key] = placement(step, key, leaf, on_indivisible)
    feeds = {s: t for t, s in plan.sources.items()}
    touched = {k for k in info["leaves"] if any(lay.touches(k) for lay in layouts)}
    mesh = next((p.mesh for p in placements.values() if hasattr(p, "mesh")), None)
    abstract = {}
    for key in (set(feeds) & set(pairing.saved)) | touched:
        if key in touched:  # converted after reading: read whole on the target's mesh
            sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        else:
            sharding = placements[feeds[key]]
        struct = pairing.saved[key]
        abstract[key] = jax.ShapeDtypeStruct(
            struct.shape, struct.dtype, sharding=_widened(sharding, len(struct.shape))
        )
    loaded = read_arrays(manager, root, step, abstract)
    verify_checksums(root, step, info, loaded, verify)
    view = convert(loaded, layouts) if layouts else loaded
    out = []
    for i, (key, leaf) in enumerate(zip(pairing.keys, pairing.leaves, strict=True)):
        if key in plan.sources:
            value = view[plan.sources[key]]
            if is_key(leaf):
                impl = jax.random.key_impl(leaf) if isinstance(leaf, jax.Array) else None
                value = jax.random.wrap_key_data(value, impl=impl)
        else:
            value = init_leaves[i]
        where = placements[key]
        if where is not None and getattr(value, "sharding", None) != where:
            value = jax.device_put(value, where)
        out.append(value)
    return pairing.treedef.unflatten(out), info["extra"]


__all__ = [
    "Pairing",
    "placement",
    "read_arrays",
    "require_arrays",
    "restore_step",
    "short_error",
    "stored_struct",
    "verify_checksums",
]
