"""kill -9 of a writer process: during the deletion of an old step (``max_to_keep``), and while it
holds the directory's writer lock. Each child announces the moment on stdout and then blocks,
so the kill lands exactly there whatever the machine's speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from jaxlib_ext import checkpoint as C
from tests.jaxlib_ext.checkpoint_states import abstract, small_state
from tests.jaxlib_ext.states import assert_same_state
from tests.multiprocess import REPO_ROOT

_STUCK_DELETION = """
import shutil, sys, threading
from pathlib import Path
from jaxlib_ext.checkpoint import Checkpointer
from tests.jaxlib_ext.checkpoint_states import small_state

def stuck_rmtree(path, *args, **kwargs):
    # The worst order for a reader: the manifest goes first, then the process dies mid-way.
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name != "metadata")
    if files:
        files[0].unlink()
    print("DELETING", path, flush=True)
    threading.Event().wait()

shutil.rmtree = stuck_rmtree
ckpt = Checkpointer(sys.argv[1], max_to_keep=1, async_save=False)
ckpt.save(1, small_state(1))
ckpt.save(2, small_state(2))  # retires step 1: the deletion blocks
print("NOT REACHED", flush=True)
"""

_HOLDS_THE_LOCK = """
import sys, threading
from jaxlib_ext.checkpoint import Checkpointer
from tests.jaxlib_ext.checkpoint_states import small_state

ckpt = Checkpointer(sys.argv[1], async_save=False)
ckpt.save(1, small_state(1))
print("SAVED", flush=True)
threading.Event().wait()
"""


def _run_until(script: str, directory: Path, expected: str) -> subprocess.Popen:
    """Starts ``script`` and returns it once it printed a line starting with ``expected``."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "PYTHONPATH": str(REPO_ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(directory)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(300, proc.kill)  # a hung child cannot hang the test
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    if not line.startswith(expected):
        proc.kill()
        raise AssertionError(f"child said {line!r}:\n{proc.stderr.read()}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def test_kill_9_during_the_deletion_of_an_old_step_lists_only_complete_steps(tmp_path):
    directory = tmp_path / "ckpt"
    _kill(_run_until(_STUCK_DELETION, directory, "DELETING"))
    target = abstract(small_state(0))
    with C.Checkpointer(directory, max_to_keep=1) as ckpt:
        assert ckpt.steps() == [2], sorted(p.name for p in directory.rglob("*"))
        assert_same_state(ckpt.restore(target)[0], small_state(2))
        assert_same_state(ckpt.restore(target, fallback=True)[0], small_state(2))
        ckpt.save(3, small_state(3))  # takes over the dead writer's lock, removes the leftovers
        ckpt.wait()
        assert ckpt.steps() == [3]
    assert sorted(p.name for p in directory.iterdir()) == ["3", "writer.lock"]


def test_a_writer_process_holds_the_lock_until_it_dies(tmp_path):
    directory = tmp_path / "ckpt"
    proc = _run_until(_HOLDS_THE_LOCK, directory, "SAVED")
    try:
        with C.Checkpointer(directory) as ckpt:
            try:
                ckpt.save(2, small_state(2))
                raise AssertionError("a second writer saved")
            except C.DirectoryLockedError as err:
                assert f"pid {proc.pid}" in str(err), err
            assert_same_state(ckpt.restore(abstract(small_state(0)))[0], small_state(1))
    finally:
        _kill(proc)
    with C.Checkpointer(directory) as ckpt:  # the dead writer's lock is taken over
        ckpt.save(2, small_state(2))
        ckpt.wait()
        assert ckpt.steps() == [1, 2]
