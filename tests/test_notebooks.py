"""Every notebook in ``colabs/`` runs top to bottom (nbclient, a fresh kernel, cwd = repo root).

The kernel must be this interpreter (the test environment's Python, with the library installed).
The ``python3`` kernelspec is used when it launches this interpreter; otherwise a temporary
kernelspec pointing at ``sys.executable`` is written and put first on ``JUPYTER_PATH``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 600


def _launches_this_python(argv: list[str]) -> bool:
    """Whether a kernelspec's command runs ``sys.executable`` (jupyter_client maps a bare
    ``python``/``python3``/``python3.X`` to the launching interpreter)."""
    if not argv:
        return False
    major, minor = sys.version_info[:2]
    if argv[0] in ("python", f"python{major}", f"python{major}.{minor}"):
        return True
    return os.path.realpath(argv[0]) == os.path.realpath(sys.executable)


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """The name of a kernelspec that runs this interpreter (written to a tmp dir if needed)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        if _launches_this_python(spec.argv):
            return KERNEL
    except NoSuchKernel:
        pass
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major} (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    paths = [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(p for p in paths if p))
    assert _launches_this_python(KernelSpecManager().get_kernel_spec(KERNEL).argv)
    return KERNEL


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_name: str):
    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
    )
    failure = None
    try:
        client.execute()
    except CellExecutionError as err:  # its message holds the cell's source and traceback
        failure = f"{path.name} failed in a cell:\n{err}"
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in colabs/"
