"""The coordinate clip's sampled-bracket selection (issue 14's suggestion), measured: why the
radix select stays in ``optim``.

The design: estimate the float32 threshold from a strided sample's top-16-bit histogram, then one
exact pass over every coordinate counts those above a window of ``W`` top-16-bit bins and
histograms every bit pattern inside it (``W x 65,536`` bins); exact whenever the answer is in the
window, else the radix select (``optim.top_fraction_threshold``) runs under ``lax.cond``. This
file holds that selection as a prototype (``bracketed_threshold``), and measures it two ways:

(a) speed, side by side in one run: ``chain(clip, optax.sgd)`` with the radix select
    (``optim.coordinate_clip``) and with the prototype, against ``optax.sgd``, on the
    transformer-like tree of ``benchmarks/optim_step.py`` (normal gradients, where the bracket
    always holds: the prototype's best case);
(b) how often the bracket holds on real gradients: the reference byte-level LM trained with
    SGD + coordinate clipping (``optim.sgd_coordinate_clipped``) by the library's train step,
    every step's gradient tried with each sample and window in ``VARIANTS`` and each fraction in
    ``--fractions``; each threshold is checked against the radix select (bit for bit).

Samples: ``longest-axis/64`` takes every 64th index along each leaf's longest axis (a power of
two keeps a sharded axis local); ``flat/61`` and ``flat/15`` every 61st or 15th coordinate of
the flattened leaf (odd strides visit every row and column, but under ``jit`` a sharded leaf's
flattened strided slice is gathered). Run on one device.

Usage:

    python benchmarks/clip_bracket.py [--size 10M] [--steps 100] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    machine,
    reference_lm_setup,
    train_run,
    use_cpu_devices,
    write_json,
)
from benchmarks.optim_step import JaxRunner, layout, make_tree, measure, parse_size

BINS = 1 << 16
MARGIN_SIGMAS = 4.0
# (sample, stride, window in top-16-bit bins)
VARIANTS = (
    ("longest-axis", 64, 4),
    ("flat", 61, 4),
    ("flat", 15, 4),
    ("flat", 61, 16),
)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def _hist(keys: jax.Array, bins: int, into: jax.Array | None = None) -> jax.Array:
    keys = keys.astype(jnp.int32)
    into = jnp.zeros(bins, jnp.int32) if into is None else into
    return into.at[keys].add(jnp.ones_like(keys))


def _at_or_above(hist: jax.Array) -> jax.Array:
    return jnp.cumsum(hist[::-1])[::-1]


def _bin_holding(at_or_above: jax.Array, rank: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.sum(at_or_above >= rank).astype(jnp.int32) - 1, 0)


def _select(hist: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    above = _at_or_above(hist)
    chosen = _bin_holding(above, rank)
    size = hist.shape[0]
    over = jnp.where(chosen + 1 < size, above[jnp.minimum(chosen + 1, size - 1)], 0)
    return chosen, rank - over


def _sample(bits: jax.Array, kind: str, stride: int) -> jax.Array:
    if kind == "flat" or bits.ndim < 2:
        return bits.reshape(-1)[::stride]
    axis = max(range(bits.ndim), key=lambda a: bits.shape[a])
    index = [slice(None)] * bits.ndim
    index[axis] = slice(None, None, stride)
    return bits[tuple(index)]


def bracketed_threshold(tree, fraction: float, *, sample: str, stride: int, window: int):
    """``(threshold, held)``: the ``(floor(fraction N) + 1)``-th largest ``|x|`` of a float32
    tree, from the sample's bracket and one exact pass when ``held``, else from the radix
    select. ``fraction`` must be concrete."""
    import optim

    leaves = [x for x in jax.tree.leaves(tree) if x.size]
    total = sum(x.size for x in leaves)
    rank = jnp.int32(math.floor(fraction * total) + 1)
    bits = [_bits(x) for x in leaves]
    samples = [_sample(b, sample, stride) for b in bits]
    n = sum(s.size for s in samples)
    above = _at_or_above(sum(_hist(s >> 16, BINS) for s in samples))
    expected = (math.floor(fraction * total)) * n / total + 1
    margin = MARGIN_SIGMAS * math.sqrt(max(expected * (1 - expected / n), 1.0)) + 2
    high = _bin_holding(above, jnp.int32(max(math.floor(expected - margin), 1)))
    low = _bin_holding(above, jnp.int32(min(math.ceil(expected + margin), n)))
    centre = _bin_holding(above, jnp.int32(round(expected)))
    span = high - low + 1
    start = jnp.where(span <= window, low - (window - span) // 2, centre - window // 2 + 1)
    base = jnp.clip(start, 0, BINS - window).astype(jnp.uint32) << 16
    width = window * BINS
    # inside the window -> [0, width), above it -> width, below it -> width + 1 (unsigned
    # differences: a pattern below the base wraps past 2^31, |x| patterns are below 2^31)
    fine = jnp.zeros(width + 2, jnp.int32)
    for b in bits:  # one buffer for every leaf (a fresh 2^18+ bin histogram each is not free)
        offset = b - base
        fine = _hist(jnp.minimum(offset, jnp.uint32(width) + (offset >> 31)), width + 2, fine)
    keys_above, inside = fine[width], fine[:width]
    held = ((keys_above < rank) & (rank <= keys_above + inside.sum())) | (rank > total)
    rows = inside.reshape(-1, 256)  # two-level select: prefix sums of 2^18+ bins are slow
    row, rank_in_row = _select(rows.sum(axis=1), rank - keys_above)
    column, _ = _select(rows[row], rank_in_row)
    pattern = base + (row * 256 + column).astype(jnp.uint32)

    def radix():  # recomputes from the leaves (never stores the bit patterns)
        return jax.lax.bitcast_convert_type(
            optim.top_fraction_threshold(leaves, fraction), jnp.uint32
        )

    chosen = jax.lax.cond(held, lambda: pattern, radix)
    threshold = jax.lax.bitcast_convert_type(chosen, jnp.float32)
    return jnp.where(rank > total, jnp.float32(0), threshold), held


def prototype_clip(fraction: float, *, sample="flat", stride=61, window=4):
    """A stateless optax transform: Pan & Li's clip with :func:`bracketed_threshold`."""

    def update_fn(updates, state, params=None):
        del params
        t, _ = bracketed_threshold(updates, fraction, sample=sample, stride=stride, window=window)

        def clip(x):
            xc = x.astype(jnp.float32)
            return jnp.where(jnp.abs(xc) >= t, jnp.sign(xc) * t, xc).astype(x.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class RecordState(NamedTuple):
    """Steps seen and, per (variant, fraction), steps whose bracket held and threshold errors."""

    steps: jax.Array
    held: jax.Array
    wrong: jax.Array


def record_brackets(fractions: tuple[float, ...]) -> optax.GradientTransformation:
    """Passes updates through; counts per variant and fraction whether the bracket held and
    whether the threshold differs from the radix select's (it never should)."""
    import optim

    shape = (len(VARIANTS), len(fractions))

    def init_fn(params):
        del params
        zeros = jnp.zeros(shape, jnp.int32)
        return RecordState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        held, wrong = [], []
        for sample, stride, window in VARIANTS:
            for c in fractions:
                t, h = bracketed_threshold(updates, c, sample=sample, stride=stride, window=window)
                held.append(h)
                wrong.append(t != optim.top_fraction_threshold(updates, c))

        def as_counts(flags):
            return jnp.stack(flags).reshape(shape).astype(jnp.int32)

        return updates, RecordState(
            state.steps + 1, state.held + as_counts(held), state.wrong + as_counts(wrong)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def speed(size: str, rounds: int, steps: int) -> dict:
    import optim

    shapes = layout(parse_size(size))
    grads = make_tree(shapes, seed=1, scale=1e-3)

    def params():
        return make_tree(shapes, seed=0, scale=0.02)

    txs = {
        "sgd": optax.sgd(1e-2),
        "coordinate_clip(0.01) [radix] + sgd": optax.chain(
            optim.coordinate_clip(0.01), optax.sgd(1e-2)
        ),
    }
    for sample, stride, window in VARIANTS:
        name = f"prototype {sample}/{stride}, W={window} + sgd"
        clip = prototype_clip(0.01, sample=sample, stride=stride, window=window)
        txs[name] = optax.chain(clip, optax.sgd(1e-2))
    runners = {name: JaxRunner(tx, params, grads) for name, tx in txs.items()}
    # a miss, to time the fallback: every 61st coordinate 1000x smaller, so the flat/61 sample
    # places its bracket far below the true threshold
    misread = jax.tree.map(lambda g: g.reshape(-1).at[::61].multiply(1e-3).reshape(g.shape), grads)
    miss = "prototype flat/61, W=4 + sgd, missed"
    runners[miss] = JaxRunner(
        optax.chain(prototype_clip(0.01, sample="flat", stride=61, window=4), optax.sgd(1e-2)),
        params,
        misread,
    )

    def held_on(g, sample, stride, window):
        run = jax.jit(
            lambda g: bracketed_threshold(g, 0.01, sample=sample, stride=stride, window=window)[1]
        )
        return bool(run(g))

    held = {f"{s}/{st}, W={w}": held_on(grads, s, st, w) for s, st, w in VARIANTS}
    held[miss] = held_on(misread, "flat", 61, 4)
    result = measure(runners, rounds=rounds, steps=steps, warmup=2)
    params_count = sum(math.prod(s) for s in shapes.values())
    print(
        f"\n(a) step time at {size} ({params_count:,} parameters, normal gradients, fraction 0.01)"
    )
    print(f"{'optimizer':<50}{'ms/step':>9}{'x sgd':>8}{'peak MiB':>10}")
    for name, row in result.items():
        print(
            f"{name:<50}{row['step_seconds_median'] * 1e3:>9.1f}"
            f"{row['ratio_to_baseline']:>8.2f}{row['peak_bytes_per_device'] / 2**20:>10.0f}"
        )
    print("bracket held on this gradient:", held)
    return {"params": params_count, "rows": result, "held": held}


def hit_rates(args) -> dict:
    import optim

    mesh, lm, batches, bsh = reference_lm_setup(args)
    tx = optax.chain(
        record_brackets(args.fractions),
        optim.sgd_coordinate_clipped(
            optax.linear_schedule(0.0, args.lr, 20), fraction=args.clip_fraction, momentum=0.9
        ),
    )
    run = train_run(lm, tx, mesh, batches, bsh, steps=args.steps, seed=args.seed)
    state = run["state"].opt_state[0]
    steps, held, wrong = int(state.steps), np.asarray(state.held), np.asarray(state.wrong)
    print(
        f"\n(b) bracket held, reference LM ({lm.num_params():,} parameters, {steps} steps of "
        f"SGD + clip {args.clip_fraction:g}, final loss {run['losses'][-1]:.3f})"
    )
    print(f"{'sample, window':<26}" + "".join(f"{f'c={c:g}':>12}" for c in args.fractions))
    rows = []
    for (sample, stride, window), h, w in zip(VARIANTS, held, wrong, strict=True):
        label = f"{sample}/{stride}, W={window}"
        print(f"{label:<26}" + "".join(f"{f'{int(x)}/{steps}':>12}" for x in h))
        rows.append({"variant": label, "held": h.tolist(), "wrong": w.tolist()})
    if wrong.any():
        raise SystemExit("a bracketed threshold differs from the radix select's: a bug")
    return {
        "params": lm.num_params(),
        "steps": steps,
        "final_loss": run["losses"][-1],
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="10M", help="(a)'s tree size (default 10M)")
    p.add_argument("--rounds", type=int, default=5, help="(a)'s timing rounds")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="(b)'s train steps")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--d-model", type=int, default=256, help="(b)'s model width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1, help="SGD peak lr (20 warm-up steps)")
    p.add_argument("--clip-fraction", type=float, default=0.05, help="the optimizer's clip")
    p.add_argument("--fractions", default="0.001,0.01,0.05", help="fractions to try in (b)")
    p.add_argument("--out", default="benchmarks/out/clip_bracket.json")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.steps = "250k", 2, 5
        args.d_model, args.layers, args.seq_len = 64, 2, 64
    try:
        args.fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        p.error(f"--fractions must be comma-separated numbers, got {args.fractions!r}")
    if args.steps < 1 or not all(0 <= f <= 1 for f in args.fractions):
        p.error(f"need --steps >= 1 and fractions in [0, 1], got {args.steps}, {args.fractions}")
    args.devices = 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    use_cpu_devices(args.devices)
    record = {"machine": machine(), "config": vars(args)}
    record["speed"] = speed(args.size, args.rounds, args.steps_per_round)
    record["hit_rates"] = hit_rates(args)
    print("wrote", write_json(Path(args.out), record))


if __name__ == "__main__":
    main()
