"""Shared pieces of the benchmark scripts: device setup, timing, machine description, output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path


def use_cpu_devices(count: int) -> None:
    """Asks for ``count`` simulated CPU devices; call before JAX starts its backend."""
    import jax

    jax.config.update("jax_num_cpu_devices", count)


def machine() -> dict[str, str | int]:
    """What the figures were measured on."""
    import jax

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "cpu_cores": os.cpu_count() or 0,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (which must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def write_json(path: str | Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path
