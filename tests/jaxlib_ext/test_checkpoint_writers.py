"""Who may write, which steps a save may take, and the typed errors of a refused save or read:
saves at or below the latest step, the writer lock, incomplete steps, missing directories,
non-array leaves, a full disk, partial moves into another optimizer."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlib_ext import checkpoint as C
from tests.jaxlib_ext.checkpoint_states import abstract, small_state
from tests.jaxlib_ext.states import assert_same_state

TARGET = abstract(small_state(0))


def _listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- a save at or below the latest step -----------------------------------------------------------


@pytest.mark.parametrize("step", [2, 3])
def test_a_save_at_or_below_the_latest_step_is_refused_naming_the_step(tmp_path, step):
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, small_state(1))
        ckpt.save(3, small_state(3))
        with pytest.raises(C.StepConflictError, match=f"step {step} is at or below .* step 3"):
            ckpt.save(step, small_state(7))
        with pytest.raises(C.StepConflictError, match="overwrite=True"):
            ckpt.save(step, small_state(7))
        ckpt.wait()
        assert ckpt.steps() == [1, 3], "nothing was written"
        assert_same_state(ckpt.restore(TARGET)[0], small_state(3))
    assert issubclass(C.StepConflictError, C.SaveError)


def test_resume_after_a_fallback_overwrites_the_corrupt_step(tmp_path):
    """Step 2 corrupt -> restore falls back to step 1 -> train -> save(2): refused without
    ``overwrite``; with it, step 2 is the new state and the only latest."""
    with C.Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, small_state(step), extra={"step": step})
    for data in (tmp_path / "2" / "arrays" / "d").iterdir():
        data.write_bytes(data.read_bytes()[:10])
    (tmp_path / "3" / "manifest" / "metadata").write_text("{}")
    with C.Checkpointer(tmp_path) as ckpt:
        _, extra = ckpt.restore(TARGET, fallback=True)
        assert extra == {"step": 1}
        with pytest.raises(C.StepConflictError):
            ckpt.save(2, small_state(20))
        ckpt.save(2, small_state(20), extra={"step": 2}, overwrite=True)
        ckpt.wait()
        assert ckpt.steps() == [1, 2] and ckpt.latest_step() == 2
        state, extra = ckpt.restore(TARGET)
    assert_same_state(state, small_state(20))
    assert extra == {"step": 2}
    assert _listing(tmp_path) == ["1", "2", "writer.lock"]


# -- the writer lock ------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_readers_are_not(tmp_path):
    big = {"w": jnp.arange(1 << 20, dtype=jnp.float32)}
    with C.Checkpointer(tmp_path) as first:
        first.save(1, big)  # in flight while the others open the directory
        second = C.Checkpointer(tmp_path)
        with pytest.raises(
            C.DirectoryLockedError, match=f"locked by another writer: pid {os.getpid()}"
        ):
            second.save(2, small_state(2))
        reader = C.Checkpointer(tmp_path)
        first.wait()
        assert reader.steps() == [1]
        assert_same_state(reader.restore(abstract(big))[0], big)
        first.save(2, big)  # the first writer goes on
    assert first.steps() == [1, 2]
    second.save(3, big)  # the lock was released by close()
    second.close()
    reader.close()
    assert second.steps() == [1, 2, 3]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / "writer.lock").write_text(f'{{"pid": {pid}, "host": "{os.uname().nodename}"}}')
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, small_state(1))
        assert f'"pid": {os.getpid()}' in (tmp_path / "writer.lock").read_text()


# -- complete steps only --------------------------------------------------------------------------


def test_a_step_without_its_manifest_is_not_listed_and_the_next_save_removes_it(tmp_path, caplog):
    """What a kill during a deletion by an older version left: step 1 half deleted."""
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, small_state(1))
        ckpt.save(2, small_state(2))
    (tmp_path / "2" / "manifest" / "metadata").unlink()
    with C.Checkpointer(tmp_path) as ckpt:
        assert ckpt.steps() == [1] and ckpt.latest_step() == 1
        assert_same_state(ckpt.restore(TARGET)[0], small_state(1))
        with pytest.raises(C.MissingStepError, match="step 2 not in"):
            ckpt.restore(TARGET, step=2)
        assert _listing(tmp_path) == ["1", "2", "writer.lock"], "a reader deletes nothing"
        with caplog.at_level(logging.WARNING, "jaxlib_ext.checkpoint"):
            ckpt.save(3, small_state(3))
        assert "without a manifest: [2]" in caplog.text
    assert _listing(tmp_path) == ["1", "3", "writer.lock"]


# -- directories ----------------------------------------------------------------------------------


def test_reading_a_missing_directory_is_typed_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope" / "ckpt"
    with C.Checkpointer(missing) as ckpt:
        assert ckpt.steps() == [] and ckpt.latest_step() is None
        with pytest.raises(C.MissingStepError, match="does not exist"):
            ckpt.restore(TARGET)
        with pytest.raises(C.MissingStepError, match="does not exist"):
            ckpt.plan(TARGET)
    with pytest.raises(C.MissingStepError, match="does not exist"):
        C.manifest(missing)
    assert not (tmp_path / "nope").exists()


def test_a_file_in_place_of_the_directory_is_typed(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with C.Checkpointer(path) as ckpt:
        with pytest.raises(C.MissingStepError, match="is not a directory"):
            ckpt.restore(TARGET)
        with pytest.raises(C.SaveError, match="cannot create the checkpoint directory"):
            ckpt.save(1, small_state(1))
    with C.Checkpointer(path / "below") as ckpt:
        with pytest.raises(C.SaveError, match="NotADirectoryError"):
            ckpt.save(1, small_state(1))


@pytest.fixture
def small_file_limit():
    """Files this process writes may not exceed 64 KiB (as on a full disk: writes fail)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_in_a_synchronous_save_is_a_save_error(tmp_path, small_file_limit):
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(1 << 18, np.float32))}
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.zeros(4)})
        with pytest.raises(C.SaveError, match="step 2: saving into"):
            ckpt.save(2, big)
        assert ckpt.steps() == [1]
        ckpt.save(3, {"w": jnp.ones(4)})
        assert ckpt.steps() == [1, 3]


# -- leaves ---------------------------------------------------------------------------------------


def test_non_array_leaves_are_named(tmp_path):
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.StructureMismatchError, match="state leaf lr is a float"):
            ckpt.save(1, {"w": jnp.zeros(2), "lr": 0.1})
        with pytest.raises(C.SaveError, match="`extra` is not JSON-serializable"):
            ckpt.save(1, {"w": jnp.zeros(2)}, extra={"when": object()})
        ckpt.save(1, {"w": jnp.zeros(2)})
        target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "n": 3}
        with pytest.raises(C.StructureMismatchError, match="step 1, target leaf n is a int"):
            ckpt.restore(target)


def test_a_move_into_another_kind_of_optimizer_is_logged_as_a_warning(tmp_path, caplog):
    params = {"w": jnp.arange(4.0)}
    saved = {"params": params, "opt_state": optax.adamw(1e-3).init(params)}
    lion = {"params": params, "opt_state": optax.lion(1e-3).init(params)}
    with C.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved)
        with caplog.at_level(logging.WARNING, "jaxlib_ext.checkpoint"):
            restored, _ = ckpt.restore(abstract(lion))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    text = warnings[0].getMessage()
    assert "another kind" in text and "1 saved leaves unused" in text
    assert "unused      opt_state/0/nu/w" in text and "field       opt_state/0/mu/w" in text
    np.testing.assert_array_equal(restored["opt_state"][0].mu["w"], saved["opt_state"][0].mu["w"])
