"""Removing what a checkpoint directory should not keep: the leftovers of killed saves, steps
retired by ``max_to_keep`` or replaced by ``overwrite=True``, incomplete step directories.

Only the writer (the holder of the directory's writer lock) calls these, so they never touch
a save in flight. Every removal first renames the step out of the listed names (an atomic
rename), so a kill at any moment leaves only complete steps listed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from jaxlib_ext.checkpoint.steps import RETIRED, TMP_MARK, incomplete_steps

_log = logging.getLogger("jaxlib_ext.checkpoint")


def remove_retired(root: Path) -> None:
    """Deletes the steps retired into ``root / RETIRED`` (by Orbax or :func:`retire_steps`).

    Args:
      root: the checkpoint directory.
    """
    retired = root / RETIRED
    if retired.exists():
        shutil.rmtree(retired)


def retire_steps(root: Path, steps: list[int]) -> None:
    """Renames ``steps`` out of the listing (atomically, one by one), then deletes them.

    Args:
      root: the checkpoint directory.
      steps: the steps to remove.

    Raises:
      OSError: the disk refused the rename or the deletion.

    Example:
      >>> import tempfile
      >>> root = Path(tempfile.mkdtemp())
      >>> (root / "3" / "manifest").mkdir(parents=True)
      >>> retire_steps(root, [3])
      >>> sorted(p.name for p in root.iterdir())
      []
    """
    if not steps:
        return
    retired = root / RETIRED
    retired.mkdir(exist_ok=True)
    for step in steps:
        target = retired / str(step)
        if target.exists():
            shutil.rmtree(target)
        (root / str(step)).rename(target)
    remove_retired(root)


def remove_leftovers(root: Path) -> None:
    """Deletes the temporary directories of saves that were killed before they committed,
    retired steps and incomplete step directories (see :mod:`jaxlib_ext.checkpoint.steps`).

    Args:
      root: the checkpoint directory.

    Raises:
      OSError: the disk refused a deletion.
    """
    if not root.is_dir():
        return
    for path in root.glob(f"*{TMP_MARK}*"):
        _log.info("removing the leftovers of an unfinished save: %s", path)
        shutil.rmtree(path, ignore_errors=True)
    incomplete = incomplete_steps(root)
    if incomplete:
        _log.warning("removing step directories without a manifest: %s in %s", incomplete, root)
    retire_steps(root, incomplete)
    remove_retired(root)


__all__ = ["remove_leftovers", "remove_retired", "retire_steps"]
