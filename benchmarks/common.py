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


def reference_lm_config(args):
    """The reference LM's config from ``args`` (``d_model``, ``layers``, ``seq_len``): 4 heads,
    ``d_ff = 4 d_model``."""
    from jaxlib_ext.model import LMConfig

    return LMConfig(
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=4,
        d_ff=4 * args.d_model,
        max_len=args.seq_len,
    )


def reference_mesh_and_config(args) -> tuple:
    """A ``data x fsdp`` mesh over ``args.devices`` and :func:`reference_lm_config`: the setup
    every data-parallel benchmark of the reference LM shares."""
    from parallel.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": -1} if args.devices % 2 == 0 else {"fsdp": -1})
    return mesh, reference_lm_config(args)


def reference_lm_setup(args) -> tuple:
    """The experiments' shared setup from ``args`` (``devices``, ``d_model``, ``layers``,
    ``seq_len``, ``batch_size``): the mesh and reference LM of :func:`reference_mesh_and_config`
    with activation constraints, batches over the standard library's sources and the batch
    sharding.

    Returns:
      ``(mesh, lm, batches, batch_sharding)``.
    """
    from jaxlib_ext import data, train
    from jaxlib_ext.model import LanguageModel
    from parallel.rules import activation_constraint

    mesh, cfg = reference_mesh_and_config(args)
    lm = LanguageModel(cfg, activation_sharding=activation_constraint(mesh))
    batches = data.TokenBatches(
        data.load_corpus(max_bytes=4 << 20), batch_size=args.batch_size, seq_len=args.seq_len
    )
    return mesh, lm, batches, train.batch_sharding(mesh, global_batch=args.batch_size)


def train_run(lm, tx, mesh, batches, batch_sharding, *, steps: int, seed: int) -> dict:
    """``steps`` train steps of ``lm`` with ``tx`` from the seed's initialization over the seed's
    data order, as the experiments compare optimizers (same init, same batches for each).

    Returns:
      ``{"step": the jitted step, "state": the final state, "losses": [...], "grad_norms":
      [...], "wall_seconds": s}``.
    """
    import time

    from jaxlib_ext import train

    shardings = train.train_state_shardings(lm, tx, mesh)
    step = train.make_train_step(train.lm_loss(lm), tx, shardings, batch_sharding)
    state = train.init_train_state(lm, tx, shardings, seed=seed)
    data_state = batches.initial_state(seed)
    losses, grad_norms = [], []
    start = time.perf_counter()
    for _ in range(steps):
        batch, data_state = batches.batch(data_state)
        state, metrics = step(state, train.shard_batch(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    wall = time.perf_counter() - start
    return {
        "step": step,
        "state": state,
        "losses": losses,
        "grad_norms": grad_norms,
        "wall_seconds": wall,
    }
