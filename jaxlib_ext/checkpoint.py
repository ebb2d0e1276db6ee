"""Universal, verifiable checkpoints of any train state, on Orbax.

A checkpoint stores every array whole (logically), keyed by its path in the state, with a JSON
manifest: format and library version, the mesh it was saved from (information only), and for each
leaf its path, role, dtype, shape and a checksum of its logical bytes. A restore goes through a
target (``jax.ShapeDtypeStruct``s with shardings, e.g. ``jax.eval_shape`` of the state's init placed
with the library's rules on ANY mesh), so it reshards onto another mesh, device count or process
count, returns exactly the target's structure and types (optax NamedTuples, PRNG keys), and
verifies the checksums.

Orbax does the I/O (atomic commit through a temporary directory, async save); this module adds
the manifest, the checks and typed errors (:class:`CheckpointError` and its subclasses).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from parallel.rules import state_param_paths

FORMAT = "jaxlib-ext-checkpoint/1"
_ARRAYS, _MANIFEST = "arrays", "manifest"


class CheckpointError(Exception):
    """Base class of every checkpoint error; the message names the step and, where known, the
    leaf path and the file."""


class MissingStepError(CheckpointError):
    """The requested step (or any step) is not in the directory."""


class StructureMismatchError(CheckpointError):
    """The target asks for leaves the checkpoint does not have, or with another shape/dtype."""


class CorruptCheckpointError(CheckpointError):
    """A leaf's bytes do not match its checksum, or its data could not be read."""


class IncompatibleLayoutError(CheckpointError):
    """The target's sharding cannot hold the saved array (e.g. a dimension not divisible)."""


def _version() -> str:
    try:
        return metadata.version("jaxlib-ext")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_key(path: Sequence[Any]) -> str:
    """A state path as a storage key: ``opt_state/0/mu/blocks/0/mlp/wi``."""
    return "/".join(_key_name(p) for p in path) or "_root"


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _plain(x: jax.Array) -> jax.Array:
    return jax.random.key_data(x) if _is_key(x) else x


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per leaf, two uint32 sums over its logical bytes: plain and position-weighted.

    Integer sums wrap identically in any order, so the value does not depend on the sharding,
    device count or process count the array lives on.
    """
    out = []
    for x in leaves:
        flat = x.reshape(-1)
        width = flat.dtype.itemsize
        if flat.dtype == jnp.bool_:
            words = flat.astype(jnp.uint32)
        elif width == 4:
            words = jax.lax.bitcast_convert_type(flat, jnp.uint32)
        elif width == 2:
            words = jax.lax.bitcast_convert_type(flat, jnp.uint16).astype(jnp.uint32)
        elif width == 1:
            words = jax.lax.bitcast_convert_type(flat, jnp.uint8).astype(jnp.uint32)
        else:  # 8-byte types: both halves
            words = jax.lax.bitcast_convert_type(flat, jnp.uint32).reshape(-1)
        weights = (jnp.arange(words.shape[0], dtype=jnp.uint32) % jnp.uint32(65521)) + 1
        out.append(jnp.stack([jnp.sum(words), jnp.sum(words * weights)]))
    return out


def _checksum_strings(leaves: list[jax.Array]) -> list[str]:
    sums = jax.device_get(_checksums(leaves))
    return [f"{int(a):08x}{int(b):08x}" for a, b in sums]


def _roles(state: Any, keys: list[str]) -> dict[str, str]:
    """param / moment of param X / counter / rng / other, for a TrainState-like tree."""
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
        if _is_key(leaf):
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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
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
        """Waits for a save in flight, then releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, extra: dict | None = None) -> None:
        """Saves ``state`` (any pytree of arrays) and ``extra`` (JSON) as ``step``.

        Asynchronous by default: returns once the arrays are copied off the devices; a failure
        of the background write is raised by the next call (or by :meth:`wait`).
        """
        self._manager.check_for_errors()
        leaves_with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
        keys = [leaf_key(p) for p, _ in leaves_with_paths]
        if len(set(keys)) != len(keys):
            raise StructureMismatchError(f"step {step}: two leaves share a storage key")
        arrays = {k: _plain(x) for k, (_, x) in zip(keys, leaves_with_paths, strict=True)}
        checksums = _checksum_strings(list(arrays.values()))
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
            "leaves": {
                k: {
                    "role": roles[k],
                    "dtype": str(x.dtype),
                    "shape": list(x.shape),
                    "stored_dtype": str(arrays[k].dtype),
                    "checksum": c,
                }
                for k, (_, x), c in zip(keys, leaves_with_paths, checksums, strict=True)
            },
            "extra": extra,
        }
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{_ARRAYS: ocp.args.StandardSave(arrays), _MANIFEST: ocp.args.JsonSave(manifest)}
            ),
        )

    def wait(self) -> None:
        """Blocks until the save in flight is committed; raises its error if it failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    # -- reading ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target: Any, *, step: int | None = None, fallback: bool = False):
        """Restores ``step`` (default: the latest) into ``target``'s structure and shardings.

        Args:
          target: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays whose
            shardings are used; PRNG key leaves come back as keys.
          step: the step; None for the latest.
          fallback: when the step is corrupt, restore the newest older step that is good.

        Returns:
          ``(state, extra)``.

        Raises:
          MissingStepError, StructureMismatchError, CorruptCheckpointError,
          IncompatibleLayoutError.
        """
        self.wait()
        candidates = self.steps()
        if not candidates:
            raise MissingStepError(f"no checkpoint in {self.directory}")
        if step is None:
            step = candidates[-1]
        if step not in candidates:
            raise MissingStepError(f"step {step} not in {self.directory} (steps: {candidates})")
        order = [s for s in reversed(candidates) if s <= step] if fallback else [step]
        errors = []
        for s in order:
            try:
                return self._restore_step(target, s)
            except CorruptCheckpointError as err:
                if not fallback:
                    raise
                errors.append(str(err))
        raise CorruptCheckpointError("no good step to fall back to:\n" + "\n".join(errors))

    def _restore_step(self, target: Any, step: int):
        info = manifest(self.directory, step)
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
        keys = [leaf_key(p) for p, _ in leaves_with_paths]
        saved = info["leaves"]
        missing = [k for k in keys if k not in saved]
        if missing:
            raise StructureMismatchError(
                f"step {step}: the target has leaves the checkpoint lacks: {missing[:10]}"
                + (" ..." if len(missing) > 10 else "")
            )
        abstract = {}
        for key, (_, leaf) in zip(keys, leaves_with_paths, strict=True):
            want = (str(leaf.dtype), list(leaf.shape))
            have = (saved[key]["dtype"], saved[key]["shape"])
            if want != have:
                raise StructureMismatchError(
                    f"step {step}, leaf {key}: saved {have[0]}{have[1]}, target {want[0]}{want[1]}"
                )
            sharding = getattr(leaf, "sharding", None)
            if _is_key(leaf):
                impl_shape = jax.eval_shape(lambda k: jax.random.key_data(k), leaf).shape
                spec = () if sharding is None else tuple(sharding.spec)
                if sharding is not None:
                    spec = spec + (None,) * (len(impl_shape) - len(spec))
                    sharding = jax.sharding.NamedSharding(
                        sharding.mesh, jax.sharding.PartitionSpec(*spec)
                    )
                abstract[key] = jax.ShapeDtypeStruct(impl_shape, jnp.uint32, sharding=sharding)
            else:
                abstract[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(abstract)})
            )[_ARRAYS]
        except ValueError as err:
            if "divisible" in str(err).lower() or "indivisible" in type(err).__name__.lower():
                raise IncompatibleLayoutError(f"step {step}: {err}") from err
            raise CorruptCheckpointError(
                f"step {step}: the data under {self.directory / str(step) / _ARRAYS} could not "
                f"be read: {err}"
            ) from err
        except Exception as err:  # TensorStore/OCDBT errors for truncated or missing files
            raise CorruptCheckpointError(
                f"step {step}: the data under {self.directory / str(step) / _ARRAYS} could not "
                f"be read: {type(err).__name__}: {err}"
            ) from err
        if self.verify != "none":
            checked = keys if self.verify == "full" else keys[:: max(1, len(keys) // 8)]
            sums = _checksum_strings([restored[k] for k in checked])
            for key, got in zip(checked, sums, strict=True):
                if got != saved[key]["checksum"]:
                    raise CorruptCheckpointError(
                        f"step {step}, leaf {key}: checksum {got} != saved "
                        f"{saved[key]['checksum']} (data in {self.directory / str(step) / _ARRAYS})"
                    )
        out = []
        for key, (_, leaf) in zip(keys, leaves_with_paths, strict=True):
            value = restored[key]
            if _is_key(leaf):
                impl = jax.random.key_impl(leaf) if isinstance(leaf, jax.Array) else None
                value = jax.random.wrap_key_data(value, impl=impl)
                if getattr(leaf, "sharding", None) is not None:
                    value = jax.device_put(value, leaf.sharding)  # the target's exact sharding
            out.append(value)
        return treedef.unflatten(out), info["extra"]


def manifest(directory: str | Path, step: int | None = None) -> dict:
    """The manifest of ``step`` (default: the latest) without loading any array.

    Raises:
      MissingStepError: no such step.
      CorruptCheckpointError: the manifest is unreadable.
    """
    root = Path(directory).absolute()
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []
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
    "StructureMismatchError",
    "leaf_key",
    "manifest",
]
