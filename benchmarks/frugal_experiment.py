"""FRUGAL pre-training: AdamW vs FRUGAL (block, rho = 0.25 and rho = 0) vs the GaLore baseline.

Trains the reference byte-level LM with the library's sharded train step on a data x FSDP mesh
(activation constraints on), four times, from the same initial parameters and over the same
batches in the same order, with the same peak learning rate (linear warmup, then cosine decay to
a tenth of it) and no weight decay:

- ``optax.adamw``: the reference, full state;
- ``optim.frugal`` in block mode, density 0.25 (the paper's pre-training setting: descending block
  order, signSGD on the state-free blocks, state reset at every refresh), ``update_gap`` scaled
  to the run: by default a quarter of it, so that each block has its turn at Adam once (at
  density 0.25 the descending walk covers all N blocks in 4 refreshes);
- ``optim.frugal`` with ``rho = 0`` in effect: a density so small (``--rho0-density``, default
  1e-6) that ``round(N * density) == 0`` for the N projectable matrices, so no block is ever
  active: signSGD on every attention and MLP matrix, Adam on the rest (embeddings, norms, head);
- the GaLore baseline, ``optim.frugal(projection="svd", free_rule="none", reset_state=False)``,
  at the same optimizer-state memory as FRUGAL block 0.25: its density is the one (among
  ``k / min_dim``) whose state bytes, projectors included, come closest to FRUGAL's. Its
  learning rate is the others' unless ``--galore-scale`` (its ``proj_lr_scale``) says otherwise.
  Its refreshes are slow on simulated CPU devices: every device computes every SVD (the gradient
  is gathered; ``jnp.linalg.svd`` needs its matrix whole), and 8 devices share the machine's cores.

Per run: the final loss (mean of the last 20 steps), the optimizer state's bytes (the sum over its
leaves of ``size * itemsize``, PRNG keys left out; the whole state, not per device) and the
compiled train step's peak memory per device (``jaxlib_ext.costs.analyze``). Per-step losses go to
``benchmarks/out/frugal_experiment.json``, the curves to ``benchmarks/out/frugal_experiment.png``.

Usage:

    python benchmarks/frugal_experiment.py [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    machine,
    reference_lm_setup,
    train_run,
    use_cpu_devices,
    write_json,
)

QUICK = {"steps": 40, "d_model": 64, "layers": 2, "seq_len": 64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
    p.add_argument("--quick", action="store_true", help="tiny model, 40 steps (a smoke test)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--d-model", type=int, default=None, help="default 128 (64 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="default 4 (2 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (64 with --quick)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed of every run")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every run")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine")
    p.add_argument("--weight-decay", type=float, default=0.0, help="every run (paper: 0)")
    p.add_argument("--density", type=float, default=0.25, help="FRUGAL block's density")
    p.add_argument("--update-gap", type=int, default=None, help="default: steps // 4")
    p.add_argument(
        "--rho0-density",
        type=float,
        default=1e-6,
        help="density of the rho = 0 run: must round N projectable blocks to 0 active",
    )
    p.add_argument(
        "--galore-scale",
        type=float,
        default=1.0,
        help="GaLore's proj_lr_scale (its own learning-rate scale on the projected matrices)",
    )
    p.add_argument("--out", default="benchmarks/out/frugal_experiment.json")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"steps": 300, "d_model": 128, "layers": 4, "seq_len": 128}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 25:
        p.error(f"--steps must be >= 25, got {args.steps}")
    if args.update_gap is None:
        args.update_gap = max(args.steps // 4, 1)
    return args


def state_bytes(state) -> int:
    """Bytes of an optimizer state's leaves (arrays or ShapeDtypeStructs), PRNG keys left out."""
    return sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(state)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def galore_density(make_galore, params, target_bytes: int, min_dim: int) -> float:
    """The density ``k / min_dim`` whose GaLore state bytes come closest to ``target_bytes``."""
    best = None
    for k in range(1, min_dim + 1):  # the bytes grow with k
        density = k / min_dim
        size = state_bytes(jax.eval_shape(make_galore(density).init, params))
        if best is None or abs(size - target_bytes) < abs(best[1] - target_bytes):
            best = (density, size)
        if size > target_bytes:
            break
    return best[0]


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Left: the loss curves; right: each run's loss minus AdamW's on the same batches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    window = 10

    def smooth(x):
        return np.convolve(np.asarray(x), np.ones(window) / window, mode="valid")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    reference = np.asarray(results["adamw"]["losses"])
    for i, row in enumerate(results.values()):
        losses = np.asarray(row["losses"])
        steps = np.arange(window - 1, len(losses))
        axes[0].plot(np.arange(len(losses)), losses, color=f"C{i}", lw=0.5, alpha=0.3)
        axes[0].plot(steps, smooth(losses), color=f"C{i}", lw=1.2, label=row["label"])
        axes[1].plot(steps, smooth(losses - reference), color=f"C{i}", lw=1.2)
    for s in range(args.update_gap, args.steps, args.update_gap):
        axes[1].axvline(s, color="gray", ls=":", lw=0.8)
    axes[0].axhline(math.log(256), color="gray", ls=":", lw=1, label="uniform (ln 256)")
    axes[0].set(
        title=f"loss (faint: per step; solid: {window}-step mean)",
        ylabel="cross-entropy (nats / byte)",
        ylim=(None, min(axes[0].get_ylim()[1], 6.0)),
    )
    skip = min(2 * args.warmup, args.steps // 2)  # the early transient would set the scale
    tail = np.concatenate(
        [smooth(np.asarray(r["losses"]) - reference)[skip:] for r in results.values()]
    )
    axes[1].set(
        title="minus AdamW's loss on the same batches (dotted: refreshes)",
        ylabel="loss difference (nats / byte)",
        ylim=(tail.min() - 0.02, tail.max() + 0.02),
    )
    for ax in axes:
        ax.set(xlabel="step")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"reference LM, d_model {args.d_model}, {args.layers} layers, batch {args.batch_size} x "
        f"{args.seq_len} bytes, peak lr {args.lr:g}, update_gap {args.update_gap}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_cpu_devices(args.devices)  # before anything starts JAX's backend

    import optim
    from jaxlib_ext import costs, train

    mesh, lm, batches, bsh = reference_lm_setup(args)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, args.steps, end_value=args.lr / 10
    )
    params = lm.abstract_params
    projectable = optim.default_projectable(params)
    flags = jax.tree.leaves(projectable)
    num_blocks = sum(map(bool, flags))
    if round(num_blocks * args.rho0_density) != 0:
        raise SystemExit(
            f"--rho0-density {args.rho0_density:g} leaves round({num_blocks} x density) = "
            f"{round(num_blocks * args.rho0_density)} active blocks; it must be 0"
        )
    common = {"update_gap": args.update_gap, "weight_decay": args.weight_decay}

    def galore(density: float) -> optax.GradientTransformation:
        return optim.frugal(
            lr,
            density=density,
            projection="svd",
            free_rule="none",
            reset_state=False,
            proj_lr_scale=args.galore_scale,
            **common,
        )

    frugal = optim.frugal(lr, density=args.density, **common)
    frugal_bytes = state_bytes(jax.eval_shape(frugal.init, params))
    min_dim = min(min(x.shape) for x, f in zip(jax.tree.leaves(params), flags, strict=True) if f)
    args.galore_density = galore_density(galore, params, frugal_bytes, min_dim)
    txs = {
        "adamw": ("AdamW", optax.adamw(lr, weight_decay=args.weight_decay)),
        "frugal": (f"FRUGAL block, rho {args.density:g}", frugal),
        "frugal_rho0": (
            "FRUGAL block, rho 0 (signSGD on all matrices)",
            optim.frugal(lr, density=args.rho0_density, **common),
        ),
        "galore": (
            f"GaLore (svd, rho {args.galore_density:.3g}, no reset, free rule none"
            + (f", scale {args.galore_scale:g})" if args.galore_scale != 1 else ")"),
            galore(args.galore_density),
        ),
    }
    print(
        f"{lm.num_params():,} params, {num_blocks} projectable matrices, mesh {dict(mesh.shape)}, "
        f"update_gap {args.update_gap}; optimizer-state bytes: FRUGAL block {args.density:g} "
        f"{frugal_bytes:,}, GaLore at density {args.galore_density:.4g} "
        f"{state_bytes(jax.eval_shape(txs['galore'][1].init, params)):,}"
    )

    results = {}
    first_batch = train.shard_batch(batches.batch(batches.initial_state(args.seed))[0], bsh)
    for name, (label, tx) in txs.items():
        run = train_run(lm, tx, mesh, batches, bsh, steps=args.steps, seed=args.seed)
        state, losses, wall = run["state"], run["losses"], run["wall_seconds"]
        memory = costs.analyze(run["step"], state, first_batch).memory  # compiled, not run
        results[name] = {
            "label": label,
            "losses": losses,
            "final_loss_mean_last_20": sum(losses[-20:]) / len(losses[-20:]),
            "state_bytes": state_bytes(state.opt_state),
            "peak_bytes_per_device": memory.peak_bytes,
            "temp_bytes_per_device": memory.temp_bytes,
            "wall_seconds": wall,
        }
        print(f"{label:<52} {args.steps} steps in {wall:6.1f} s, last loss {losses[-1]:.3f}")

    adamw_bytes = results["adamw"]["state_bytes"]
    print(f"\n{'run':<52}{'final loss':>11}{'state bytes':>13}{'vs adamw':>10}{'peak/device':>13}")
    for row in results.values():
        print(
            f"{row['label']:<52}{row['final_loss_mean_last_20']:>11.3f}"
            f"{row['state_bytes']:>13,}{row['state_bytes'] / adamw_bytes:>10.2f}"
            f"{costs.format_bytes(row['peak_bytes_per_device']):>13}"
        )
    out = Path(args.out)
    record = {
        "machine": machine(),
        "config": vars(args),
        "model_params": lm.num_params(),
        "projectable_matrices": num_blocks,
        "mesh": dict(mesh.shape),
        "runs": results,
    }
    print("wrote", write_json(out, record))
    png = out.with_suffix(".png")
    plot(results, args, png)
    print("wrote", png)


if __name__ == "__main__":
    main()
