"""Checkpoint reliability: kill -9 during an async save, the leftovers it leaves, errors of the
background write, and resuming (N steps, save, restore, K steps == N+K steps).

The SIGTERM behaviour of the demo is tested in ``test_demo.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer
from orbax.checkpoint._src.path import atomicity

import optim
from jaxlib_ext import checkpoint as C
from jaxlib_ext import train
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.mesh import make_mesh
from tests.jaxlib_ext.states import assert_same_state, is_key
from tests.multiprocess import REPO_ROOT

TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax 0.12 writes step S into S.orbax-checkpoint-tmp first


# -- a small state, recomputed identically in the child and here ------------------------------


def step1_state(mesh):
    """Step 1's state, from fixed seeds: sharded float32, bfloat16, an int32 counter, a PRNG key."""
    import jax
    import ml_dtypes
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(1)
    split, whole = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    w = rng.standard_normal((64, 48), np.float32)
    b = rng.standard_normal(48, np.float32).astype(ml_dtypes.bfloat16)
    return {
        "params": {"w": jax.device_put(w, split), "b": jax.device_put(b, whole)},
        "step": jax.device_put(np.int32(1), whole),
        "rng": jax.device_put(jax.random.key(7), whole),
    }


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _listing(directory: Path) -> list[str]:
    """The directory's entries but the writer's lock file (tested in test_checkpoint_writers)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "writer.lock")


def _bytes_under(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# -- kill -9 during an async save ----------------------------------------------------------------

_CHILD = """
import sys, threading
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from jaxlib_ext.checkpoint import Checkpointer
from parallel.mesh import make_mesh

{step1_state}

directory, megabytes = sys.argv[1], int(sys.argv[2])
mesh = make_mesh({{"fsdp": 4}})
ckpt = Checkpointer(directory)
ckpt.save(1, step1_state(mesh))
ckpt.wait()

# Hold back the commit (the rename of the temporary directory) of every later save, so the kill
# lands before it however fast this machine writes: the outcome does not depend on timing.
async def never_commit(*args, **kwargs):
    threading.Event().wait()

atomicity.on_commit_callback = never_commit
rows = megabytes * 2**20 // (4 * 1024)
big = jax.jit(
    lambda key: jax.random.normal(key, (rows, 1024)),
    out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")),
)(jax.random.key(2))
ckpt.save(2, {{"params": {{"big": big}}, "step": jnp.int32(2)}})
print("SAVE RETURNED", flush=True)
threading.Event().wait(300)
sys.exit(3)
"""


def _child_env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    """Polls ``condition`` (a file-system state the child creates) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"the child exited ({proc.returncode}) before {what}:\n" + log.read_text()
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text())
        time.sleep(0.01)


def _kill_during_save(directory: Path, when: str, megabytes: int = 256) -> list[str]:
    """Runs the child, SIGKILLs it at ``when``; returns the directory listing afterwards."""
    script = _CHILD.format(step1_state=inspect.getsource(step1_state))
    log = directory.parent / f"child-{when}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(directory), str(megabytes)],
            cwd=REPO_ROOT,
            env=_child_env(4),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        timer = threading.Timer(180, proc.kill)  # a hung child cannot hang the test
        timer.start()
        try:
            line = proc.stdout.readline()  # blocks until save(2) has returned
        finally:
            timer.cancel()
        assert line.strip() == "SAVE RETURNED", f"child said {line!r}:\n" + log.read_text()
        if when == "data_written":  # some of step 2's data files are on disk, uncommitted
            tmp = directory / f"2{TMP_MARK}"
            _wait_for(
                lambda: tmp.exists() and _bytes_under(tmp) > 4 * 2**20,
                120,
                "step 2's data files",
                proc,
                log,
            )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return _listing(directory)


@pytest.fixture(scope="module", params=["save_returned", "data_written"])
def killed_save(request, tmp_path_factory):
    """A checkpoint directory whose process was SIGKILLed during the async save of step 2."""
    directory = tmp_path_factory.mktemp(f"killed-{request.param}") / "ckpt"
    listing = _kill_during_save(directory, request.param)
    return directory, listing


def _copy(directory: Path, to: Path) -> Path:
    shutil.copytree(directory, to)
    return to


def test_kill_9_during_async_save_keeps_the_previous_step(killed_save, tmp_path, devices):
    directory = _copy(killed_save[0], tmp_path / "ckpt")
    # Step 2 was killed before its commit: only its temporary directory is there.
    assert killed_save[1] == ["1", f"2{TMP_MARK}"], killed_save[1]
    mesh = make_mesh({"fsdp": 8}, devices=devices)
    expected = step1_state(mesh)
    assert C.manifest(directory)["step"] == 1
    with C.Checkpointer(directory) as ckpt:
        assert ckpt.steps() == [1]
        assert ckpt.latest_step() == 1
        restored, extra = ckpt.restore(_abstract(expected))
    assert_same_state(restored, expected)
    assert extra is None


def test_leftovers_of_a_killed_save_do_not_break_saving_that_step_again(
    killed_save, tmp_path, devices
):
    directory = _copy(killed_save[0], tmp_path / "ckpt")
    assert f"2{TMP_MARK}" in _listing(directory)
    mesh = make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    again = {
        "params": {"big": jnp.arange(4096.0).reshape(64, 64) * 0.5},
        "step": jnp.int32(2),
    }
    with C.Checkpointer(directory) as ckpt:
        # The leftovers are ignored by readers and removed by the first save.
        assert ckpt.steps() == [1]
        ckpt.save(2, again, extra={"try": 2})
        ckpt.wait()
        assert ckpt.steps() == [1, 2] and ckpt.latest_step() == 2
    assert _listing(directory) == ["1", "2"], "the leftovers are gone"
    with C.Checkpointer(directory) as ckpt:
        restored, extra = ckpt.restore(_abstract(again))
        assert_same_state(restored, again)
        assert extra == {"try": 2}
        first = step1_state(mesh)
        assert_same_state(ckpt.restore(_abstract(first), step=1)[0], first)


def test_leftovers_appearing_under_an_open_checkpointer_do_not_break_the_save(tmp_path):
    """The temporary directory of a step already exists when that step is saved (a save of the
    same step that died in another process, or one that failed here): the save still commits."""
    state = {"w": jnp.arange(1000.0), "step": jnp.int32(3)}
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)  # the first save removes leftovers from before
        ckpt.wait()
        leftover = tmp_path / f"3{TMP_MARK}" / f"arrays{TMP_MARK}" / "ocdbt.process_0" / "d"
        leftover.mkdir(parents=True)
        (leftover / "garbage").write_bytes(os.urandom(10_000))
        ckpt.save(3, state)
        ckpt.wait()
        assert ckpt.steps() == [1, 3]
        assert_same_state(ckpt.restore(_abstract(state))[0], state)
    assert _listing(tmp_path) == ["1", "3"]


# -- an error in the background write ------------------------------------------------------------


class _Gates:
    """Orders the background work of an async save deterministically (Orbax internals, 0.12).

    * The commit (the rename of the step's temporary directory) waits until :meth:`commit` lets
      it go, so the test can act between ``save()`` returning and the commit.
    * Orbax's finalize thread of the failing save looks at the background thread's error only
      once the main thread waits for it (``CheckpointManager.wait_until_finished``) after the
      failure. This is one of the orders the threads can take by themselves: the one where the
      main thread can see the error first.
    """

    def __init__(self, monkeypatch):
        self.at_commit, self.commit_go = threading.Event(), threading.Event()
        self.background_done, self.finalize_go = threading.Event(), threading.Event()
        self.commit_go.set()
        self.finalize_go.set()
        self.failed = False  # the main thread's next wait lets the finalize thread go
        commit = atomicity.on_commit_callback
        thread_func = async_checkpointer._AsyncManager._thread_func
        wait_for_checkpointers = ocp.CheckpointManager._wait_for_checkpointers
        wait_until_finished = ocp.CheckpointManager.wait_until_finished

        async def gated_commit(*args, **kwargs):
            self.at_commit.set()
            await asyncio.to_thread(self.commit_go.wait, 60)
            return await commit(*args, **kwargs)

        def background(manager, *args, **kwargs):
            try:
                return thread_func(manager, *args, **kwargs)  # stores its error, if any
            finally:
                self.background_done.set()

        def finalize_waits(manager):
            self.finalize_go.wait(60)
            return wait_for_checkpointers(manager)

        def main_waits(manager):
            if self.failed:
                self.finalize_go.set()
            return wait_until_finished(manager)

        monkeypatch.setattr(atomicity, "on_commit_callback", gated_commit)
        monkeypatch.setattr(async_checkpointer._AsyncManager, "_thread_func", background)
        monkeypatch.setattr(ocp.CheckpointManager, "_wait_for_checkpointers", finalize_waits)
        monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", main_waits)

    def fail_a_save(self, ckpt: C.Checkpointer, directory: Path, step: int) -> None:
        """Saves ``step`` and deletes its temporary directory before the commit: a real I/O
        failure of the background write (the storage lost the files under the checkpoint)."""
        for event in (self.at_commit, self.commit_go, self.background_done, self.finalize_go):
            event.clear()
        self.failed = False
        ckpt.save(step, _small(step))
        assert self.at_commit.wait(60), "the background save never reached its commit"
        tmp = directory / f"{step}{TMP_MARK}"
        assert tmp.is_dir(), _listing(directory)
        shutil.rmtree(tmp)
        self.commit_go.set()
        assert self.background_done.wait(60)
        self.failed = True


def _small(step: int) -> dict:
    return {"w": jnp.full(1000, float(step)), "step": jnp.int32(step)}


def _next_call(ckpt: C.Checkpointer, how: str) -> None:
    if how == "wait":
        ckpt.wait()
    else:
        ckpt.save(5, _small(5))


@pytest.mark.parametrize("next_call", ["wait", "save"])
def test_an_error_of_the_background_write_is_raised_by_the_next_call(
    tmp_path, monkeypatch, next_call
):
    gates = _Gates(monkeypatch)
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, _small(3))
        ckpt.wait()
        gates.fail_a_save(ckpt, tmp_path, 4)
        # Orbax's error (a FileNotFoundError naming the missing file), as a typed SaveError.
        with pytest.raises(C.SaveError) as raised:
            _next_call(ckpt, next_call)
        assert f"4{TMP_MARK}" in str(raised.value), raised.value
        # Raised once; the failed step is not listed and the checkpointer goes on working.
        ckpt.wait()
        assert ckpt.steps() == [3] and ckpt.latest_step() == 3
        ckpt.save(5, _small(5))
        ckpt.wait()
        assert ckpt.steps() == [3, 5]
        assert_same_state(ckpt.restore(_abstract(_small(3)), step=3)[0], _small(3))
        assert_same_state(ckpt.restore(_abstract(_small(5)))[0], _small(5))
    assert _listing(tmp_path) == ["3", "5"]


@pytest.mark.parametrize("next_call", ["wait", "save"])
def test_a_failed_save_deletes_no_older_step_and_the_list_stays_true(
    tmp_path, monkeypatch, next_call
):
    """``max_to_keep`` retires old steps only once a newer one is committed: after a failed save
    the older steps are still on disk, listed by ``steps()`` and restorable."""
    gates = _Gates(monkeypatch)
    with C.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        ckpt.save(3, _small(3))
        ckpt.wait()
        gates.fail_a_save(ckpt, tmp_path, 4)
        with pytest.raises(C.SaveError):
            _next_call(ckpt, next_call)
        ckpt.wait()
        assert _listing(tmp_path) == ["3"], "a failed save must not delete the last good step"
        assert ckpt.steps() == [3] and ckpt.latest_step() == 3
        assert_same_state(ckpt.restore(_abstract(_small(3)))[0], _small(3))
        ckpt.save(5, _small(5))
        ckpt.wait()
        assert ckpt.steps() == [5]
    assert _listing(tmp_path) == ["5"]


# -- resume equivalence --------------------------------------------------------------------------

CFG = LMConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=16)
N, K = 2, 2
OPTIMIZERS = {"adamw": lambda: optax.adamw(1e-3), "spam": lambda: optim.spam(1e-3, density=0.5)}


def _batch(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).integers(0, 256, (8, 17), np.int32)


class _Run:
    """A model, optimizer and compiled train step on one mesh."""

    def __init__(self, tx, mesh):
        self.lm, self.tx, self.mesh = LanguageModel(CFG), tx, mesh
        self.shardings = train.train_state_shardings(self.lm, tx, mesh)
        self.batch_sharding = train.batch_sharding(mesh, global_batch=8)
        self.step_fn = train.make_train_step(
            train.lm_loss(self.lm), tx, self.shardings, self.batch_sharding
        )

    def init(self):
        return train.init_train_state(self.lm, self.tx, self.shardings, seed=0)

    def target(self):
        return train.abstract_train_state(self.lm, self.tx, self.shardings)

    def steps(self, state, first: int, count: int):
        losses = []
        for i in range(first, first + count):
            state, metrics = self.step_fn(state, train.shard_batch(_batch(i), self.batch_sharding))
            losses.append(float(metrics["loss"]))
        return state, losses


def _max_relative_difference(a, b) -> float:
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if is_key(x):
            np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
            continue
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.abs(y).max(), 1e-12)
        worst = max(worst, float(np.abs(x - y).max() / scale))
    return worst


@pytest.mark.parametrize(
    ("name", "other_axes", "other_devices"),
    [("adamw", {"fsdp": 1}, 1), ("spam", {"fsdp": 8}, 8)],
)
def test_resume_continues_exactly_on_the_same_mesh_and_closely_on_another(
    tmp_path, devices, name, other_axes, other_devices
):
    tx = OPTIMIZERS[name]()
    home = _Run(tx, make_mesh({"data": 2, "fsdp": 4}, devices=devices))
    uninterrupted, all_losses = home.steps(home.init(), 0, N + K)

    state, losses = home.steps(home.init(), 0, N)
    assert losses == all_losses[:N]
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(N, state, extra={"next_batch": N})
    del state

    with C.Checkpointer(tmp_path) as ckpt:  # as a new process would
        restored, extra = ckpt.restore(home.target())
    assert int(restored.step) == N and extra == {"next_batch": N}
    resumed, losses = home.steps(restored, extra["next_batch"], K)
    assert losses == all_losses[N:], "same mesh: the losses continue bit-exactly"
    assert_same_state(resumed, uninterrupted)

    # Another mesh reduces in another order, so the result is equal only up to float32 rounding.
    # Measured: about 1e-7 relative on the losses and 1e-6 of each leaf's largest value on the
    # state; asserted with a margin. PRNG keys (spam's) must still match exactly.
    away = _Run(tx, make_mesh(other_axes, devices=devices[:other_devices]))
    with C.Checkpointer(tmp_path) as ckpt:
        restored, _ = ckpt.restore(away.target())
    moved, losses = away.steps(restored, N, K)
    np.testing.assert_allclose(losses, all_losses[N:], rtol=1e-5)
    assert int(moved.step) == N + K
    assert _max_relative_difference(moved, uninterrupted) < 1e-4
