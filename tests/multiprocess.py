"""Runs a test body in several local JAX processes joined by ``jax.distributed`` (gloo on CPU).

    outputs = run_in_processes("tests.parallel.test_multiprocess:body", num_processes=2)

Each process gets ``devices_per_process`` simulated CPU devices, joins a coordinator on a free
local port, imports the target ``module:function`` and calls it with ``(process_id,
num_processes, *args)``. When any process fails or the timeout passes, every process is stopped
and an ``AssertionError`` shows each one's exit code and output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_LAUNCHER = """
import importlib, json, os, sys
target, process_id, num_processes, address, args = sys.argv[1:6]
import jax
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.distributed.initialize(address, num_processes=int(num_processes), process_id=int(process_id))
module, function = target.split(":")
getattr(importlib.import_module(module), function)(
    int(process_id), int(num_processes), *json.loads(args))
print(f"process {process_id}: done", flush=True)
jax.distributed.shutdown()
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_processes(
    target: str,
    *,
    args: tuple = (),
    num_processes: int = 2,
    devices_per_process: int = 4,
    timeout: float = 240.0,
) -> list[str]:
    """Runs ``target`` in ``num_processes`` processes; returns each one's output (stdout+stderr)."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    procs = []
    logs = []
    for pid in range(num_processes):
        log = tempfile.TemporaryFile("w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _LAUNCHER,
                    target,
                    str(pid),
                    str(num_processes),
                    address,
                    json.dumps(list(args)),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + timeout
    failed = timed_out = False
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            failed = True
            grace = time.monotonic() + 10
            while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                time.sleep(0.1)
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    if timed_out or failed or any(codes):
        why = f"timed out after {timeout:.0f} s" if timed_out else "a process failed"
        report = "\n".join(
            f"----- process {i} (exit code {c}) -----\n{out}"
            for i, (c, out) in enumerate(zip(codes, outputs, strict=True))
        )
        raise AssertionError(f"{target} in {num_processes} processes: {why}\n{report}")
    return outputs
