"""A failed read ends cleanly: the reads still in flight are awaited before Orbax's event loop
closes, so a corrupt step raises one typed error and nothing is printed later."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time

import optax
import pytest

from jaxlib_ext import checkpoint as C
from jaxlib_ext.checkpoint import awaited_reads
from parallel.mesh import make_mesh
from tests.jaxlib_ext.test_checkpoint import _state, _target


def test_orbax_still_has_the_hook_the_reads_wrap():
    assert awaited_reads._orbax_asyncio is not None
    assert callable(awaited_reads._orbax_asyncio.run_sync)


def _failing_gather(finished: list[str]):
    async def slow():
        await asyncio.sleep(0.3)
        finished.append("slow read")

    async def fails():
        raise ValueError("corrupt chunk")

    async def restore():
        await asyncio.gather(slow(), fails())

    return restore()


def test_a_failed_coroutine_awaits_its_siblings_before_raising():
    run_sync = awaited_reads._orbax_asyncio.run_sync
    finished: list[str] = []
    with pytest.raises(ValueError, match="corrupt chunk"):  # Orbax alone: the sibling abandoned
        run_sync(_failing_gather(finished))
    assert finished == []
    with awaited_reads.reads_awaited():
        with pytest.raises(ValueError, match="corrupt chunk"):
            awaited_reads._orbax_asyncio.run_sync(_failing_gather(finished))
        assert finished == ["slow read"]
    assert awaited_reads._orbax_asyncio.run_sync is run_sync  # restored on exit


def test_nested_and_successful_runs_are_untouched():
    run_sync = awaited_reads._orbax_asyncio.run_sync

    async def value():
        return 7

    with awaited_reads.reads_awaited():
        with awaited_reads.reads_awaited():
            assert awaited_reads._orbax_asyncio.run_sync(value()) == 7
        assert awaited_reads._orbax_asyncio.run_sync is not run_sync  # the outer one still holds
    assert awaited_reads._orbax_asyncio.run_sync is run_sync


def _data_files(step_dir):
    return [
        p
        for p in (step_dir / "arrays").rglob("*")
        if p.is_file() and p.parent.name == "d" and p.stat().st_size > 1024
    ]


@pytest.mark.parametrize("inside_a_running_loop", [False, True], ids=["script", "notebook"])
def test_a_corrupt_step_prints_nothing_after_its_error(
    tmp_path, devices, monkeypatch, caplog, inside_a_running_loop
):
    """The checkpoints notebook's damage (three bytes flipped in every data file of an LM state's
    step): before the fix, 10-50 'Event loop is closed' tracebacks (or as many asyncio 'Task
    exception was never retrieved' records under a running loop) followed the error."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
    mesh = make_mesh({"fsdp": 8}, devices=devices)
    tx = optax.adamw(1e-3)
    lm, state = _state(mesh, tx)
    with C.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
    files = _data_files(tmp_path / "1")
    assert files
    for path in files:
        raw = bytearray(path.read_bytes())
        for at in (len(raw) // 4, len(raw) // 2, 3 * len(raw) // 4):
            raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))

    def restore():
        with C.Checkpointer(tmp_path) as ckpt:
            with pytest.raises(C.CorruptCheckpointError, match="step 1"):
                ckpt.restore(_target(lm, tx, mesh))

    async def in_a_loop():
        restore()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(in_a_loop()) if inside_a_running_loop else restore()
        time.sleep(1.0)  # what an abandoned read would print, it prints by now
        gc.collect()
    assert unraisable == []
    assert [r.getMessage()[:60] for r in caplog.records if r.name == "asyncio"] == []
