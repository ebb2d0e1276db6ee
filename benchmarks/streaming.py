"""Data parallel vs DiLoCo vs Streaming DiLoCo on the reference LM, at a fixed token budget.

    .venv/bin/python benchmarks/streaming.py --devices 8 --steps 480 --seeds 0 1

Every scheme trains the same LM from the same initialization on the same global batches (each of
the M replicas gets its share of every batch) for ``--steps`` steps, on 8 devices laid out as
``replica x fsdp`` = 2 x 4 and 4 x 2. Reported per scheme, side by side:

* final held-out loss (the last 10% of the corpus, never trained on) of the global copy (data
  parallel: the model), mean and spread over seeds, and its gap to data parallel;
* bytes per device that cross the replica axis, read from each compiled step's HLO: per sync
  branch, weighted by how often the branch runs (total over the run, and the peak of one step),
  next to ``parallel.exchange.exchange_wire_bytes``; the ratio to data parallel;
* each replica's distance to the global copy (``||theta_global_p - theta_m_p||``) just before
  its fragment's sync, averaged over syncs;
* median step time here (2 CPU cores: weak evidence), of a step with and without a sync, and a
  projection of compute utilization against link bandwidth from the measured step time and bytes
  (assumptions printed).

Writes ``benchmarks/out/streaming.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, reference_lm_config, use_cpu_devices, write_json

SCHEMES = {
    "data-parallel": dict(sync="ddp"),
    "diloco": dict(fragments=1, overlap=0, alpha=0.0, exchange_dtype="fp32"),
    "streaming fp32": dict(fragments=2, overlap=0, alpha=0.0, exchange_dtype="fp32"),
    "streaming e3m0": dict(fragments=2, overlap=0, alpha=0.0, exchange_dtype="e3m0"),
    "streaming e3m0 tau=2": dict(fragments=2, overlap=2, alpha=0.5, exchange_dtype="e3m0"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=480)
    p.add_argument("--sync-every", type=int, default=48)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (all replicas)")
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW peak lr (warmup+cosine)")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--out", default="benchmarks/out/streaming.json")
    return p.parse_args(argv)


def _replica_bytes(report, replicas: int, period: int, fragments: int, ddp: bool):
    """(bytes per step at peak, bytes per step on average) crossing the replica axis, from the
    compiled HLO: collectives over groups of ``replicas`` devices (the mesh's other axis has
    another size), branch by branch (each sync branch runs once per ``period * fragments``
    steps... i.e. once every H steps)."""
    outside, branches = 0.0, {}
    for op in report.collectives:
        if op.group_size != replicas:
            continue
        if op.branch:
            branches[op.branch] = branches.get(op.branch, 0.0) + op.total_wire_bytes
        else:
            outside += op.total_wire_bytes
    if ddp:
        return outside, outside, outside
    sync_every = period * fragments
    peak = outside + max(branches.values())
    average = outside + sum(branches.values()) / sync_every
    return peak, average, outside


def run_scheme(name, replicas, seed, args, corpus):
    import jax
    import numpy as np
    import optax

    from jaxlib_ext import costs, data
    from jaxlib_ext.diloco_train import DilocoSetup
    from jaxlib_ext.model import LanguageModel
    from parallel.diloco import DilocoConfig, outer_optimizer
    from parallel.mesh import make_mesh
    from parallel.rules import activation_constraint

    fsdp = args.devices // replicas
    mesh = make_mesh({"replica": replicas, "fsdp": fsdp})
    cfg = reference_lm_config(args)
    lm = LanguageModel(cfg, activation_sharding=activation_constraint(mesh))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.steps // 20, args.steps, args.lr / 10
    )
    inner = optax.adamw(schedule, weight_decay=0.1)
    options = dict(SCHEMES[name])
    config = DilocoConfig(replicas=replicas, sync_every=args.sync_every, **options)
    outer_lr = args.outer_lr
    setup = DilocoSetup.create(lm, inner, outer_optimizer(outer_lr, 0.9), config, mesh)
    cut = int(len(corpus) * 0.9)
    train = data.TokenBatches(corpus[:cut], batch_size=args.batch_size, seq_len=args.seq_len)
    held = data.TokenBatches(corpus[cut:], batch_size=args.batch_size, seq_len=args.seq_len)
    state, step = setup.init(seed=seed), setup.step()
    data_state = train.initial_state(seed)
    first, _ = train.batch(data_state)
    report = costs.analyze(step, state, setup.shard_batch(first))
    peak, average, outside = _replica_bytes(
        report, replicas, config.period, config.fragments, config.sync == "ddp"
    )
    losses, divergence, times = [], [], {"sync": [], "plain": []}
    for t in range(1, args.steps + 1):
        batch, data_state = train.batch(data_state)
        tick = time.perf_counter()
        state, metrics = step(state, setup.shard_batch(batch))
        loss = float(metrics["loss"])
        times["sync" if setup.bytes_at(t) and config.sync != "ddp" else "plain"].append(
            time.perf_counter() - tick
        )
        losses.append(loss)
        if int(metrics["synced_fragment"]) >= 0 and config.sync != "ddp":
            divergence.append(np.asarray(metrics["divergence"]).tolist())
    # held-out loss of the global copy (data parallel: replica 0, all replicas are equal)
    model = state.params if config.sync == "ddp" else state.global_params
    if config.sync == "ddp":
        model = jax.tree.map(lambda x: x[0], model)
    eval_fn = jax.jit(
        lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
            lm.apply(p, b[:, :-1])[0], b[:, 1:]
        ).mean()
    )
    held_state = held.initial_state(1234)
    held_losses = []
    for _ in range(8):
        batch, held_state = held.batch(held_state)
        held_losses.append(float(eval_fn(jax.tree.map(lambda x: x.astype(x.dtype), model), batch)))
    return {
        "scheme": name,
        "replicas": replicas,
        "devices": args.devices,
        "seed": seed,
        "config": {
            k: getattr(config, k)
            for k in ("sync_every", "fragments", "overlap", "alpha", "exchange_dtype", "sync")
        },
        "outer_lr": outer_lr,
        "eval_loss": float(np.mean(held_losses)),
        "final_train_loss": float(np.mean(losses[-20:])),
        "bytes_total": sum(setup.bytes_at(t) for t in range(1, args.steps + 1)),
        "bytes_peak_step_hlo": peak,
        "bytes_average_step_hlo": average,
        "bytes_metrics_per_step_hlo": outside if config.sync != "ddp" else 0.0,
        "bytes_per_sync_formula": setup.sync_wire_bytes(),
        "divergence_before_sync": np.mean(divergence, axis=0).tolist() if divergence else [],
        "step_seconds_median": float(np.median(times["plain"][5:] or times["plain"])),
        "sync_step_seconds_median": float(np.median(times["sync"])) if times["sync"] else None,
        "losses": losses,
    }


def projection(results, bandwidths_gbit=(0.1, 1, 10, 100, 400)):
    """Compute utilization = compute / (compute + exposed communication), per scheme, from the
    measured per-step compute time and the bytes crossing the replicas. Assumptions: a
    replica's devices share one link of the given bandwidth to the other replicas, so a
    replica sends (per-device bytes) x (devices per replica); data parallel's gradient
    all-reduce is exposed (not overlapped with the backward pass); DiLoCo's sync is exposed
    once every H steps; Streaming DiLoCo with overlap tau hides up to tau steps of compute
    behind each fragment's exchange (where the runtime overlaps them, as GPU/TPU collectives
    can; XLA:CPU does not, as measured by streaming_overlap.py)."""
    table = {}
    for r in results:
        step_s = r["step_seconds_median"]
        cfg = r["config"]
        per_replica = r["devices"] // r["replicas"]
        row = {}
        for gbit in bandwidths_gbit:
            rate = gbit * 1e9 / 8
            if cfg["sync"] == "ddp":
                exposed = r["bytes_average_step_hlo"] * per_replica / rate
            else:
                per_sync = max(r["bytes_per_sync_formula"]) * per_replica / rate
                exposed_sync = max(0.0, per_sync - cfg["overlap"] * step_s)
                exposed = exposed_sync / (cfg["sync_every"] // cfg["fragments"])
            row[f"{gbit:g} Gbit/s"] = step_s / (step_s + exposed)
        table[(r["scheme"], r["replicas"])] = row
    return table


def main(argv=None):
    args = parse_args(argv)
    use_cpu_devices(args.devices)
    import numpy as np

    from jaxlib_ext import data

    corpus = data.load_corpus(max_bytes=4 << 20)
    results = []
    for replicas in args.replicas:
        for name in args.schemes:
            for seed in args.seeds:
                start = time.perf_counter()
                r = run_scheme(name, replicas, seed, args, corpus)
                print(
                    f"M={replicas} {name:<22} seed {seed}: eval {r['eval_loss']:.4f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
                results.append(r)
    summary = []
    for replicas in args.replicas:
        runs = [r for r in results if r["replicas"] == replicas]
        base = [r for r in runs if r["scheme"] == "data-parallel"]
        base_loss = np.mean([r["eval_loss"] for r in base]) if base else float("nan")
        base_bytes = base[0]["bytes_total"] if base else float("nan")
        for name in args.schemes:
            mine = [r for r in runs if r["scheme"] == name]
            losses = [r["eval_loss"] for r in mine]
            summary.append(
                {
                    "replicas": replicas,
                    "scheme": name,
                    "eval_loss_mean": float(np.mean(losses)),
                    "eval_loss_spread": float(np.ptp(losses)),
                    "gap_to_dp": float(np.mean(losses) / base_loss - 1),
                    "bytes_total": mine[0]["bytes_total"],
                    "bytes_ratio_dp_over_this": base_bytes / mine[0]["bytes_total"],
                    "bytes_peak_step": mine[0]["bytes_peak_step_hlo"],
                    "divergence_before_sync": mine[0]["divergence_before_sync"],
                    "step_ms": 1e3 * float(np.median([r["step_seconds_median"] for r in mine])),
                    "sync_step_ms": None
                    if mine[0]["sync_step_seconds_median"] is None
                    else 1e3 * float(np.median([r["sync_step_seconds_median"] for r in mine])),
                }
            )
    header = (
        f"{'M':>2} {'scheme':<22} {'eval loss':>10} {'gap':>7} {'bytes total':>12} "
        f"{'DP/this':>8} {'peak step':>10} {'step ms':>8} {'sync ms':>8}"
    )
    print("\n" + header)
    for s in summary:
        sync_ms = "" if s["sync_step_ms"] is None else f"{s['sync_step_ms']:.1f}"
        print(
            f"{s['replicas']:>2} {s['scheme']:<22} {s['eval_loss_mean']:>10.4f} "
            f"{100 * s['gap_to_dp']:>6.2f}% {s['bytes_total'] / 2**20:>10.2f}Mi "
            f"{s['bytes_ratio_dp_over_this']:>8.1f} {s['bytes_peak_step'] / 2**10:>8.1f}Ki "
            f"{s['step_ms']:>8.1f} {sync_ms:>8}"
        )
    proj = projection([r for r in results if r["seed"] == args.seeds[0]])
    print("\ncompute utilization projected from the measured step time and bytes")
    print(" ".join(projection.__doc__.split("Assumptions:")[1].split()))
    for (name, replicas), row in proj.items():
        cells = " ".join(f"{k}: {v:5.3f}" for k, v in row.items())
        print(f"  M={replicas} {name:<22} {cells}")
    record = {
        "machine": machine(),
        "args": vars(args),
        "summary": summary,
        "projection": {f"M={m} {n}": row for (n, m), row in proj.items()},
        "runs": results,
    }
    path = write_json(args.out, record)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
