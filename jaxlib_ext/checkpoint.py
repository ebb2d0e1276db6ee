"""Universal, verifiable checkpoints of any train state, on Orbax.

A checkpoint stores every array whole (logically), keyed by its path in the state, with a JSON
manifest: format and library version, the mesh, process count and (if given) rules it was saved
with (information only), the class of every state node, ``extra`` (JSON: the data pipeline's
position, ...) and, for each leaf, its path, role (param / moment of params/X / counter / rng /
data state / other), dtype, shape, the PartitionSpec it was saved with and a checksum of its
logical bytes.

A restore goes through a target (``jax.ShapeDtypeStruct``s with shardings, e.g.
``jax.eval_shape`` of the state's init placed with the library's rules on ANY mesh), so it
reshards onto another mesh, device count or process count, returns exactly the target's
structure and types (optax NamedTuples, PRNG keys), and verifies the checksums. Optimizer state
is matched by parameter address, so a checkpoint restores into an edited optax chain
(:mod:`jaxlib_ext.restore_plan`), and :mod:`jaxlib_ext.layouts` conversions restore it into
another layout (scanned <-> per-layer, expert order, replicas, fused projections).

Orbax does the I/O (atomic commit through a temporary directory, async save); this module adds
the manifest, the checks and typed errors (:class:`CheckpointError` and its subclasses).

Reliability: a save is committed atomically (a killed save leaves the previous steps intact and
its leftovers are removed by the next save into the directory; opening a directory only to read
it deletes nothing, so an evaluator can read while a trainer writes); an error in a
background save is raised by the next call; a corrupt or truncated step raises
:class:`CorruptCheckpointError` naming the step, the leaf and the data directory, and
``restore(..., fallback=True)`` goes back to the newest good step.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxlib_ext.checksums import checksum_strings
from jaxlib_ext.layouts import Layout, convert
from jaxlib_ext.restore_plan import RestorePlan, describe, leaf_key, node_classes, plan_restore
from parallel.rules import indivisible_dims, replicate_dims, state_param_paths

FORMAT = "jaxlib-ext-checkpoint/1"
_ARRAYS, _MANIFEST = "arrays", "manifest"
_log = logging.getLogger(__name__)
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(Exception):
    """Base class of every checkpoint error; the message names the step and, where known, the
    leaf path and the file."""


class MissingStepError(CheckpointError):
    """The requested step (or any step) is not in the directory."""


class StructureMismatchError(CheckpointError):
    """The target asks for leaves the checkpoint does not have, or with another shape/dtype."""


class CorruptCheckpointError(CheckpointError):
    """A leaf's bytes do not match its checksum, or its data could not be read."""


class SaveError(CheckpointError):
    """A save failed (raised by the next call after an asynchronous save's failure)."""


class IncompatibleLayoutError(CheckpointError):
    """The target's sharding cannot hold the saved array (e.g. a dimension not divisible)."""


def _version() -> str:
    try:
        return metadata.version("jaxlib-ext")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _plain(x: jax.Array) -> jax.Array:
    return jax.random.key_data(x) if _is_key(x) else x


def _roles(state: Any, keys: list[str]) -> dict[str, str]:
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
        elif _is_key(leaf):
            roles[key] = "rng"
        elif leaf.ndim == 0 and jnp.issubdtype(leaf.dtype, jnp.integer):
            roles[key] = "counter"
    return roles


class Checkpointer:
    """Saves and restores train states in ``directory``, one subdirectory per step.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> with Checkpointer(tempfile.mkdtemp(), async_save=False) as ckpt:
      ...     ckpt.save(1, {"w": jnp.arange(4.0)}, extra={"data": {"epoch": 0}})
      ...     restored, extra = ckpt.restore(jax.eval_shape(lambda: {"w": jnp.zeros(4)}))
      >>> restored["w"].tolist(), extra
      ([0.0, 1.0, 2.0, 3.0], {'data': {'epoch': 0}})
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        verify: str = "full",
    ):
        if verify not in ("full", "sample", "none"):
            raise ValueError(f"`verify` must be 'full', 'sample' or 'none', got {verify=}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"`max_to_keep` must be >= 1 or None, got {max_to_keep=}")
        self.directory = Path(directory).absolute()
        self.verify = verify
        self._leftovers_removed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # see _remove_leftovers
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_ARRAYS, _MANIFEST)
        )

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Waits for a save in flight, then releases Orbax's resources; raises
        :class:`SaveError` if that save failed."""
        try:
            self.wait()
        finally:
            self._manager.close()

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, extra: dict | None = None, rules: Any = None) -> None:
        """Saves ``state`` (any pytree of arrays) and ``extra`` (JSON) as ``step``.

        Asynchronous by default: returns once the arrays are copied off the devices; a failure
        of the background write is raised by the next call (or by :meth:`wait`).

        Args:
          step: the step number (the subdirectory's name).
          state: a pytree of arrays, e.g. a ``TrainState``.
          extra: JSON-serializable data, e.g. ``{"data": data_state.to_dict()}``.
          rules: the sharding rules the state was placed with, recorded for information.
        """
        # Take the previous save's outcome first (Orbax would wait for it anyway): checking only
        # for its error here could consume the error before Orbax's own finalize sees it, which
        # then retires older steps as if the failed save had committed.
        self.wait()
        if not self._leftovers_removed:
            self._remove_leftovers()
        self._manager.reload()  # the steps on disk, also those other processes wrote
        leaves_with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
        keys = [leaf_key(p) for p, _ in leaves_with_paths]
        if len(set(keys)) != len(keys):
            raise StructureMismatchError(f"step {step}: two leaves share a storage key")
        arrays = {k: _plain(x) for k, (_, x) in zip(keys, leaves_with_paths, strict=True)}
        checksums = checksum_strings(list(arrays.values()))
        roles = _roles(state, keys)
        mesh = None
        for _, x in leaves_with_paths:
            sharding = getattr(x, "sharding", None)
            if getattr(sharding, "mesh", None) is not None:
                mesh = {str(k): int(v) for k, v in sharding.mesh.shape.items()}
                break
        manifest = {
            "format": FORMAT,
            "library_version": _version(),
            "step": int(step),
            "saved_mesh": mesh,
            "saved_process_count": jax.process_count(),
            "saved_rules": None if rules is None else [[n, _jsonable(a)] for n, a in rules],
            "leaves": {
                k: {
                    "role": roles[k],
                    "dtype": str(x.dtype),
                    "shape": list(x.shape),
                    "stored_dtype": str(arrays[k].dtype),
                    "stored_shape": list(arrays[k].shape),
                    "saved_spec": _spec_string(x),
                    "checksum": c,
                }
                for k, (_, x), c in zip(keys, leaves_with_paths, checksums, strict=True)
            },
            "nodes": node_classes(state),
            "extra": extra,
        }
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{_ARRAYS: ocp.args.PyTreeSave(arrays), _MANIFEST: ocp.args.JsonSave(manifest)}
            ),
        )

    def _remove_leftovers(self) -> None:
        """Deletes the temporary directories of saves that were killed before they committed.

        Done by the first ``save`` rather than on opening (as Orbax would), so that opening a
        directory to read it never deletes the save another process has in flight.
        """
        if jax.process_index() == 0 and self.directory.exists():
            for path in self.directory.glob(f"*{_TMP_MARK}*"):
                _log.info("removing the leftovers of an unfinished save: %s", path)
                shutil.rmtree(path, ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxlib_ext.checkpoint: leftovers removed")
        self._leftovers_removed = True

    def wait(self) -> None:
        """Blocks until the save in flight is committed.

        Raises:
          SaveError: the save failed in the background (raised once); the step list is read
            again from the disk, so it holds exactly the committed steps.
        """
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as err:
            self._manager.reload()
            raise SaveError(
                f"a background save in {self.directory} failed: {type(err).__name__}: "
                f"{_short(str(err))}"
            ) from err

    # -- reading ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first, as they are on the disk now (so a reader sees the
        steps another process saved since it opened the directory)."""
        return _committed_steps(self.directory)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _step_to_read(self, step: int | None) -> tuple[int, list[int]]:
        candidates = self.steps()
        if not candidates:
            raise MissingStepError(f"no checkpoint in {self.directory}")
        if step is None:
            step = candidates[-1]
        if step not in candidates:
            raise MissingStepError(f"step {step} not in {self.directory} (steps: {candidates})")
        return step, candidates

    def plan(
        self, target: Any, *, step: int | None = None, layouts: Sequence[Layout] = ()
    ) -> RestorePlan:
        """Which saved leaf would fill which leaf of ``target``, read from the manifest only.

        Use it to check, before restoring into an edited optimizer chain or another layout,
        what is carried over, what moves, what needs ``init`` and what is left unused.
        """
        self.wait()
        step, _ = self._step_to_read(step)
        return _Pairing(target, manifest(self.directory, step), layouts).plan

    def restore(
        self,
        target: Any,
        *,
        step: int | None = None,
        fallback: bool = False,
        init: Any = None,
        layouts: Sequence[Layout] = (),
        on_indivisible: str = "error",
    ):
        """Restores ``step`` (default: the latest) into ``target``'s structure and shardings.

        Every target leaf is filled from the saved leaf with the same path; when the optimizer
        chain was edited since the save (a transform added, adam -> spam), from the saved leaf
        with the same address: the same parameter and field (``mu`` of ``params/blocks/0/...``)
        and the same counters (see :mod:`jaxlib_ext.restore_plan` and :meth:`plan`). Leaves
        that nothing fills are taken from ``init`` and logged by path; without ``init`` they are
        an error. Nothing is zero-filled.

        Args:
          target: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays whose
            shardings are used; PRNG key leaves come back as keys.
          step: the step; None for the latest.
          fallback: when the step is corrupt, restore the newest older step that is good.
          init: a state with ``target``'s structure (e.g. the new chain's freshly initialized
            state) giving the values of leaves the checkpoint cannot fill.
          layouts: :class:`jaxlib_ext.layouts.Layout` conversions from the saved layout to the
            target's (e.g. ``[UnstackLayers("blocks", L)]`` to restore a scanned model into an
            unrolled one). Leaves they touch are read replicated on the target's mesh.
          on_indivisible: a target sharding that splits a dimension over mesh axes that do not
            divide it (e.g. 3 devices for a dimension of 8) raises
            :class:`IncompatibleLayoutError` naming the leaf (``"error"``), or is restored with
            that dimension replicated instead (``"replicate"``, the documented fallback: the
            leaf's sharding then differs from the target's in that dimension only).

        Returns:
          ``(state, extra)``.

        Raises:
          MissingStepError, StructureMismatchError, CorruptCheckpointError,
          IncompatibleLayoutError.
        """
        if on_indivisible not in ("error", "replicate"):
            raise ValueError(
                f"`on_indivisible` must be 'error' or 'replicate', got {on_indivisible=}"
            )
        self.wait()
        step, candidates = self._step_to_read(step)
        order = [s for s in reversed(candidates) if s <= step] if fallback else [step]
        errors = []
        for s in order:
            try:
                return self._restore_step(target, s, init, tuple(layouts), on_indivisible)
            except CorruptCheckpointError as err:
                if not fallback:
                    raise
                _log.warning("step %d is not usable, falling back: %s", s, err)
                errors.append(str(err))
        raise CorruptCheckpointError("no good step to fall back to:\n" + "\n".join(errors))

    def _restore_step(self, target, step, init, layouts, on_indivisible):
        info = manifest(self.directory, step)
        pairing = _Pairing(target, info, layouts)
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
        elif any(t != s for t, s in plan.sources.items()):
            _log.info("step %d restored into an edited state:\n%s", step, plan)

        placements = {}
        for key, leaf in zip(pairing.keys, pairing.leaves, strict=True):
            placements[key] = _placement(step, key, leaf, on_indivisible)
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
        loaded = self._read(step, abstract)
        if self.verify != "none":
            checked = sorted(loaded)
            if self.verify == "sample":
                checked = checked[:: max(1, len(checked) // 8)]
            saved = info["leaves"]
            sums = checksum_strings([loaded[k] for k in checked])
            for key, got in zip(checked, sums, strict=True):
                if got != saved[key]["checksum"]:
                    raise CorruptCheckpointError(
                        f"step {step}, leaf {key}: checksum {got} != saved "
                        f"{saved[key]['checksum']} (data in {self.directory / str(step) / _ARRAYS})"
                    )
        view = convert(loaded, layouts) if layouts else loaded
        out = []
        for i, (key, leaf) in enumerate(zip(pairing.keys, pairing.leaves, strict=True)):
            if key in plan.sources:
                value = view[plan.sources[key]]
                if _is_key(leaf):
                    impl = jax.random.key_impl(leaf) if isinstance(leaf, jax.Array) else None
                    value = jax.random.wrap_key_data(value, impl=impl)
            else:
                value = init_leaves[i]
            placement = placements[key]
            if placement is not None and getattr(value, "sharding", None) != placement:
                value = jax.device_put(value, placement)
            out.append(value)
        return pairing.treedef.unflatten(out), info["extra"]

    def _read(self, step: int, abstract: dict) -> dict:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        try:
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _ARRAYS: ocp.args.PyTreeRestore(
                            abstract, restore_args=restore_args, partial_restore=True
                        )
                    }
                ),
            )[_ARRAYS]
        except Exception as err:  # TensorStore/OCDBT errors for truncated or missing files
            raise CorruptCheckpointError(
                f"step {step}: the data under {self.directory / str(step) / _ARRAYS} could not "
                f"be read: {type(err).__name__}: {_short(str(err))}"
            ) from err


class _Pairing:
    """The target's leaves, the saved leaves (converted by ``layouts``) and the plan that
    pairs them."""

    def __init__(self, target: Any, info: dict, layouts: Sequence[Layout]):
        leaves_with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(target)
        self.keys = [leaf_key(p) for p, _ in leaves_with_paths]
        self.leaves = [x for _, x in leaves_with_paths]
        self.wanted = {k: _stored_struct(x) for k, x in zip(self.keys, self.leaves, strict=True)}
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


def _short(message: str, limit: int = 400) -> str:
    """An I/O error's message without TensorStore's spec dump, at most ``limit`` characters."""
    message = message.split(" [tensorstore_spec", 1)[0]
    return message if len(message) <= limit else message[:limit] + " ..."


def _spec_string(x: Any) -> str | None:
    sharding = getattr(x, "sharding", None)
    return str(tuple(sharding.spec)) if isinstance(sharding, NamedSharding) else None


def _jsonable(axes: Any) -> Any:
    return list(axes) if isinstance(axes, (tuple, list)) else axes


def _stored_struct(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype a leaf is stored with (a PRNG key as its key data)."""
    if _is_key(leaf):
        return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(tuple(leaf.shape), jnp.dtype(leaf.dtype))


def _placement(step: int, key: str, leaf: Any, on_indivisible: str):
    """The sharding a target leaf is restored with: its own, checked for divisibility."""
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


def _committed_steps(root: Path) -> list[int]:
    """Steps whose directory exists under its final name: Orbax renames a step's temporary
    directory only once everything in it is written."""
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def manifest(directory: str | Path, step: int | None = None) -> dict:
    """The manifest of ``step`` (default: the latest) without loading any array.

    Raises:
      MissingStepError: no such step.
      CorruptCheckpointError: the manifest is unreadable.
    """
    root = Path(directory).absolute()
    steps = _committed_steps(root)
    if not steps:
        raise MissingStepError(f"no checkpoint in {root}")
    step = steps[-1] if step is None else int(step)
    path = root / str(step) / _MANIFEST / "metadata"
    if step not in steps:
        raise MissingStepError(f"step {step} not in {root} (steps: {steps})")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"step {step}: manifest {path} unreadable: {err}") from err
    if data.get("format") != FORMAT:
        raise CorruptCheckpointError(f"step {step}: {path} is not a {FORMAT} manifest")
    return data


__all__ = [
    "FORMAT",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "IncompatibleLayoutError",
    "MissingStepError",
    "SaveError",
    "StructureMismatchError",
    "leaf_key",
    "manifest",
]
