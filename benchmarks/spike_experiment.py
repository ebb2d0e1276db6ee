"""Gradient spikes and heavy-tailed gradients: AdamW vs SPAM, SGD vs coordinate-clipped SGD.

Trains the reference byte-level LM with the library's sharded train step on a data x FSDP mesh, in
two comparisons; the two runs of a pair start from the same initial parameters and see the same
batches in the same order:

(a) AdamW (``optax.adamw``) against SPAM (``optim.spam``) while the whole gradient is multiplied by
    ``--spike-factor`` at a few fixed steps. The spikes are injected by a small stateful optax
    transform chained *before* the optimizer (``optax.chain(inject_spikes(...), tx)``), so the train
    step is the library's, unchanged. AdamW without spikes is trained too, as the reference.
(b) SGD with momentum (``optax.sgd``) against ``optim.sgd_coordinate_clipped`` (Pan & Li's
    coordinate-wise clipping of the gradient before the momentum), without injected spikes.

Per-step losses go to ``benchmarks/out/spike_experiment.json``, the curves to
``benchmarks/out/spike_experiment.png``; a table of the final loss (mean of the last 20 steps) and
the largest loss after the first spike is printed (with the steps the spiked runs take to recover).
Usage:

    python benchmarks/spike_experiment.py [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
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


class InjectSpikesState(NamedTuple):
    """State of :func:`inject_spikes`: the number of updates seen so far (int32)."""

    count: jax.Array


def inject_spikes(steps, factor: float):
    """An optax transform multiplying every update by ``factor`` at the 0-based ``steps``.

    Chained first (``optax.chain(inject_spikes(...), tx)``) it turns the gradient of those steps
    into a spike of ``factor`` times its size, for the optimizer ``tx`` to cope with.
    """
    spike_steps = jnp.asarray(sorted(steps), jnp.int32)

    def init_fn(params):
        del params
        return InjectSpikesState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        hit = jnp.any(state.count == spike_steps)
        scale = jnp.where(hit, jnp.float32(factor), jnp.float32(1))
        out = jax.tree.map(lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype), updates)
        return out, InjectSpikesState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
    p.add_argument("--quick", action="store_true", help="tiny model, 40 steps (a smoke test)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--d-model", type=int, default=None, help="default 128 (64 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="default 2")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (64 with --quick)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed of every run")
    p.add_argument(
        "--spike-steps",
        type=int,
        nargs="*",
        default=None,
        help="0-based steps whose gradient is scaled (default: at 30%%, 55%% and 80%% of the run)",
    )
    p.add_argument("--spike-factor", type=float, default=100.0)
    p.add_argument("--adam-lr", type=float, default=2e-3, help="AdamW and SPAM peak lr")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW and SPAM")
    p.add_argument("--warmup", type=int, default=20, help="linear lr warmup steps (all runs)")
    p.add_argument("--reset-interval", type=int, default=None, help="SPAM; default steps // 3")
    p.add_argument("--spam-warmup", type=int, default=None, help="SPAM; default reset / 5")
    p.add_argument("--no-clip", type=int, default=5, help="SPAM's no-clip window")
    p.add_argument("--sgd-lr", type=float, default=0.1, help="SGD (both runs) peak lr")
    p.add_argument("--fraction", type=float, default=0.05, help="coordinate-clip fraction")
    p.add_argument("--out", default="benchmarks/out/spike_experiment.json")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"steps": 300, "d_model": 128, "layers": 2, "seq_len": 128}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 25:
        p.error(f"--steps must be >= 25, got {args.steps}")
    if args.spike_steps is None:
        args.spike_steps = [round(f * args.steps) for f in (0.3, 0.55, 0.8)]
    if not args.spike_steps or not all(1 <= s < args.steps - 1 for s in args.spike_steps):
        p.error(f"--spike-steps must lie in [1, {args.steps - 1}), got {args.spike_steps}")
    if args.reset_interval is None:
        args.reset_interval = max(args.steps // 3, args.no_clip + 1)
    if args.spam_warmup is None:
        args.spam_warmup = max(args.reset_interval // 5, 1)
    args.no_clip = min(args.no_clip, args.reset_interval - 1)
    return args


def summarize(losses: list[float], first_spike: int) -> dict[str, float | int | None]:
    """Final loss (mean of the last 20), the largest loss after ``first_spike`` and the recovery.

    ``recovery_steps``: steps after the spike until the mean loss of the last 10 steps is back at
    or below its mean over the 10 steps before the spike (None if it never is). Only meaningful for
    the runs with injected spikes.
    """
    import numpy as np

    x = np.asarray(losses)
    before = float(x[max(first_spike - 10, 0) : first_spike].mean())
    after = x[first_spike + 1 :]
    smooth = np.convolve(after, np.ones(10) / 10, mode="valid")
    back = np.flatnonzero(smooth <= before)
    return {
        "final_loss_mean_last_20": float(x[-20:].mean()),
        "max_loss_after_first_spike": float(after.max()),
        "loss_before_first_spike": before,
        "recovery_steps": int(back[0]) + 10 if back.size else None,
    }


def plot(runs: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        (
            axes[0],
            ("adamw_no_spikes", "adamw", "spam"),
            f"(a) gradient x{args.spike_factor:g} at the dashed steps",
        ),
        (axes[1], ("sgd", "sgd_coordinate_clipped"), "(b) no injected spikes"),
    )
    for ax, names, title in panels:
        for name in names:
            losses = np.asarray(runs[name]["losses"])
            style = {"color": "0.6", "lw": 0.8} if name == "adamw_no_spikes" else {"lw": 1}
            ax.plot(np.arange(len(losses)), losses, label=runs[name]["label"], **style)
        if names[0] == "adamw_no_spikes":
            for s in args.spike_steps:
                ax.axvline(s, color="gray", ls="--", lw=0.8)
        ax.axhline(math.log(256), color="gray", ls=":", lw=1, label="uniform (ln 256)")
        ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title=title)
        ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
        ax.legend()
    fig.suptitle(
        f"reference LM, d_model {args.d_model}, {args.layers} layers, "
        f"batch {args.batch_size} x {args.seq_len} bytes"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_cpu_devices(args.devices)  # before anything starts JAX's backend

    import optim

    mesh, lm, batches, bsh = reference_lm_setup(args)

    def lr(peak: float) -> optax.Schedule:
        return optax.linear_schedule(0.0, peak, args.warmup)  # then constant

    spikes = inject_spikes(args.spike_steps, args.spike_factor)
    spam_kw = {
        "reset_interval": args.reset_interval,
        "warmup_steps": args.spam_warmup,
        "no_clip_steps": args.no_clip,
    }
    runs = {
        "adamw_no_spikes": (
            "AdamW, no spikes (reference)",
            optax.adamw(lr(args.adam_lr), weight_decay=args.weight_decay),
        ),
        "adamw": (
            "AdamW + spikes",
            optax.chain(spikes, optax.adamw(lr(args.adam_lr), weight_decay=args.weight_decay)),
        ),
        "spam": (
            "SPAM + spikes",
            optax.chain(
                spikes, optim.spam(lr(args.adam_lr), weight_decay=args.weight_decay, **spam_kw)
            ),
        ),
        "sgd": ("SGD (momentum 0.9)", optax.sgd(lr(args.sgd_lr), momentum=0.9)),
        "sgd_coordinate_clipped": (
            f"SGD, coordinate clip {args.fraction:g}",
            optim.sgd_coordinate_clipped(lr(args.sgd_lr), fraction=args.fraction, momentum=0.9),
        ),
    }
    results = {}
    for name, (label, tx) in runs.items():
        run = train_run(lm, tx, mesh, batches, bsh, steps=args.steps, seed=args.seed)
        losses, wall = run["losses"], run["wall_seconds"]
        results[name] = {
            "label": label,
            "losses": losses,
            "grad_norms": run["grad_norms"],
            "wall_seconds": wall,
            **summarize(losses, min(args.spike_steps)),
        }
        print(f"{label:<30} {args.steps} steps in {wall:6.1f} s, last loss {losses[-1]:.3f}")

    first = min(args.spike_steps)
    print(
        f"\n{'run':<30}{'final (mean last 20)':>22}{'max after step ' + str(first):>20}"
        f"{'recovery (steps)':>18}"
    )
    for name, row in results.items():
        spiked = name in ("adamw", "spam")
        recovery = row["recovery_steps"] if spiked else None
        print(
            f"{row['label']:<30}{row['final_loss_mean_last_20']:>22.3f}"
            f"{row['max_loss_after_first_spike']:>20.3f}"
            f"{'-' if not spiked else 'never' if recovery is None else recovery:>18}"
        )
    out = Path(args.out)
    record = {
        "machine": machine(),
        "config": vars(args),
        "model_params": lm.num_params(),
        "mesh": dict(mesh.shape),
        "runs": results,
    }
    print("wrote", write_json(out, record))
    png = out.with_suffix(".png")
    plot(results, args, png)
    print("wrote", png)


if __name__ == "__main__":
    main()
