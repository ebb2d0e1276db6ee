"""The typed errors of checkpoints: every failure a save or a restore reports is one of these.

Each message names the step and, where known, the leaf path and the file, and says how to
proceed. ``restore(..., fallback=True)`` handles :class:`CorruptCheckpointError` (it goes back
to the newest good step); the others are the caller's to handle.

Example:
  >>> issubclass(CorruptCheckpointError, CheckpointError)
  True
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every checkpoint error; the message names the step and, where known, the
    leaf path and the file."""


class MissingStepError(CheckpointError):
    """The requested step (or any step) is not in the directory, or the directory does not
    exist (a restore never creates it)."""


class StructureMismatchError(CheckpointError):
    """The target asks for leaves the checkpoint does not have, or with another shape/dtype;
    or a state or target leaf is not an array."""


class CorruptCheckpointError(CheckpointError):
    """A step's files are damaged: a leaf's bytes do not match their checksum, its data could
    not be read, or the manifest is unreadable or fails its own checksum."""


class SaveError(CheckpointError):
    """A save failed: the disk refused the write (read-only, full, not a directory), or an
    asynchronous save failed in the background (raised by the next call)."""


class IncompatibleLayoutError(CheckpointError):
    """The target's sharding cannot hold the saved array (e.g. a dimension not divisible)."""


class StepConflictError(SaveError):
    """A save of a step at or below the latest saved step, without ``overwrite=True``.

    Orbax would skip such a save silently; after ``restore(fallback=True)`` went back past a
    corrupt step, that would leave the corrupt step the latest. The message names the step and
    the latest one and says how to proceed.
    """


class DirectoryLockedError(SaveError):
    """Another live process (or another :class:`Checkpointer` in this one) holds the
    directory's writer lock; the message names its pid and host. Readers are not affected."""


__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "IncompatibleLayoutError",
    "MissingStepError",
    "SaveError",
    "StepConflictError",
    "StructureMismatchError",
]
