"""The demo's checkpoints: a resume that fell back past a corrupt step replaces it, and a fresh
run refuses a directory that already holds steps."""

import json
import os
import subprocess
import sys

import pytest

from tests.multiprocess import REPO_ROOT

pytestmark = pytest.mark.slow

TINY = [
    "--devices",
    "2",
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--no-progress",
]


def _demo(*flags, timeout=400):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user starts it
    return subprocess.run(
        [sys.executable, "-m", "jaxlib_ext.demo", *TINY, *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_resume_after_a_fallback_replaces_the_corrupt_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    saving = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    full = _demo("--steps", "4", *saving, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    losses = json.loads((tmp_path / "full" / "metrics.json").read_text())["losses"]
    for data in (ckpt / "4" / "arrays" / "d").iterdir():  # step 4 corrupt
        data.write_bytes(data.read_bytes()[:16])

    again = _demo("--steps", "4", *saving, "--resume", "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert "resumed from step 2: the later steps [4] could not be restored" in again.stdout
    resumed = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert resumed["start_step"] == 2 and resumed["losses"] == losses

    # Step 4 was saved again: the next resume starts there, not from step 2 once more.
    on = _demo("--steps", "5", *saving, "--resume", "--out", str(tmp_path / "on"))
    assert on.returncode == 0, on.stderr
    assert json.loads((tmp_path / "on" / "metrics.json").read_text())["start_step"] == 4
    assert "could not be restored" not in on.stdout

    fresh = _demo("--steps", "2", *saving, "--out", str(tmp_path / "fresh"))
    assert fresh.returncode == 2
    assert "already holds steps [2, 4, 5]: pass --resume" in fresh.stderr, fresh.stderr
