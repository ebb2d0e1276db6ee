"""Which steps of a checkpoint directory are committed, and the names of their parts.

Orbax writes step ``S`` into a temporary directory and renames it to ``S`` only once every file
in it is written, so a directory named by a step number is a committed step.
"""

from __future__ import annotations

from pathlib import Path

ARRAYS = "arrays"  # the Orbax item holding the arrays, a flat dict keyed by leaf path
MANIFEST = "manifest"  # the Orbax item holding the manifest (JSON)
MANIFEST_FILE = "metadata"  # the manifest's file inside its item directory
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's mark on a save's temporary directories


def manifest_path(root: Path, step: int) -> Path:
    """The manifest file of ``step`` under ``root``."""
    return root / str(step) / MANIFEST / MANIFEST_FILE


def committed_steps(root: Path) -> list[int]:
    """Steps whose directory exists under its final name, oldest first.

    Args:
      root: the checkpoint directory.

    Returns:
      The step numbers; ``[]`` when ``root`` does not exist.

    Example:
      >>> import tempfile
      >>> committed_steps(Path(tempfile.mkdtemp()))
      []
    """
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


__all__ = ["ARRAYS", "MANIFEST", "MANIFEST_FILE", "TMP_MARK", "committed_steps", "manifest_path"]
