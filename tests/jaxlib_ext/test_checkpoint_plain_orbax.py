"""A checkpoint read with plain Orbax, as the README shows, in a process that never imports this
library: every array bit-exact, as a nested tree."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlib_ext.checkpoint import Checkpointer
from parallel.mesh import make_mesh
from tests.jaxlib_ext.checkpoint_states import small_state
from tests.multiprocess import REPO_ROOT

_CHECK = """
import pickle
import sys
import numpy as np
assert not [m for m in sys.modules if m.startswith("jaxlib_ext")], "the library was imported"
flat = {}
def walk(node, prefix):
    for key, value in node.items():
        if isinstance(value, dict):
            walk(value, prefix + key + "/")
        else:
            flat[prefix + key] = np.asarray(value)
walk(state, "")
with open(sys.argv[1], "wb") as f:
    pickle.dump(flat, f)
"""


def _readme_plain_orbax_block() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("#### Reading a checkpoint with plain Orbax")
    return re.search(r"```python\n(.*?)```", text[start:], re.DOTALL).group(1)


def test_plain_orbax_reads_the_nested_tree_bit_exactly(tmp_path, devices):
    mesh = make_mesh({"fsdp": 8}, devices=devices)
    state = small_state(5)
    state["params"]["w"] = jax.device_put(state["params"]["w"], NamedSharding(mesh, P("fsdp")))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, state, extra={"data": {"index": 5}})
    out = tmp_path / "arrays.pickle"
    done = subprocess.run(
        [sys.executable, "-c", _readme_plain_orbax_block() + _CHECK, str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "5"
    read = pickle.loads(out.read_bytes())
    assert sorted(read) == ["params/b", "params/w", "rng", "step"]
    for key, want in [
        ("params/w", state["params"]["w"]),
        ("params/b", state["params"]["b"]),
        ("step", state["step"]),
        ("rng", jax.random.key_data(state["rng"])),
    ]:
        assert read[key].dtype == want.dtype, key
        np.testing.assert_array_equal(read[key], np.asarray(want), err_msg=key)
