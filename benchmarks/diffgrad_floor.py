"""diffGrad's step-time floor on XLA:CPU, measured: how close a step can get to ``optax.adamw``.

``optim.diffgrad`` must read the previous gradient before it overwrites that (donated) buffer.
From inside an optax transformation the best order XLA:CPU builds is a materialized direction
``u`` and the new previous gradient written after it (68 bytes per parameter against adamw's
40). A step written by hand, outside optax, can write the new previous gradient after the
parameter update instead, so ``u`` fuses into that update. This script times, side by side in
one run on the transformer-like tree of ``benchmarks/optim_step.py`` (donated jitted steps, a
gradient that is an input of the step):

- ``optax.adamw`` (the baseline);
- ``optim.diffgrad`` (the optax transformation, then ``optax.apply_updates``);
- the hand-fused step: the same maths, ``optax.apply_updates`` first, then the previous gradient
  (its write ordered after the new parameters by ``optim.moments.after``).

It prints each step's time, its ratio to adamw and XLA's bytes accessed per parameter.

Usage:

    python benchmarks/diffgrad_floor.py [--size 10M] [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_json
from benchmarks.optim_step import JaxRunner, layout, make_tree, measure, parse_size


def hand_fused_diffgrad(learning_rate: float = 1e-3):
    """``(tx, step)``: diffGrad's direction and a donated step that writes the new previous
    gradient after the params update (for ``JaxRunner(tx, ..., step=step)``)."""
    import optim
    from optim.moments import after

    tx = optim.scale_by_diffgrad()

    def step(params, state, grads):
        direction, state = tx.update(grads, state, params)
        updates = jax.tree.map(lambda u: -learning_rate * u, direction)
        params = optax.apply_updates(params, updates)
        prev = jax.tree.map(lambda g, p: after(g.astype(p.dtype), p), grads, params)
        return params, state._replace(prev_grad=prev)

    return tx, step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="10M")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a tiny size (a smoke test)")
    p.add_argument("--out", default="benchmarks/out/diffgrad_floor.json")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds = "250k", 2

    import optim

    shapes = layout(parse_size(args.size))
    grads = make_tree(shapes, seed=1, scale=1e-3)

    def params():
        return make_tree(shapes, seed=0, scale=0.02)

    fused_tx, fused_step = hand_fused_diffgrad()
    runners = {
        "optax.adamw": JaxRunner(optax.adamw(1e-3, weight_decay=0.0), params, grads),
        "optim.diffgrad": JaxRunner(optim.diffgrad(1e-3), params, grads),
        "diffGrad, hand-fused step": JaxRunner(fused_tx, params, grads, step=fused_step),
    }
    result = measure(runners, rounds=args.rounds, steps=args.steps_per_round, warmup=2)
    count = sum(math.prod(s) for s in shapes.values())
    print(f"{args.size}: {count:,} parameters, {args.rounds} rounds")
    print(f"{'step':<28}{'ms':>8}{'x adamw':>9}{'bytes/param':>13}{'peak MiB':>10}")
    for name, row in result.items():
        print(
            f"{name:<28}{row['step_seconds_median'] * 1e3:>8.2f}{row['ratio_to_baseline']:>9.2f}"
            f"{row['bytes_accessed_per_device'] / count:>13.1f}"
            f"{row['peak_bytes_per_device'] / 2**20:>10.0f}"
        )
    # both ran the same steps from the same params: the same maths, up to fusion rounding
    a, b = runners["optim.diffgrad"].params, runners["diffGrad, hand-fused step"].params
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    diff = max(float(abs(x - y).max()) for x, y in pairs)
    print(f"max |params difference| after the run: {diff:.2e}")
    if not diff < 1e-5:
        raise SystemExit("the hand-fused step does not compute diffGrad's update")
    record = {"machine": machine(), "config": vars(args), "params": count, "rows": result}
    record["max_params_difference"] = diff
    print("wrote", write_json(Path(args.out), record))


if __name__ == "__main__":
    main()
