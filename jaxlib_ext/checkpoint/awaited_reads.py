"""A failed Orbax read waits for its sibling reads before its event loop closes.

Orbax runs a restore as one coroutine on a fresh event loop (``asyncio_utils.run_sync``) that
gathers one read per array. When a read fails (a corrupt or truncated file), the gather raises
at once and the loop is closed while the other reads are still running in TensorStore's
threads. As each ends it calls back into the closed loop, and Python prints one traceback per
read (``RuntimeError: Event loop is closed``, or asyncio's ``Task exception was never
retrieved`` when the loop was a notebook's): dozens of them after one corrupt step, long after
the :class:`CorruptCheckpointError` was raised.

:func:`reads_awaited` fixes the cause for the reads this package makes: while it is active,
a coroutine that Orbax runs this way and that fails first awaits every other task still
running on its loop (collecting their exceptions), then raises its own error. A success is
untouched. The wait is bounded (:data:`SIBLING_TIMEOUT_S`, then the stragglers are cancelled),
so a hung read cannot turn an error into a hang.

It wraps Orbax's private ``run_sync`` for the duration only (reference-counted, thread-safe);
if a future Orbax lacks it, reads behave as before (the tests pin the version's hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

_log = logging.getLogger("jaxlib_ext.checkpoint")

try:  # Orbax's private event-loop runner; every handler calls it through the module
    from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio
except ImportError:  # pragma: no cover - another Orbax layout: reads work, without the wait
    _orbax_asyncio = None

SIBLING_TIMEOUT_S = 60.0
_lock = threading.Lock()
_active = 0
_original = None


async def _await_siblings(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        return await coro
    except BaseException:
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SIBLING_TIMEOUT_S
        while True:
            others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            left = deadline - loop.time()
            if not others or left <= 0:
                break
            await asyncio.wait(others, timeout=left)
        for task in others:  # past the deadline: cancel and let them end
            task.cancel()
        if others:
            _log.warning(
                "%d reads still running %.0f s after a failed read: cancelled",
                len(others),
                SIBLING_TIMEOUT_S,
            )
            await asyncio.wait(others, timeout=1.0)
        for task in asyncio.all_tasks():
            if task is not me and task.done() and not task.cancelled():
                task.exception()  # retrieved: asyncio does not log it as never retrieved
        raise


@contextlib.contextmanager
def reads_awaited() -> Iterator[None]:
    """While active, a failing Orbax coroutine awaits its siblings (see the module)."""
    global _active, _original
    if _orbax_asyncio is None:
        yield
        return
    with _lock:
        if _active == 0:
            _original = _orbax_asyncio.run_sync
            original = _original

            def run_sync(coro):
                return original(_await_siblings(coro))

            _orbax_asyncio.run_sync = run_sync
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _orbax_asyncio.run_sync = _original
                _original = None


__all__ = ["SIBLING_TIMEOUT_S", "reads_awaited"]
