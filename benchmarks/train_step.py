"""Train-step cost of the reference LM on a data x FSDP mesh: activation constraints on vs off.

Both variants are compiled and timed side by side in one run (alternating rounds, median of each),
and the compiled programs' per-device collective bytes and peak memory are read with
``jaxlib_ext.costs``. Usage:

    python benchmarks/train_step.py [--devices 8] [--d-model 256] [--layers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    machine,
    reference_mesh_and_config,
    time_calls,
    use_cpu_devices,
    write_json,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--out", default="benchmarks/out/train_step.json")
    args = p.parse_args()
    use_cpu_devices(args.devices)

    import jax
    import numpy as np
    import optax

    from jaxlib_ext import costs, train
    from jaxlib_ext.model import LanguageModel
    from parallel.rules import activation_constraint

    mesh, cfg = reference_mesh_and_config(args)
    tx = optax.adamw(1e-3)
    batch_np = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.seq_len + 1))
    variants = {}
    for name, constrain in (
        ("xla-propagation", None),
        ("activation-constraints", activation_constraint(mesh)),
    ):
        lm = LanguageModel(cfg, activation_sharding=constrain)
        shardings = train.train_state_shardings(lm, tx, mesh)
        bsh = train.batch_sharding(mesh, global_batch=args.batch_size)
        batch = train.shard_batch(batch_np.astype(np.int32), bsh)
        step = train.make_train_step(train.lm_loss(lm), tx, shardings, bsh)
        state = train.init_train_state(lm, tx, shardings, seed=0)
        report = costs.analyze(step, state, batch)
        variants[name] = {
            "step": step,
            "state": state,
            "batch": batch,
            "report": report,
            "times": [],
        }

    def run(v):
        for _ in range(args.steps_per_round):
            v["state"], metrics = v["step"](v["state"], v["batch"])
        jax.block_until_ready(metrics)

    for _ in range(args.rounds):  # alternate, so drifts in machine load hit both alike
        for v in variants.values():
            v["times"] += [
                t / args.steps_per_round
                for t in time_calls(lambda v=v: run(v), repeats=1, warmup=1)
            ]
    rows = {}
    for name, v in variants.items():
        r = v["report"]
        rows[name] = {
            "step_seconds_median": statistics.median(v["times"]),
            "wire_bytes_per_device": r.wire_bytes(),
            "peak_bytes_per_device": r.memory.peak_bytes,
        }
    base, new = rows["xla-propagation"], rows["activation-constraints"]
    ratio = base["step_seconds_median"] / new["step_seconds_median"]
    print(f"{'variant':<24}{'step (ms)':>12}{'collective MiB':>16}{'peak MiB':>10}")
    for name, row in rows.items():
        wire = sum(row["wire_bytes_per_device"].values()) / 2**20
        print(
            f"{name:<24}{row['step_seconds_median'] * 1e3:>12.1f}{wire:>16.2f}"
            f"{row['peak_bytes_per_device'] / 2**20:>10.2f}"
        )
    print(f"speed-up of activation constraints: {ratio:.2f}x")
    record = {
        "machine": machine(),
        "config": vars(args),
        "model_params": lm.num_params(),
        "mesh": dict(mesh.shape),
        "variants": rows,
        "speedup": ratio,
    }
    print("wrote", write_json(args.out, record))


if __name__ == "__main__":
    main()
