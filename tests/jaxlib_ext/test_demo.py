"""The demo command, run as a user runs it: a fresh process, flags, files written, clear errors."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multiprocess import REPO_ROOT

pytestmark = pytest.mark.slow

TINY = [
    "--steps",
    "60",
    "--devices",
    "8",
    "--d-model",
    "64",
    "--layers",
    "2",
    "--heads",
    "4",
    "--seq-len",
    "64",
    "--batch-size",
    "16",
    "--lr",
    "1e-2",
    "--warmup",
    "5",
    "--no-progress",
]


def _demo(*flags, timeout=400):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user starts it
    return subprocess.run(
        [sys.executable, "-m", "jaxlib_ext.demo", *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_trains_writes_outputs_and_is_reproducible(tmp_path):
    runs = []
    for name in ("a", "b"):
        done = _demo(*TINY, "--seed", "3", "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        assert "Summary" in done.stdout and "peak memory / device" in done.stdout
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert (tmp_path / name / "loss.png").stat().st_size > 10_000
        runs.append(metrics)
    losses = runs[0]["losses"]
    assert len(losses) == 60
    assert runs[0]["losses"] == runs[1]["losses"], "same seed, same losses"
    assert sum(losses[-10:]) / 10 < math.log(256) - 2.0, losses[-10:]
    summary = runs[0]["summary"]
    assert summary["mesh"] == {"data": 2, "fsdp": 4}
    assert summary["nonfinite_steps_skipped"] == 0, "apply_if_finite wraps the optimizer"
    assert summary["step_cost"]["wire_bytes_per_device"]["all-gather"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "adamx"], "unknown optimizer 'adamx'; choose one of: .*adamw"),
        (["--devices", "3"], r"cannot shard parameter \[.*not divisible by 3"),
        (["--data", "/nonexistent/corpus.txt"], "data file or directory not found"),
        (["--optimizer", "sgd", "--weight-decay", "0.1"], "weight_decay"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--skip-nonfinite", "-1"], "--skip-nonfinite must be >= 0, got -1"),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (
            ["--optimizer", "spam", "--opt-arg", "reset_interval=abc"],
            "`reset_interval` must be a number, got reset_interval='abc'",
        ),
        (["--opt-arg", "nosuch=1"], "adamw takes no hyperparameter 'nosuch'; it takes: b1, b2"),
        (["--optimizer", "lion", "--opt-arg", "b1=x"], "--optimizer lion --opt-arg b1=x: "),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, flags, message):
    done = _demo(*flags, "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr


def test_resume_after_a_crash_continues_exactly_and_on_other_devices(tmp_path):
    small = [*TINY]
    small[small.index("--steps") + 1] = "12"
    ckpt = tmp_path / "ckpt"
    full = _demo(
        *small,
        "--out",
        str(tmp_path / "full"),
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every",
        "6",
    )
    assert full.returncode == 0, full.stderr
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["12", "6"]
    losses = json.loads((tmp_path / "full" / "metrics.json").read_text())["losses"]
    shutil.rmtree(ckpt / "12")  # as if the run had died after saving step 6
    again = _demo(
        *small, "--out", str(tmp_path / "again"), "--checkpoint-dir", str(ckpt), "--resume"
    )
    assert again.returncode == 0, again.stderr
    assert "saved step 6 to" in full.stdout and "saved step 12 to" in full.stdout
    assert re.search(
        r"^resumed step 6 from .*: saved on mesh data=2 x fsdp=4, now on data=2 x fsdp=4$",
        again.stdout,
        re.MULTILINE,
    ), again.stdout
    resumed = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert resumed["start_step"] == 6
    # the whole run's history: steps 1-6 from the checkpoint, 7-12 continued bit-exactly
    assert resumed["steps"] == list(range(1, 13))
    assert resumed["losses"] == losses, "same mesh: bit-exact continuation"
    shutil.rmtree(ckpt / "12")
    other = [*small]
    other[other.index("--devices") + 1] = "4"
    moved = _demo(
        *other, "--out", str(tmp_path / "moved"), "--checkpoint-dir", str(ckpt), "--resume"
    )
    assert moved.returncode == 0, moved.stderr
    assert "saved on mesh data=2 x fsdp=4, now on data=2 x fsdp=2" in moved.stdout
    moved_losses = json.loads((tmp_path / "moved" / "metrics.json").read_text())["losses"]
    assert moved_losses[:6] == losses[:6]
    np.testing.assert_allclose(moved_losses[6:], losses[6:], rtol=1e-3)


def test_help_shows_every_default():
    done = _demo("--help", timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for shown in (
        "--steps STEPS training steps (default: 600)",
        "(default: adamw)",
        "(default: 5)",
    ):
        assert shown in text, text


def test_resume_needs_a_checkpoint(tmp_path):
    done = _demo(
        "--resume", "--checkpoint-dir", str(tmp_path / "empty"), "--out", str(tmp_path), timeout=120
    )
    assert done.returncode == 2 and "cannot resume" in done.stderr
    assert not (tmp_path / "empty").exists(), "a resume must not create the directory"
    done = _demo("--resume", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2 and "need --checkpoint-dir" in done.stderr


class _Demo:
    """The demo running in the background, its output going to files (no pipe to fill up)."""

    def __init__(self, tmp_path, *flags):
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jaxlib_ext.demo", *flags],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )

    def wait_until(self, condition, what, timeout=400):
        """Polls ``condition`` (something the demo writes) until it holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the demo exited ({self.proc.returncode}) before {what}:\n"
                    + self.stderr.read_text()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"timed out waiting for {what}:\n" + self.stderr.read_text())
            time.sleep(0.05)

    def terminate(self, timeout=300) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return code, self.stdout.read_text(), self.stderr.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _endless(flags):
    flags = [*flags]
    flags[flags.index("--steps") + 1] = "100000"  # cannot finish before the signal
    return flags


def test_sigterm_saves_the_current_step_and_exits_cleanly_then_resume_continues(tmp_path):
    ckpt = tmp_path / "ckpt"
    demo = _Demo(
        tmp_path,
        *_endless(TINY),
        "--out",
        str(tmp_path / "first"),
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every",
        "3",
    )
    try:
        # Step 3 committed (Orbax renames the step's temporary directory to "3" at the commit):
        # training is under way with the SIGTERM handler installed.
        demo.wait_until(lambda: (ckpt / "3").is_dir(), "the checkpoint of step 3")
        code, out, err = demo.terminate()
    finally:
        demo.stop()
    assert code == 0, err
    assert "Traceback" not in err, err
    found = re.search(r"^SIGTERM: saved step (\d+), exiting$", out, re.MULTILINE)
    assert found, out
    stopped = int(found[1])
    assert stopped >= 3
    assert "(SIGTERM)" in out and "Summary" in out
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert first["stopped_by_sigterm"] and first["end_step"] == stopped
    assert len(first["losses"]) == stopped
    names = sorted(p.name for p in ckpt.iterdir() if p.name != "writer.lock")
    assert all(n.isdigit() for n in names), f"uncommitted leftovers: {names}"
    assert max(int(n) for n in names) == stopped, names

    short = [*TINY]
    short[short.index("--steps") + 1] = str(stopped + 3)
    resumed = _demo(
        *short, "--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(ckpt), "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "SIGTERM" not in resumed.stdout
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["start_step"] == stopped and metrics["end_step"] == stopped + 3
    # The history covers the whole run: the first process's steps, then this one's three.
    assert metrics["steps"] == list(range(1, stopped + 4)) and not metrics["stopped_by_sigterm"]
    assert metrics["losses"][:stopped] == first["losses"]
    assert all(math.isfinite(x) for x in metrics["losses"])


def test_sigterm_without_checkpoints_stops_after_the_current_step(tmp_path):
    flags = [f for f in _endless(TINY) if f != "--no-progress"]  # the bar says training began
    demo = _Demo(tmp_path, *flags, "--out", str(tmp_path / "out"))
    try:
        demo.wait_until(lambda: "training:" in demo.stderr.read_text(), "the training loop")
        code, out, err = demo.terminate()
    finally:
        demo.stop()
    assert code == 0, err
    found = re.search(r"^SIGTERM: stopped after step (\d+), exiting$", out, re.MULTILINE)
    assert found, out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["stopped_by_sigterm"] and metrics["end_step"] == int(found[1]) >= 1
    assert len(metrics["losses"]) == metrics["end_step"]


def test_streaming_diloco_reports_bytes_exchanged_and_resumes_elastically(tmp_path):
    """--sync streaming: bytes cross the replicas only at the fragments' syncs (exactly the
    formula), the summary and plot show them; a checkpoint resumes with another --replicas."""
    flags = [*TINY]
    flags[flags.index("--steps") + 1] = "16"
    streaming = [
        "--replicas", "2", "--sync", "streaming", "--sync-every", "8", "--fragments", "2",
        "--overlap", "1", "--exchange-dtype", "e3m0", "--outer-lr", "0.4",
    ]  # fmt: skip
    ckpt = tmp_path / "ckpt"
    done = _demo(*flags, *streaming, "--out", str(tmp_path / "s"), "--checkpoint-dir", str(ckpt))
    assert done.returncode == 0, done.stderr
    assert "exchanged / device" in done.stdout and "streaming: H=8, P=2, tau=1" in done.stdout
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    exchanged = metrics["bytes_exchanged"]
    assert len(exchanged) == 16 and all(math.isfinite(x) for x in metrics["losses"])
    synced = [i + 1 for i, b in enumerate(exchanged) if b]
    assert synced == [4, 8, 12, 16]  # one fragment every H / P = 4 steps
    assert exchanged[3] == exchanged[11] and exchanged[7] == exchanged[15]
    assert metrics["summary"]["bytes_exchanged_total"] == sum(exchanged)
    assert metrics["summary"]["mesh"] == {"replica": 2, "data": 2, "fsdp": 2}
    assert (tmp_path / "s" / "loss.png").stat().st_size > 10_000

    more = [*flags]
    more[more.index("--steps") + 1] = "20"
    more[more.index("--devices") + 1] = "4"
    four = [*streaming]
    four[four.index("--replicas") + 1] = "4"
    resumed = _demo(
        *more, *four, "--out", str(tmp_path / "r"), "--checkpoint-dir", str(ckpt), "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert record["start_step"] == 16 and len(record["losses"]) == 20
    assert record["steps"] == list(range(1, 21))
    assert record["summary"]["mesh"] == {"replica": 4, "data": 1, "fsdp": 1}


def test_data_parallel_across_replicas_moves_bytes_every_step(tmp_path):
    flags = [*TINY]
    flags[flags.index("--steps") + 1] = "6"
    done = _demo(*flags, "--replicas", "2", "--sync", "ddp", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    exchanged = json.loads((tmp_path / "metrics.json").read_text())["bytes_exchanged"]
    assert len(exchanged) == 6 and len(set(exchanged)) == 1 and exchanged[0] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sync", "diloco", "--fragments", "2"], "--sync diloco has one fragment"),
        (["--sync", "streaming", "--sync-every", "10", "--fragments", "3"], "sync_every=10"),
        (["--sync", "streaming", "--sync-every", "8", "--overlap", "4"], "overlap=4"),
        (["--replicas", "3"], "--replicas 3 must divide --devices 8"),
        (["--sync", "streaming", "--alpha", "2"], "alpha=2.0"),
    ],
)
def test_bad_replica_flags_are_one_clear_error(tmp_path, flags, message):
    done = _demo(*flags, "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr


@pytest.mark.multiprocess
def test_streaming_demo_across_two_processes_equals_one_process(tmp_path):
    """One command per host: 2 processes x 4 devices, one replica each, the exchange crossing
    the processes (jax.distributed over gloo); the losses equal the one-process run's."""
    from tests.multiprocess import free_port

    flags = [*TINY]
    flags[flags.index("--steps") + 1] = "8"
    streaming = ["--replicas", "2", "--sync", "streaming", "--sync-every", "4"]
    single = _demo(*flags, *streaming, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxlib_ext.demo",
                *flags,
                *streaming,
                "--out",
                str(tmp_path / "two"),
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    assert "Summary" in outputs[0] and "Summary" not in outputs[1]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert two["bytes_exchanged"] == one["bytes_exchanged"]
