"""The README's code blocks that are meant to run as pasted do, in a fresh Python process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.multiprocess import REPO_ROOT


def _python_blocks(section: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(section)
    following = re.search(r"\n#{2,3} ", text[start + len(section) :])
    end = start + len(section) + following.start() if following else len(text)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.DOTALL)


def _run_pasted(section: str, tmp_path) -> list[str]:
    """Runs the section's one Python block in a fresh process as a user would; its lines."""
    (block,) = _python_blocks(section)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()


# Sections whose blocks a dedicated test below runs (and checks the output of), with their count.
DEDICATED = {"### Streaming DiLoCo": 1, "### MoE execution": 1, "### Checkpoints": 2}
NOT_RUNNABLE = "# not runnable as pasted:"  # a block's first line, with the reason


def _sections() -> dict[str, list[str]]:
    """Every ``##``/``###`` heading line of the README with its Python blocks."""
    text = (REPO_ROOT / "README.md").read_text()
    heads = list(re.finditer(r"^#{2,3} .*$", text, re.MULTILINE))
    out = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[head.group(0)] = re.findall(r"```python\n(.*?)```", text[head.end() : end], re.DOTALL)
    return out


def _dedicated(heading: str) -> str | None:
    return next((key for key in DEDICATED if heading.startswith(key)), None)


GENERIC = [
    pytest.param(heading, i, id=f"{heading.lstrip('# ').split(' (')[0]}-{i}")
    for heading, blocks in _sections().items()
    if _dedicated(heading) is None
    for i, block in enumerate(blocks)
    if not block.startswith(NOT_RUNNABLE)
]


def test_every_python_block_is_run_by_a_test():
    sections = _sections()
    for key, count in DEDICATED.items():
        (heading,) = [h for h in sections if h.startswith(key)]
        assert len(sections[heading]) == count, f"{heading}: update DEDICATED and its test"
    assert len(GENERIC) >= 2, "the API tour and the optimizers' block at least"


@pytest.mark.parametrize(("heading", "index"), GENERIC)
def test_block_runs_as_pasted(heading, index, tmp_path):
    """Every other block, as a user pastes it into a fresh Python process (no XLA_FLAGS)."""
    block = _sections()[heading][index]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_streaming_diloco_block_runs_as_pasted(tmp_path):
    lines = _run_pasted("### Streaming DiLoCo", tmp_path)
    assert len(lines) == 8
    synced = [int(line.split()[2]) for line in lines]
    assert synced == [-1, -1, -1, 0, -1, -1, -1, 1]


def test_moe_block_runs_as_pasted(tmp_path):
    lines = _run_pasted("### MoE execution", tmp_path)
    assert len(lines) == 7
    assert [int(line.split()[0]) for line in lines[:6]] == [1, 2, 3, 4, 5, 6]
    assert "all-gather" in lines[-1] and "all-to-all" in lines[-1]


def test_checkpoint_blocks_run_as_pasted(tmp_path):
    """The save/restore block, then the plain-Orbax block reading what it saved."""
    save, read = _python_blocks("### Checkpoints")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    outputs = []
    for block, path in ((save, str(REPO_ROOT)), (read, "")):
        done = subprocess.run(
            [sys.executable, "-c", block],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        outputs.append(done.stdout.strip().splitlines())
    assert outputs[0][:3] == [
        "StepConflictError",
        "opt_state/0/mu/w",
        "[1, 2] {'data': {'index': 64}}",
    ]
    assert "'role': 'counter'" in outputs[0][3]
    assert outputs[1] == ["2 ['opt_state', 'params', 'step'] {'data': {'index': 64}}"]
