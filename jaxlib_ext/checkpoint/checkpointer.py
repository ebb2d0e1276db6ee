"""The :class:`Checkpointer`: saves and restores train states in a directory, one step each.

Orbax does the I/O (atomic commit through a temporary directory, async save); this module
orders the work: the writer lock (:mod:`~jaxlib_ext.checkpoint.writer_lock`), the manifest
(:mod:`~jaxlib_ext.checkpoint.manifest`), the leftovers of killed saves
(:mod:`~jaxlib_ext.checkpoint.cleanup`), the choice of step and the fallback to an older one;
reading one step is :mod:`~jaxlib_ext.checkpoint.reading`.

Saving a step at or below the latest saved step raises :class:`StepConflictError` (Orbax would
skip it silently); ``save(..., overwrite=True)`` replaces that step and removes every later one,
e.g. to continue after ``restore(fallback=True)`` went back past a corrupt step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlib_ext.checkpoint import writer_lock
from jaxlib_ext.checkpoint.checksums import checksum_strings
from jaxlib_ext.checkpoint.cleanup import remove_leftovers, remove_retired, retire_steps
from jaxlib_ext.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingStepError,
    SaveError,
    StepConflictError,
    StructureMismatchError,
)
from jaxlib_ext.checkpoint.layouts import Layout
from jaxlib_ext.checkpoint.manifest import build_manifest, is_key, manifest
from jaxlib_ext.checkpoint.reading import Pairing, require_arrays, restore_step, short_error
from jaxlib_ext.checkpoint.restore_plan import RestorePlan, leaf_key
from jaxlib_ext.checkpoint.steps import ARRAYS, MANIFEST, RETIRED, committed_steps

_log = logging.getLogger("jaxlib_ext.checkpoint")


def _plain(x: jax.Array) -> jax.Array:
    return jax.random.key_data(x) if is_key(x) else x


class Checkpointer:
    """Saves and restores train states in ``directory``, one subdirectory per step.

    Opening one reads nothing and creates nothing; the first :meth:`save` creates the
    directory and takes its writer lock (held until :meth:`close`): a second writer gets
    :class:`DirectoryLockedError`, readers are never blocked.

    Args:
      directory: the checkpoint directory.
      max_to_keep: how many of the newest steps to keep (None: all).
      async_save: save in the background (a failure is raised by the next call).
      verify: check the checksums of every leaf read (``"full"``), about 8 of them
        (``"sample"``) or none (``"none"``).

    Raises:
      ValueError: ``verify`` or ``max_to_keep`` out of range.

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
        self._async = async_save
        self._writing = False  # the first save created the directory, took the lock, cleaned
        self._lock: int | None = None  # the writer lock's descriptor (process 0), once writing
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=False,  # a reader never creates the directory; the first save does
            cleanup_tmp_directories=False,  # the writer does, under its lock: _start_writing
            todelete_subdir=RETIRED,  # old steps leave the listing by an atomic rename
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(ARRAYS, MANIFEST)
        )

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Waits for a save in flight, deletes the steps it retired, then releases Orbax's
        resources and the writer lock; raises :class:`SaveError` if that save failed."""
        try:
            self.wait()
            if self._writing:
                self._on_primary(lambda: remove_retired(self.directory), "retired steps removed")
        finally:
            try:
                self._manager.close()
            finally:
                if self._lock is not None:
                    writer_lock.release(self._lock)
                    self._lock = None

    # -- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        extra: dict | None = None,
        rules: Any = None,
        overwrite: bool = False,
    ) -> None:
        """Saves ``state`` (any pytree of arrays) and ``extra`` (JSON) as ``step``.

        Asynchronous by default: returns once the arrays are copied off the devices; a failure
        of the background write is raised by the next call (or by :meth:`wait`).

        Args:
          step: the step number (the subdirectory's name).
          state: a pytree of arrays, e.g. a ``TrainState``.
          extra: JSON-serializable data, e.g. ``{"data": data_state.to_dict()}``.
          rules: the sharding rules the state was placed with, recorded for information.
          overwrite: allow ``step`` at or below the latest saved step: that step and every
            later one are removed (renamed out of the listing, then deleted) before the save.

        Raises:
          StepConflictError: ``step`` is at or below the latest saved step and ``overwrite``
            is False (nothing is written).
          DirectoryLockedError: another writer holds the directory.
          SaveError: the previous asynchronous save failed, or the disk refused this one
            (read-only, full, not a directory).
          StructureMismatchError: a leaf is not an array, or two leaves share a storage key.
        """
        # Take the previous save's outcome first (Orbax would wait for it anyway): checking only
        # for its error here could consume the error before Orbax's own finalize sees it, which
        # then retires older steps as if the failed save had committed.
        self.wait()
        step = int(step)
        leaves_with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
        keys = [leaf_key(p) for p, _ in leaves_with_paths]
        require_arrays([x for _, x in leaves_with_paths], keys, step=step, what="state")
        if len(set(keys)) != len(keys):
            raise StructureMismatchError(f"step {step}: two leaves share a storage key")
        self._start_writing()
        self._on_primary(lambda: remove_retired(self.directory), "retired steps removed")
        later = [s for s in self.steps() if s >= step]
        if later and not overwrite:
            raise StepConflictError(
                f"step {step} is at or below the latest saved step {later[-1]} in "
                f"{self.directory} (steps: {self.steps()}); nothing was saved. Save a step "
                f"after {later[-1]}, or pass overwrite=True to replace steps {later} (this "
                "step and every later one; e.g. after restore(fallback=True) went back past a "
                "corrupt step)"
            )
        arrays = {k: _plain(x) for k, (_, x) in zip(keys, leaves_with_paths, strict=True)}
        checksums = checksum_strings(list(arrays.values()))
        info = build_manifest(step, state, arrays, checksums, extra=extra, rules=rules)
        try:
            if later:
                _log.warning("step %d: overwrite=True removes steps %s", step, later)
                self._on_primary(lambda: retire_steps(self.directory, later), "retired")
            self._manager.reload()  # the steps on disk, also those other processes wrote
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{ARRAYS: ocp.args.PyTreeSave(arrays), MANIFEST: ocp.args.JsonSave(info)}
                ),
            )
        except CheckpointError:
            raise
        except Exception as err:  # the disk refused it: read-only, full, not a directory
            self._manager.reload()
            raise SaveError(
                f"step {step}: saving into {self.directory} failed: {type(err).__name__}: "
                f"{short_error(str(err))}"
            ) from err
        if not saved:  # Orbax skipped it (it should not: the steps were checked above)
            raise SaveError(f"step {step}: Orbax declined to save it in {self.directory}")
        if not self._async:  # the steps max_to_keep retired: gone before save returns
            self._on_primary(lambda: remove_retired(self.directory), "retired steps removed")

    def _on_primary(self, action, what: str) -> None:
        """Runs ``action`` on process 0 (an ``OSError`` becomes :class:`SaveError`), then
        waits for every process; an error on process 0 is raised on every process."""
        failure = None
        if jax.process_index() == 0:
            try:
                action()
            except CheckpointError as err:
                failure = err
            except OSError as err:
                failure = SaveError(f"{self.directory}: {what} failed: {err}")
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            flag = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
            if failure is None and int(flag):
                failure = SaveError(f"{self.directory}: {what} failed on process 0")
        if failure is not None:
            raise failure

    def _start_writing(self) -> None:
        """Creates the directory, takes its writer lock (process 0) and removes the leftovers
        of killed saves and deletions; once per :class:`Checkpointer`.

        Done by the first ``save`` rather than on opening (as Orbax would), so that opening a
        directory to read it never deletes the save another process has in flight.

        Raises:
          DirectoryLockedError: another writer holds the directory.
          SaveError: the directory cannot be created or cleaned.
        """
        if self._writing:
            return

        def start() -> None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SaveError(
                    f"cannot create the checkpoint directory {self.directory}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            self._lock = writer_lock.acquire(self.directory)
            remove_leftovers(self.directory)

        self._on_primary(start, "taking the writer lock and removing leftovers")
        self._writing = True

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
                f"{short_error(str(err))}"
            ) from err

    # -- reading ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Complete steps (committed, manifest present), oldest first, as they are on the
        disk now (so a reader sees the steps another process saved since it opened the
        directory)."""
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _step_to_read(self, step: int | None) -> tuple[int, list[int]]:
        candidates = self.steps()
        if not self.directory.is_dir():
            what = "is not a directory" if self.directory.exists() else "does not exist"
            raise MissingStepError(f"no checkpoint in {self.directory}: the path {what}")
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

        Args:
          target: the restore target (see :meth:`restore`).
          step: the step; None for the latest.
          layouts: conversions from the saved layout to the target's.

        Returns:
          The :class:`~jaxlib_ext.checkpoint.restore_plan.RestorePlan`.

        Raises:
          MissingStepError, CorruptCheckpointError.
        """
        self.wait()
        step, _ = self._step_to_read(step)
        return Pairing(target, manifest(self.directory, step), layouts).plan

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
        and the same counters (see :mod:`jaxlib_ext.checkpoint.restore_plan` and :meth:`plan`).
        Leaves that nothing fills are taken from ``init`` and logged by path; without ``init``
        they are an error. Nothing is zero-filled.

        Args:
          target: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays whose
            shardings are used; PRNG key leaves come back as keys.
          step: the step; None for the latest.
          fallback: when the step is corrupt, restore the newest older step that is good.
          init: a state with ``target``'s structure (e.g. the new chain's freshly initialized
            state) giving the values of leaves the checkpoint cannot fill.
          layouts: :class:`jaxlib_ext.checkpoint.layouts.Layout` conversions from the saved
            layout to the target's (e.g. ``[UnstackLayers("blocks", L)]`` to restore a scanned
            model into an unrolled one). Leaves they touch are read replicated on the target's
            mesh.
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
                return restore_step(
                    self._manager,
                    self.directory,
                    manifest(self.directory, s),
                    target,
                    step=s,
                    init=init,
                    layouts=tuple(layouts),
                    on_indivisible=on_indivisible,
                    verify=self.verify,
                )
            except CorruptCheckpointError as err:
                if not fallback:
                    raise
                _log.warning("step %d is not usable, falling back: %s", s, err)
                errors.append(str(err))
        raise CorruptCheckpointError("no good step to fall back to:\n" + "\n".join(errors))


__all__ = ["Checkpointer"]
