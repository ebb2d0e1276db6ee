"""Every notebook in ``colabs/`` runs top to bottom (nbclient, a fresh kernel, cwd = repo root).

The kernel must be this interpreter (the test environment's Python, with the library installed).
The ``python3`` kernelspec is used when it launches this interpreter; otherwise a temporary
kernelspec pointing at ``sys.executable`` is written and put first on ``JUPYTER_PATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
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


REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _setup_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_opens_in_colab_and_its_first_cell_sets_it_up(path: Path):
    """A badge at the top opening this notebook from the repository in Colab; the first code
    cell installs the library from ``REPO_URL`` (the repository) only when it is not importable,
    and sizes the CPU backend to 8 devices."""
    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    colab = REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
    badge = (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({colab}/blob/main/colabs/{path.name})"
    )
    assert first.startswith(badge), first[:300]
    setup = _setup_cell(path)
    assert f'REPO_URL = "{REPOSITORY}"' in setup
    guard = 'if importlib.util.find_spec("jaxlib_ext") is None:\n    subprocess.run('
    assert guard in setup and '"pip", "install"' in setup and 'f"git+{REPO_URL}"' in setup
    assert 'jax.config.update("jax_num_cpu_devices", 8)' in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_setup_cell_gives_eight_cpu_devices_without_installing(path: Path, tmp_path):
    """Run alone in a fresh CPU process where the library is importable: nothing is installed
    (``subprocess.run`` must not be called) and JAX has 8 devices."""
    probe = (
        "import subprocess\n"
        "def refuse(*a, **k): raise AssertionError(f'installed: {a}')\n"
        "subprocess.run = refuse\n"
        f"{_setup_cell(path)}\n"
        "import jax\n"
        "print('devices', len(jax.devices()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "devices 8"
