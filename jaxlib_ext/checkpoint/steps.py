"""Which steps of a checkpoint directory are complete, and the names of its parts.

Orbax writes step ``S`` into a temporary directory and renames it to ``S`` only once every file
in it is written, and retires an old step (``max_to_keep``) by renaming it into
:data:`RETIRED` before deleting it. So a directory named by a step number that holds its
manifest is a complete step; one without (a step damaged by hand, or half deleted by an older
version of this library) is incomplete: it is not listed, and the next save removes it.
"""

from __future__ import annotations

from pathlib import Path

ARRAYS = "arrays"  # the Orbax item holding the arrays, a flat dict keyed by leaf path
MANIFEST = "manifest"  # the Orbax item holding the manifest (JSON)
MANIFEST_FILE = "metadata"  # the manifest's file inside its item directory
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's mark on a save's temporary directories
RETIRED = "retired-steps"  # old steps are renamed in here, then deleted
LOCK_FILE = "writer.lock"  # held by the one process that saves into the directory


def manifest_path(root: Path, step: int) -> Path:
    """The manifest file of ``step`` under ``root``."""
    return root / str(step) / MANIFEST / MANIFEST_FILE


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.name.isdigit() and p.is_dir()]


def committed_steps(root: Path) -> list[int]:
    """Complete steps (final name, manifest present), oldest first.

    Args:
      root: the checkpoint directory.

    Returns:
      The step numbers; ``[]`` when ``root`` does not exist or is not a directory.

    Example:
      >>> import tempfile
      >>> committed_steps(Path(tempfile.mkdtemp()))
      []
    """
    return sorted(
        int(p.name) for p in _step_dirs(root) if manifest_path(root, int(p.name)).is_file()
    )


def incomplete_steps(root: Path) -> list[int]:
    """Step directories under their final name without a manifest (not restorable).

    Args:
      root: the checkpoint directory.

    Returns:
      Their step numbers, oldest first.

    Example:
      >>> import tempfile
      >>> root = Path(tempfile.mkdtemp())
      >>> (root / "7" / "arrays").mkdir(parents=True)
      >>> incomplete_steps(root), committed_steps(root)
      ([7], [])
    """
    return sorted(
        int(p.name) for p in _step_dirs(root) if not manifest_path(root, int(p.name)).is_file()
    )


__all__ = [
    "ARRAYS",
    "LOCK_FILE",
    "MANIFEST",
    "MANIFEST_FILE",
    "RETIRED",
    "TMP_MARK",
    "committed_steps",
    "incomplete_steps",
    "manifest_path",
]
