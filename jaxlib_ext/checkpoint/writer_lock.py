"""The writer lock of a checkpoint directory: one process saves, any number read.

The lock is the file :data:`~jaxlib_ext.checkpoint.steps.LOCK_FILE` in the directory, holding
the owner's pid, host and start time (JSON), and an exclusive ``flock`` on it that the writer
keeps while it is open. The kernel drops a ``flock`` when its process dies, ``kill -9``
included, so a lock file left by a dead writer is taken over without any action. On a file
system without ``flock`` the recorded pid decides: a live pid on this host keeps the lock, a
dead one is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxlib_ext.checkpoint.errors import DirectoryLockedError, SaveError
from jaxlib_ext.checkpoint.steps import LOCK_FILE


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _locked_message(root: Path, owner: dict) -> str:
    return (
        f"{root} is locked by another writer: pid {owner.get('pid', '?')} on host "
        f"{owner.get('host', '?')} (since {owner.get('since', '?')}), see {root / LOCK_FILE}. "
        "Readers may restore from it meanwhile; to save here, close that writer first (a dead "
        "writer's lock is taken over automatically)."
    )


def acquire(root: Path) -> int:
    """Takes the writer lock of ``root`` (which must exist) and records this process in it.

    Args:
      root: the checkpoint directory.

    Returns:
      The lock file's descriptor: keep it open while writing, pass it to :func:`release`.

    Raises:
      DirectoryLockedError: another live writer holds the lock (naming its pid and host).
      SaveError: the lock file cannot be created (read-only or full disk).

    Example:
      >>> import tempfile
      >>> root = Path(tempfile.mkdtemp())
      >>> fd = acquire(root)
      >>> json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
      True
      >>> release(fd)
    """
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SaveError(f"cannot create the writer lock {path}: {err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise DirectoryLockedError(_locked_message(root, _owner(path))) from None
        owner = _owner(path)  # no flock on this file system: the recorded pid decides
        same_host = owner.get("host") == socket.gethostname()
        pid = owner.get("pid")
        if same_host and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            os.close(fd)
            raise DirectoryLockedError(_locked_message(root, owner)) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as err:
        os.close(fd)
        raise SaveError(f"cannot write the writer lock {path}: {err}") from err
    return fd


def release(fd: int) -> None:
    """Releases a lock :func:`acquire` returned (the file stays, owned by nobody).

    Args:
      fd: the descriptor :func:`acquire` returned.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = ["acquire", "release"]
