"""The demo: train the reference byte-level LM on a device mesh and report what it cost.

    python -m jaxlib_ext.demo --steps 600 --devices 8 --optimizer adamw --seed 0 --out demo_out

On a CPU-only machine ``--devices`` simulated CPU devices are created (8 by default); on GPU/TPU the
first ``--devices`` accelerators are used. The model is trained data-parallel x FSDP on a
``data x fsdp`` mesh over the Python standard library's source code (or ``--data PATH``), with a
progress bar; at the end a summary table is printed and ``OUT/metrics.json`` (per-step losses and
metrics, the compiled step's collective bytes and memory) and ``OUT/loss.png`` are written.

With ``--checkpoint-dir DIR`` the train state and the data position are saved (asynchronously)
every ``--checkpoint-every`` steps and at the end, and ``--resume`` continues from the latest good
checkpoint, on any device count. SIGTERM (a preemption, ``kill``, a scheduler's stop) is handled
during training: the step in progress finishes, the state at that step is saved and committed to
DIR, ``SIGTERM: saved step N, exiting`` is printed, the summary and outputs for the steps done are
written and the command exits with status 0; ``--resume`` then continues from step N. Without
``--checkpoint-dir`` it stops after the step in progress the same way, saving nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULTS = {"steps": 600, "devices": 8, "optimizer": "adamw", "seed": 0, "out": "demo_out"}


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the help already says it or there is no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxlib_ext.demo",
        description=__doc__.split("\n")[0],
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps")
    p.add_argument("--devices", type=int, default=DEFAULTS["devices"], help="devices in the mesh")
    p.add_argument(
        "--fsdp",
        type=int,
        default=None,
        help="size of the fsdp mesh axis (default: devices/2 for 4+ devices)",
    )
    p.add_argument("--optimizer", default=DEFAULTS["optimizer"], help="optimizer name")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps (then cosine)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay, for optimizers that take one",
    )
    p.add_argument(
        "--opt-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an optimizer hyperparameter, e.g. --opt-arg reset_interval=100 (repeatable); "
        "the coordinate-clipped optimizers default to fraction=0.01",
    )
    p.add_argument(
        "--skip-nonfinite",
        type=int,
        default=5,
        metavar="N",
        help="skip a step whose gradients hold a NaN or Inf, leaving params and optimizer state "
        "untouched, up to N in a row (optax.apply_if_finite; 0: never skip)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="init and data seed")
    p.add_argument("--out", default=DEFAULTS["out"], help="output directory")
    p.add_argument("--data", default=None, help="text file or directory (default: Python stdlib)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--d-ff", type=int, default=None, help="MLP width (default 4 x d-model)")
    p.add_argument("--experts", type=int, default=0, help="MoE experts per MLP (0: dense MLP)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (MoE)")
    p.add_argument("--scan-layers", action="store_true", help="stack layers and run nnx.scan")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save checkpoints here (also on SIGTERM: the current step is saved, then exit 0)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save every N steps (0: only at the end); needs --checkpoint-dir",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir (any --devices)",
    )
    g = p.add_argument_group(
        "replicas (DiLoCo / Streaming DiLoCo)",
        "M replicas on a leading 'replica' mesh axis, each data x fsdp over devices/M devices; "
        "bytes crossing the replica axis are reported as bytes_exchanged",
    )
    g.add_argument("--replicas", type=int, default=None, help="replicas M (default 2 with --sync)")
    g.add_argument(
        "--sync",
        choices=("ddp", "diloco", "streaming"),
        default=None,
        help="ddp: average gradients every step; diloco: outer step every H steps; streaming: "
        "P fragments in turn, with overlap and low-bit exchange (default diloco with --replicas)",
    )
    g.add_argument("--sync-every", type=int, default=50, help="H: inner steps per outer step")
    g.add_argument(
        "--fragments", type=int, default=None, help="P (streaming; default 2, diloco: 1)"
    )
    g.add_argument("--overlap", type=int, default=0, help="tau: steps from send to apply")
    g.add_argument(
        "--alpha", type=float, default=None, help="merge factor (default 0.5 if tau > 0 else 0)"
    )
    g.add_argument(
        "--exchange-dtype",
        choices=("fp32", "bf16", "int8", "e3m0"),
        default="fp32",
        help="what crosses the replica axis (e3m0: 4-bit)",
    )
    g.add_argument("--outer-lr", type=float, default=0.7, help="outer Nesterov SGD lr")
    g.add_argument("--outer-momentum", type=float, default=0.9, help="outer momentum")
    m = p.add_argument_group(
        "MoE execution (with --experts E)",
        "how the MoE layers run over the devices; without --moe-strategy the dense reference "
        "(every token through every expert) runs",
    )
    m.add_argument(
        "--moe-strategy",
        choices=("ep", "fsdp", "fssdp"),
        default=None,
        help="ep: expert parallel (all_to_all); fsdp: experts all-gathered; fssdp: hot experts "
        "materialized (Hecate)",
    )
    m.add_argument(
        "--slots", type=int, default=None, help="fssdp: extra expert slots m per device "
        "(default: the device count, i.e. each device's hottest expert everywhere)"
    )  # fmt: skip
    m.add_argument("--remat", action="store_true", help="re-gather experts for the backward")
    m.add_argument(
        "--reshard-every", type=int, default=None, help="steps between re-shardings of expert "
        "ownership (Algorithm 2; default 50 for fssdp, else 0 = never)"
    )  # fmt: skip
    m.add_argument("--load-window", type=int, default=5, help="fssdp: steps in the load window")
    m.add_argument(
        "--capacity-factor", type=float, default=None, help="drop token copies beyond "
        "ceil(cf * tokens * k / devices) per destination (default: never drop)"
    )  # fmt: skip
    h = p.add_argument_group(
        "several processes or hosts",
        "run the same command on every host with its --process-id; --devices counts all "
        "processes' devices; process 0 prints and writes the outputs",
    )
    h.add_argument("--coordinator", default=None, help="host:port of process 0")
    h.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    h.add_argument("--process-id", type=int, default=0, help="this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.coordinator is None and args.num_processes != 1:
        p.error("--num-processes needs --coordinator")
    if not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    if args.replicas is not None or args.sync is not None:
        args.sync = args.sync or "diloco"
        args.replicas = 2 if args.replicas is None else args.replicas
        if args.fragments is None:
            args.fragments = 2 if args.sync == "streaming" else 1
        if args.alpha is None:
            args.alpha = 0.5 if args.overlap else 0.0
        if args.sync == "diloco" and (args.fragments != 1 or args.overlap):
            p.error("--sync diloco has one fragment and no overlap; use --sync streaming")
    if args.moe_strategy is not None:
        if args.experts < 1:
            p.error("--moe-strategy needs --experts E (E >= 1)")
        if args.sync is not None:
            p.error("--moe-strategy cannot be combined with --sync/--replicas")
        if args.scan_layers:
            p.error("--moe-strategy runs unrolled layers; drop --scan-layers")
        if args.slots is None:
            args.slots = args.devices if args.moe_strategy == "fssdp" else 0
        if args.reshard_every is None:
            args.reshard_every = 50 if args.moe_strategy == "fssdp" else 0
    elif args.slots is not None or args.remat or args.reshard_every is not None:
        p.error("--slots, --remat and --reshard-every need --moe-strategy")
    if (args.resume or args.checkpoint_every) and not args.checkpoint_dir:
        p.error("--resume and --checkpoint-every need --checkpoint-dir")
    minimum = {
        "steps": 1,
        "devices": 1,
        "batch_size": 1,
        "seq_len": 1,
        "warmup": 0,
        "checkpoint_every": 0,
        "skip_nonfinite": 0,
        "d_model": 1,
        "layers": 1,
        "heads": 1,
        "experts": 0,
        "top_k": 1,
        "sync_every": 1,
        "overlap": 0,
    }
    for name, low in minimum.items():
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("lr", "outer_lr"):  # finite and positive
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.weight_decay is not None and not (
        math.isfinite(args.weight_decay) and args.weight_decay >= 0
    ):
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    args.parser = p
    return args


def _setup_devices(count: int, args: argparse.Namespace | None = None):
    import jax

    processes = 1 if args is None else args.num_processes
    if count % processes:
        raise ValueError(f"--devices {count} must be divisible by --num-processes {processes}")
    # CPU only, before the backend starts: this process's share of the simulated devices
    jax.config.update("jax_num_cpu_devices", max(count // processes, 1))
    if args is not None and args.coordinator:
        jax.distributed.initialize(args.coordinator, processes, args.process_id)
    available = jax.devices()
    if count > len(available):
        raise ValueError(
            f"--devices {count} requested, but only {len(available)} "
            f"{available[0].platform} devices exist"
        )
    return available[:count]


def _mesh_axes(devices: int, fsdp: int | None) -> dict[str, int]:
    if fsdp is None:
        fsdp = devices // 2 if devices >= 4 and devices % 2 == 0 else devices
    if fsdp < 1 or devices % fsdp:
        raise ValueError(f"--fsdp {fsdp} must divide --devices {devices}")
    return {"data": devices // fsdp, "fsdp": fsdp}


def _optimizer_args(pairs: list[str]) -> dict[str, object]:
    """``["reset_interval=100", "nesterov=true"]`` -> ``{"reset_interval": 100, ...}``."""
    out: dict[str, object] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--opt-arg takes NAME=VALUE, got {pair!r}")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out[name] = value
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _plot(history: dict[str, list], path: Path, title: str) -> None:
    """Cross-entropy against the true step numbers (a resumed run's earlier steps included);
    the MoE router's auxiliary loss below it when there is one; bytes exchanged on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = history["steps"]
    aux = np.asarray(history["aux_loss"], dtype=float)
    with_aux = bool(np.any(np.nan_to_num(aux) != 0))
    fig, axes = plt.subplots(
        2 if with_aux else 1,
        1,
        figsize=(7, 5.5 if with_aux else 4),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]} if with_aux else None,
    )
    ax = axes[0, 0]
    ax.plot(steps, history["cross_entropy"], lw=1, label="training cross-entropy")
    ax.axhline(math.log(256), color="gray", ls="--", lw=1, label="uniform over bytes (ln 256)")
    ax.set(ylabel="cross-entropy (nats / byte)", title=title)
    ax.legend(loc="upper center")
    if history.get("bytes_exchanged") is not None:
        other = ax.twinx()
        total = np.nancumsum(np.asarray(history["bytes_exchanged"], dtype=float)) / 2**20
        other.plot(steps, total, color="C1", lw=1)
        other.set_ylabel("bytes exchanged across replicas, per device (MiB, cumulative)")
        other.yaxis.label.set_color("C1")
    if with_aux:
        axes[1, 0].plot(steps, aux, lw=1, color="C2")
        axes[1, 0].set(ylabel="router aux loss")
    axes[-1, 0].set(xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class UsageError(Exception):
    """Bad flags or inputs, found before training starts."""


def run(args: argparse.Namespace) -> dict:
    """Trains as ``args`` say and writes ``metrics.json`` and ``loss.png``; returns the metrics.

    Raises:
      UsageError: a flag or input that cannot work (unknown optimizer, a device count the model
        cannot be sharded over, a missing data file...), before any training.
    """
    try:
        setup = _setup(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    return _train(args, *setup)


def _collectives(per_kind: dict[str, float]) -> str:
    """``all-gather 2.91 MiB, all-reduce 7.17 MiB`` (per device and step), or ``none``."""
    from jaxlib_ext import costs

    moved = [f"{kind} {costs.format_bytes(b)}" for kind, b in per_kind.items() if b]
    return ", ".join(moved) or "none"


def _check_optimizer(args: argparse.Namespace, tx: Any, model: Any) -> None:
    """Traces one abstract init and update, so that a hyperparameter of the wrong kind
    (``--opt-arg reset_interval=abc``) is a usage error now rather than a traceback later."""
    import jax

    params = model.abstract_params
    try:
        state = jax.eval_shape(tx.init, params)
        jax.eval_shape(tx.update, params, state, params)
    except (TypeError, ValueError) as err:
        given = " ".join(f"--opt-arg {a}" for a in args.opt_arg)
        raise ValueError(f"--optimizer {args.optimizer} {given}: {err}".replace("  ", " ")) from err


def _mesh_text(shape: dict) -> str:
    return " x ".join(f"{k}={v}" for k, v in shape.items()) or "(unknown)"


def _json_history(history: dict[str, list]) -> dict[str, list]:
    """The history as strict JSON (NaN and infinities as None) for a checkpoint's extra."""
    return {
        k: [v if not isinstance(v, float) or math.isfinite(v) else None for v in values]
        for k, values in history.items()
    }


def _resumed_history(names: list[str], saved: dict | None, start_step: int) -> dict[str, list]:
    """Fresh lists, or the saved ones for the ``start_step`` steps before a resume (a metric
    the saved run did not record is None there; steps are numbered 1..start_step)."""
    if not saved or len(saved.get("steps", [])) != start_step:
        return {name: [] for name in names}
    nan = lambda v: math.nan if v is None else v
    return {
        name: [nan(v) for v in saved.get(name, [None] * start_step)][:start_step] for name in names
    }


def _skipped_steps(opt_state: Any) -> int | None:
    """Steps ``optax.apply_if_finite`` skipped so far (None when the optimizer is not wrapped)."""
    import jax
    import numpy as np
    import optax

    is_wrapper = lambda x: isinstance(x, optax.ApplyIfFiniteState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_wrapper) if is_wrapper(x)]
    if not found:
        return None
    # a scalar per replica at most; every process holds a copy (read the local one)
    return int(np.max(np.asarray(found[0].total_notfinite.addressable_data(0))))


def _setup(args: argparse.Namespace):
    devices = _setup_devices(args.devices, args)

    import optax

    from jaxlib_ext import data
    from jaxlib_ext.model import LanguageModel, LMConfig
    from jaxlib_ext.optimizers import make_optimizer
    from parallel.mesh import make_mesh
    from parallel.rules import activation_constraint

    replicas = args.replicas or 1
    if args.devices % replicas:
        raise ValueError(f"--replicas {replicas} must divide --devices {args.devices}")
    axes = _mesh_axes(args.devices // replicas, args.fsdp)
    if args.sync:
        axes = {"replica": replicas, **axes}
    mesh = make_mesh(axes, devices=devices)
    config = LMConfig(
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        d_ff=args.d_ff or 4 * args.d_model,
        max_len=args.seq_len,
        num_experts=args.experts,
        top_k=args.top_k,
        scan_layers=args.scan_layers,
    )
    strategy = None
    if args.moe_strategy:
        from parallel.moe import MoeStrategy

        strategy = MoeStrategy(
            args.moe_strategy,
            mesh,
            slots=args.slots,
            capacity_factor=args.capacity_factor,
            remat=args.remat,
            load_window=args.load_window,
            reshard_every=args.reshard_every,
        )
    model = LanguageModel(
        config, activation_sharding=activation_constraint(mesh), moe_strategy=strategy
    )
    warmup = min(args.warmup, args.steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup, max(args.steps, warmup + 1), end_value=args.lr / 10
    )
    extra = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    extra.update(_optimizer_args(args.opt_arg))
    if args.optimizer.endswith("coordinate_clipped"):
        extra.setdefault("fraction", 0.01)
    tx = make_optimizer(args.optimizer, schedule, **extra)
    _check_optimizer(args, tx, model)
    if args.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=args.skip_nonfinite)
    corpus = data.load_corpus(args.data)
    batches = data.TokenBatches(corpus, batch_size=args.batch_size, seq_len=args.seq_len)
    if args.sync:
        run = _diloco_run(args, model, tx, mesh)
    elif strategy is not None:
        run = _moe_run(args, model, tx, mesh)
    else:
        run = _plain_run(args, model, tx, mesh)
    return mesh, config, model, batches, run


@dataclasses.dataclass
class _Run:
    """How to build, restore and step a state, whatever the training scheme."""

    init: Callable[[], Any]
    restore: Callable[[Any], tuple[Any, dict]]
    step: Callable[[Any, Any], tuple[Any, dict]]
    shard: Callable[[Any], Any]
    bytes_at: Callable[[int], float] | None
    describe: list[tuple[str, str]]
    program: Any = None  # the jitted step to analyze when ``step`` is a Python wrapper
    rules: Any = None  # the sharding rules recorded in checkpoints (default DEFAULT_RULES)
    extra_metrics: tuple[str, ...] = ()  # per-step metrics kept in metrics.json


def _plain_run(args, model, tx, mesh) -> _Run:
    from jaxlib_ext import train

    shardings = train.train_state_shardings(model, tx, mesh)
    batch_sharding = train.batch_sharding(mesh, global_batch=args.batch_size)
    return _Run(
        init=lambda: train.init_train_state(model, tx, shardings, seed=args.seed),
        restore=lambda ckpt: ckpt.restore(
            train.abstract_train_state(model, tx, shardings), fallback=True
        ),
        step=train.make_train_step(train.lm_loss(model), tx, shardings, batch_sharding),
        shard=lambda batch: train.shard_batch(batch, batch_sharding),
        bytes_at=None,
        describe=[],
    )


def _diloco_run(args, model, tx, mesh) -> _Run:
    from jaxlib_ext.diloco_train import DilocoSetup
    from parallel.diloco import DilocoConfig, outer_optimizer

    config = DilocoConfig(
        replicas=args.replicas,
        sync_every=args.sync_every,
        fragments=args.fragments,
        overlap=args.overlap,
        alpha=args.alpha,
        exchange_dtype=args.exchange_dtype,
        sync="ddp" if args.sync == "ddp" else "diloco",
    )
    outer = outer_optimizer(args.outer_lr, args.outer_momentum)
    setup = DilocoSetup.create(model, tx, outer, config, mesh)
    setup.batch_sharding(args.batch_size)  # checks that the batch splits over the replicas
    if args.sync == "ddp":
        scheme = f"ddp over {args.replicas} replicas, {args.exchange_dtype} gradients"
    else:
        scheme = (
            f"{args.sync}: H={args.sync_every}, P={args.fragments}, tau={args.overlap}, "
            f"alpha={args.alpha}, {args.exchange_dtype}, outer lr {args.outer_lr} "
            f"momentum {args.outer_momentum}"
        )
    return _Run(
        init=lambda: setup.init(seed=args.seed),
        restore=lambda ckpt: setup.restore(ckpt, fallback=True),
        step=setup.step(),
        shard=setup.shard_batch,
        bytes_at=setup.bytes_at,
        describe=[("sync", scheme)],
    )


def _moe_run(args, model, tx, mesh) -> _Run:
    from jaxlib_ext import moe_train, train

    strategy = model.moe_strategy
    shardings = moe_train.moe_train_state_shardings(model, tx, mesh)
    batch_sharding = train.batch_sharding(mesh, global_batch=args.batch_size)
    train_step = moe_train.make_moe_train_step(model, tx, shardings, batch_sharding)
    reshard = moe_train.make_moe_reshard(model, tx, shardings) if args.reshard_every else None

    def step(state, batch):
        done = int(state.step)
        if reshard is not None and done and done % args.reshard_every == 0:
            state = reshard(state)
        return train_step(state, batch)

    knobs = f"{strategy.kind}: {args.experts} experts, top-{args.top_k}"
    if strategy.materialize_path == "all_gather":
        knobs += f", m={strategy.slots} slots (c={strategy.send_per_device} sent per device)"
    elif strategy.materialize_path == "all_reduce":
        knobs += f", m={strategy.slots} slots (top-{strategy.slots} copied by all-reduce)"
    if strategy.kind == "fssdp":
        knobs += f", window {strategy.load_window}"
    if args.reshard_every:
        knobs += f", reshard every {args.reshard_every}"
    if strategy.remat:
        knobs += ", remat"
    path = strategy.dispatch_path
    knobs += "; tokens stay local" if path == "none" else f"; tokens: {path} all_to_all"
    return _Run(
        init=lambda: moe_train.init_moe_train_state(model, tx, shardings, seed=args.seed),
        restore=lambda ckpt: ckpt.restore(
            moe_train.abstract_moe_train_state(model, tx, shardings), fallback=True
        ),
        step=step,
        shard=lambda batch: train.shard_batch(batch, batch_sharding),
        bytes_at=None,
        describe=[("moe", knobs)],
        program=train_step,
        rules=strategy.rules(),
        extra_metrics=("moe_load_imbalance", "moe_rows_sent", "moe_expert_copies"),
    )


def _moe_summary(args, model, history, report_tokens) -> tuple[dict, list[tuple[str, str]]]:
    """Expert and token bytes per device per step (issued by the compiled step, and what the
    routing needed) and the balance, for ``metrics.json`` and the table."""
    import numpy as np

    from jaxlib_ext import costs
    from parallel.moe import expert_wire_bytes, token_wire_bytes

    config, strategy = model.config, model.moe_strategy
    itemsize = 2 if config.param_dtype == "bfloat16" else 4
    expert = 2 * config.d_model * config.d_ff * itemsize
    row = config.d_model * (2 if config.dtype == "bfloat16" else 4)
    layers = config.num_layers
    issued_expert = layers * sum(expert_wire_bytes(strategy, config.num_experts, expert).values())
    tokens = report_tokens // strategy.num_devices
    issued_tokens = layers * sum(
        token_wire_bytes(strategy, tokens, config.top_k, config.num_experts, row).values()
    )
    useful_expert = [2 * c * expert for c in history["moe_expert_copies"]]
    useful_tokens = [4 * r * row for r in history["moe_rows_sent"]]
    history["moe_expert_bytes_useful"] = useful_expert
    summary = {
        "strategy": strategy.kind,
        "dispatch": strategy.dispatch_path,
        "load_imbalance_mean": float(np.mean(history["moe_load_imbalance"])),
        "expert_bytes_issued_per_step": issued_expert,
        "expert_bytes_useful_per_step_mean": float(np.mean(useful_expert)),
        "token_bytes_issued_per_step": issued_tokens,
        "token_bytes_useful_per_step_mean": float(np.mean(useful_tokens)),
    }
    f = costs.format_bytes
    rows = [
        ("device load max/mean", f"{summary['load_imbalance_mean']:.2f} (mean over steps)"),
        (
            "expert bytes / step",
            f"{f(issued_expert)} issued, {f(summary['expert_bytes_useful_per_step_mean'])} "
            "useful (per device)",
        ),
        (
            "token bytes / step",
            f"{f(issued_tokens)} issued, {f(summary['token_bytes_useful_per_step_mean'])} "
            "useful (per device)",
        ),
    ]
    return summary, rows


class _StopOnSigterm:
    """While active, SIGTERM only sets :attr:`received`; the previous handler comes back after.

    Installed from the main thread only (Python delivers signals there); elsewhere it does nothing.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> _StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _train(args, mesh, config, model, batches, run: _Run) -> dict:
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxlib_ext import costs, data
    from jaxlib_ext.checkpoint import Checkpointer, CheckpointError, manifest
    from parallel.rules import DEFAULT_RULES

    ckpt = Checkpointer(args.checkpoint_dir) if args.checkpoint_dir else None
    start_step, data_state = 0, batches.initial_state(args.seed)
    # Steps after the one resumed from: corrupt ones that the restore fell back past. The first
    # save replaces them (overwrite=True); without it, that save would be refused.
    replace_later = False
    restored_history: dict | None = None
    if args.resume:
        try:
            state, extra = run.restore(ckpt)
        except CheckpointError as err:
            raise UsageError(f"cannot resume from {args.checkpoint_dir}: {err}") from err
        data_state = data.DataState.from_dict(extra["data"])
        restored_history = extra.get("history")
        start_step = int(state.step)
        saved_mesh = manifest(args.checkpoint_dir, start_step).get("saved_mesh") or {}
        print(
            f"resumed step {start_step} from {args.checkpoint_dir}: saved on mesh "
            f"{_mesh_text(saved_mesh)}, now on {_mesh_text(dict(mesh.shape))}",
            flush=True,
        )
        if start_step >= args.steps:
            raise UsageError(
                f"the checkpoint is at step {start_step}, not before --steps "
                f"{args.steps}: nothing to train"
            )
        later = [s for s in ckpt.steps() if s > start_step]
        if later:
            replace_later = True
            print(
                f"resumed from step {start_step}: the later steps {later} could not be "
                "restored and are replaced by the next save",
                flush=True,
            )
    else:
        if ckpt is not None and ckpt.steps():
            raise UsageError(
                f"{args.checkpoint_dir} already holds steps {ckpt.steps()}: pass --resume to "
                "continue from them, or choose another --checkpoint-dir"
            )
        state = run.init()
    step_fn = run.step

    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

    def save(step: int) -> None:
        nonlocal replace_later
        rules = run.rules or DEFAULT_RULES
        tick = time.perf_counter()
        ckpt.save(
            step,
            state,
            extra={"data": data_state.to_dict(), "history": _json_history(history)},
            rules=rules,
            overwrite=replace_later,
        )
        replace_later = False
        if args.process_id == 0:
            tqdm.write(
                f"saved step {step} to {args.checkpoint_dir}: {costs.format_bytes(state_bytes)} "
                f"in {time.perf_counter() - tick:.2f} s (committed in the background)"
            )

    first, _ = batches.batch(batches.initial_state(args.seed))
    report = costs.analyze(run.program or step_fn, state, run.shard(first))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))

    names = ["steps", "losses", "cross_entropy", "aux_loss", "grad_norms", "tokens_per_sec"]
    names += ["bytes_exchanged"] if run.bytes_at is not None else []
    names += list(run.extra_metrics)
    # The whole run's history: the steps before a resume come from the checkpoint's extra.
    history = _resumed_history(names, restored_history, start_step)
    first_new = len(history["steps"])  # this process's steps start here
    start = time.perf_counter()
    done = start_step
    # SIGTERM: finish the step in progress, save it (committed before the message), exit 0.
    with _StopOnSigterm() as stop:
        bar = tqdm(
            range(start_step, args.steps),
            desc="training",
            unit="step",
            disable=args.no_progress or args.process_id != 0,
            dynamic_ncols=True,
        )
        for step in bar:
            tick = time.perf_counter()
            batch, data_state = batches.batch(data_state)
            state, metrics = step_fn(state, run.shard(batch))
            loss = float(metrics["loss"])
            grad_norm = float(metrics.get("grad_norm", math.nan))
            elapsed = time.perf_counter() - tick
            history["steps"].append(step + 1)
            history["losses"].append(loss)
            history["cross_entropy"].append(float(metrics.get("cross_entropy", loss)))
            history["aux_loss"].append(float(metrics.get("aux_loss", 0.0)))
            history["grad_norms"].append(grad_norm)
            history["tokens_per_sec"].append(args.batch_size * args.seq_len / elapsed)
            if run.bytes_at is not None:
                history["bytes_exchanged"].append(run.bytes_at(step + 1))
            for name in run.extra_metrics:
                history[name].append(float(metrics[name]))
            bar.set_postfix(loss=f"{loss:.3f}", gnorm=f"{grad_norm:.2f}")
            done = step + 1
            if ckpt is not None and args.checkpoint_every and done % args.checkpoint_every == 0:
                save(done)
            if stop.received:
                break
        bar.close()
        wall = time.perf_counter() - start
        if ckpt is not None:
            if not (args.checkpoint_every and done % args.checkpoint_every == 0):
                save(done)
            ckpt.close()  # waits until the last save is committed
        if stop.received:
            what = f"saved step {done}" if ckpt is not None else f"stopped after step {done}"
            print(f"SIGTERM: {what}, exiting", flush=True)
        interrupted = stop.received and done < args.steps

    # cross-entropy alone (the objective adds the MoE router's auxiliary loss), whole run
    losses = history["cross_entropy"]
    measured = history["tokens_per_sec"][first_new:]
    steady = measured[1:] or measured
    tail = losses[-min(20, len(losses)) :]
    summary = {
        "final_loss": losses[-1],
        "final_aux_loss": history["aux_loss"][-1],
        "mean_loss_last_20": float(np.mean(tail)),
        "min_loss": float(np.nanmin(losses)),
        "uniform_loss": math.log(256),
        "tokens_per_sec_median": float(np.median(steady)),
        "wall_seconds": wall,
        "num_params": model.num_params(),
        "optimizer_state_bytes": opt_bytes,
        "nonfinite_steps_skipped": _skipped_steps(state.opt_state),
        "mesh": dict(mesh.shape),
        "step_cost": report.summary(),
    }
    if run.bytes_at is not None:
        exchanged = history["bytes_exchanged"]
        summary["bytes_exchanged_total"] = float(np.nansum(exchanged))
        summary["bytes_exchanged_peak_step"] = float(np.nanmax(exchanged))
    moe_rows: list[tuple[str, str]] = []
    if model.moe_strategy is not None:
        summary["moe"], moe_rows = _moe_summary(
            args, model, history, args.batch_size * args.seq_len
        )
    rows = [
        ("optimizer", args.optimizer),
        *run.describe,
        ("mesh", " x ".join(f"{k}={v}" for k, v in mesh.shape.items())),
        ("parameters", f"{model.num_params():,}"),
        ("optimizer state", costs.format_bytes(opt_bytes)),
        *(
            [("non-finite steps skipped", str(summary["nonfinite_steps_skipped"]))]
            if summary["nonfinite_steps_skipped"] is not None
            else []
        ),
        ("steps", f"{start_step + 1}..{done} in {wall:.1f} s{' (SIGTERM)' if interrupted else ''}"),
        ("first / final loss", f"{losses[0]:.3f} / {losses[-1]:.3f} nats per byte (cross-entropy)"),
        *(
            [
                (
                    "router aux loss (final)",
                    f"{summary['final_aux_loss']:.4f} (x {config.router_aux_weight:g} in the "
                    "objective)",
                )
            ]
            if config.num_experts
            else []
        ),
        ("mean of last 20", f"{summary['mean_loss_last_20']:.3f} (uniform: {math.log(256):.3f})"),
        ("tokens / s (median)", f"{summary['tokens_per_sec_median']:,.0f}"),
        ("peak memory / device", costs.format_bytes(report.memory.peak_bytes)),
        *(
            [
                (
                    "exchanged / device",
                    f"{costs.format_bytes(summary['bytes_exchanged_total'])} in total, "
                    f"{costs.format_bytes(summary['bytes_exchanged_peak_step'])} at peak "
                    "(across replicas)",
                )
            ]
            if run.bytes_at is not None
            else []
        ),
        *moe_rows,
        ("collectives / step", _collectives(report.wire_bytes())),
    ]
    record = {
        "args": {k: v for k, v in vars(args).items() if k != "parser"},
        "model": vars(config),
        "start_step": start_step,
        "end_step": done,
        "stopped_by_sigterm": interrupted,
        **history,
        "summary": summary,
    }
    if args.process_id != 0:  # one process reports (they all computed the same figures)
        return record
    print("\nSummary\n" + _table(rows))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    _plot(
        history,
        out / "loss.png",
        f"{args.optimizer}, {model.num_params():,} params, mesh {dict(mesh.shape)}",
    )
    print(f"\nwrote {out / 'metrics.json'} and {out / 'loss.png'}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        args.parser.exit(2, f"{args.parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
