"""MoE strategies across processes: 2 processes x 4 devices (gloo), 20 AdamW steps with a
re-sharding, equal to the dense reference trained in one process (fssdp with its all-gather and
with its all-reduce copies)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from parallel.mesh import make_mesh
from tests.jaxlib_ext.test_moe_train import (
    VARIANTS,
    _canonical,
    _moe_run,
    _rel,
    dense_losses_and_state,
)
from tests.multiprocess import run_in_processes

pytestmark = pytest.mark.multiprocess

# fssdp with each materialization: between them every collective of the strategies crosses
# the processes (ep's all_to_all dispatch is fssdp's; fsdp's are plain gathers)
ACROSS = [(kind, knobs) for kind, knobs in VARIANTS if kind == "fssdp"]


def train_every_strategy(process_id: int, num_processes: int, out: str) -> None:
    from jax.experimental import multihost_utils

    mesh = make_mesh({"data": 2, "fsdp": 4})
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}
    results = {}
    for index, (kind, knobs) in enumerate(ACROSS):
        *_, state, losses, _ = _moe_run(mesh, kind, knobs)
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        whole = jax.tree.map(gather, state)
        flat = jax.tree_util.tree_flatten_with_path(
            {"params": _canonical(whole.params, whole), "opt": _canonical(whole.opt_state, whole)}
        )[0]
        results[f"{index}/losses"] = np.asarray(losses)
        for path, leaf in flat:
            results[f"{index}/{jax.tree_util.keystr(path)}"] = leaf
    if process_id == 0:
        np.savez(out, **results)


def test_two_processes_match_the_dense_reference(tmp_path: Path, devices):
    out = tmp_path / "moe.npz"
    run_in_processes(
        "tests.jaxlib_ext.test_moe_multiprocess:train_every_strategy",
        args=(str(out),),
        timeout=600,
    )
    got = np.load(out)
    want_losses, want = dense_losses_and_state(make_mesh({"data": 2, "fsdp": 4}, devices=devices))
    reference = jax.tree_util.tree_flatten_with_path(
        {"params": want.params, "opt": want.opt_state}
    )[0]
    for index in range(len(ACROSS)):
        np.testing.assert_allclose(got[f"{index}/losses"], want_losses, rtol=1e-5)
        for path, leaf in reference:
            key = f"{index}/{jax.tree_util.keystr(path)}"
            assert _rel(got[key], leaf) <= 1e-5, (ACROSS[index], key)
