"""Streaming DiLoCo across processes: 2 processes (1 or 4 devices each), one replica each, the
crossing the processes through jax.distributed (gloo), equal to the same run in one process."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxlib_ext.diloco_train import DilocoSetup
from jaxlib_ext.model import LanguageModel, LMConfig
from parallel.diloco import DilocoConfig, outer_optimizer
from parallel.mesh import make_mesh
from tests.multiprocess import run_in_processes

pytestmark = pytest.mark.multiprocess

STEPS = 9


def _run(exchange_dtype: str, devices) -> tuple[dict[str, np.ndarray], list[float]]:
    """Trains the small LM for STEPS steps on a mesh of ``devices``: replica 2 x fsdp."""
    from jax.experimental import multihost_utils

    mesh = make_mesh({"replica": 2, "fsdp": -1}, devices=devices)
    lm = LanguageModel(LMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16))
    config = DilocoConfig(
        replicas=2, sync_every=4, fragments=2, overlap=1, alpha=0.5, exchange_dtype=exchange_dtype
    )
    # Adam for the bit-exact runs; SGD where the inner FSDP reductions round differently (Adam
    # would normalize those round-off differences of tiny gradients up to ~1e-4)
    inner = optax.adamw(3e-3) if len(devices) == 2 else optax.sgd(0.3, momentum=0.9)
    setup = DilocoSetup.create(lm, inner, outer_optimizer(0.4), config, mesh)
    state, step = setup.init(seed=0), setup.step()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        tokens = rng.integers(0, 256, (16, 17)).astype(np.int32)
        state, metrics = step(state, setup.shard_batch(tokens))
        losses.append(float(metrics["loss"]))
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    leaves = jax.tree_util.tree_flatten_with_path(
        {"global": state.global_params, "replicas": state.params}
    )[0]
    return {jax.tree_util.keystr(p): gather(x) for p, x in leaves}, losses


def replica_per_process(process_id: int, num_processes: int, out: str, fmt: str) -> None:
    mesh = make_mesh({"replica": 2, "fsdp": -1})
    for r in range(2):  # each replica's devices are one process's devices
        owners = {d.process_index for d in mesh.devices[r].flat}
        assert owners == {r}, f"replica {r} spans processes {owners}"
    values, losses = _run(fmt, jax.devices())
    if process_id == 0:
        np.savez(out, losses=np.asarray(losses), **values)


@pytest.mark.parametrize(
    ("exchange_dtype", "devices_per_process"), [("fp32", 1), ("e3m0", 1), ("fp32", 4)]
)
def test_two_processes_one_replica_each_equal_one_process(
    tmp_path: Path, exchange_dtype, devices_per_process
):
    """One device per replica: the only collectives are the exchange (all-to-all/all-gather
    move bits; an fp32 mean of two values is exact either way), so the runs are bit-exact.
    Four devices per replica (FSDP inside each process, inner SGD): fp32 round-off, since the
    inner reductions sum in another order over gloo."""
    out = tmp_path / "two.npz"
    run_in_processes(
        "tests.parallel.test_diloco_multiprocess:replica_per_process",
        args=(str(out), exchange_dtype),
        devices_per_process=devices_per_process,
    )
    two = np.load(out)
    values, losses = _run(exchange_dtype, jax.devices()[: 2 * devices_per_process])
    if devices_per_process == 1:
        np.testing.assert_array_equal(two["losses"], losses)
        for key, want in values.items():
            np.testing.assert_array_equal(two[key], want, err_msg=key)
        return
    np.testing.assert_allclose(two["losses"], losses, rtol=1e-6)
    for key, want in values.items():
        np.testing.assert_allclose(two[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
