"""Optimizer step cost: SPAM, diffGrad, FRUGAL and coordinate-wise clipping against AdamW and SGD.

For transformer-like parameter trees of about 10M, 50M and 200M float32 parameters (an embedding,
four blocks of q/k/v, output and MLP matrices, layer-norm scales and biases), each optimizer's
jitted, donated step ``(params, state, grads) -> (params, state)`` (update then
``optax.apply_updates``, ``donate_argnums=(0, 1)``) is timed side by side with its baseline:
alternating round-robin over several rounds (the start rotating every round), after a warm-up, each
round's time blocked with ``block_until_ready``. A ratio is the median over rounds of the
per-round ratio to the baseline timed in the same round, so drifts in machine load cancel.
Peak memory is the compiled step's (``jaxlib_ext.costs.analyze``), state bytes the sum of the
state's leaves.

Groups (each size's arrays are freed before the next group and size):

- adam: ``optax.adamw`` (baseline), ``optim.spam``, ``optim.diffgrad``,
  ``optim.adam_coordinate_clipped(fraction=0.01)``, ``optim.frugal(density=0.25)`` in block mode
  (the default) and with ``projection="svd"``;
- sgd: ``optax.sgd`` (baseline), ``chain(optim.coordinate_clip(0.01), optax.sgd)``,
  ``optim.sgd_coordinate_clipped(fraction=0.01)`` (momentum 0.9), and ``optax.sgd`` with momentum
  0.9 as the like-for-like baseline of the last one;
- torch (only if ``torch`` and ``pytorch_optimizer`` import): pytorch_optimizer's SPAM and
  DiffGrad, each paired with ours, ``torch.set_num_threads(os.cpu_count())``; with
  ``--authors-dir DIR``, also the authors' own PyTorch code, loaded from files the user put in
  ``DIR`` (not part of this repository): ``SPAM.py`` (its ``AdamW`` class, from the SPAM
  repository's ``galore_torch/SPAM.py``) and ``diffGrad_v2.py`` (its ``diffgrad`` class, from
  the diffGrad repository; its ``diffGrad.py`` is the version its authors mark as buggy), and,
  when ``DIR/frugal/`` holds the ``frugal`` package of the FRUGAL repository, its
  ``GaloreAdamW`` (svd) and ``BlockAdamW`` (descending blocks) next to ``optim.frugal`` with the
  same density, update gap, state-free rule (signSGD), no weight decay, and each kernel in
  PyTorch's ``(out, in)`` layout (so both pick the same side and rank), averaged over a refresh
  period as below. Their ``adamw.py`` imports the private ``torch.optim.optimizer._dispatch_sqrt``,
  which newer torch releases dropped: when it is missing the benchmark restores it (``math.sqrt``
  of a float, ``sqrt()`` of a tensor: what it was) before loading their package.

FRUGAL chooses its subspace anew every ``update_gap`` steps (an SVD of every projectable matrix in
``svd`` mode, under a ``lax.cond``), so its step time is averaged over one refresh period: every
round times one refresh step (the state's count set to a multiple of the gap) and
``steps-per-round`` ordinary steps (count never a multiple of it), and that round's step time is
``(t_refresh + (G - 1) * t_ordinary) / G`` with ``G = --frugal-gap``. The 16 projectable matrices
(``default_projectable``: the 2-D leaves but the embedding) make 4 active blocks at density 0.25.

Usage:

    python benchmarks/optim_step.py [--sizes 10M,50M,200M] [--rounds 7] [--steps-per-round 3]
        [--frugal-gap 200]
    python benchmarks/optim_step.py --quick   # a tiny smoke size
    python benchmarks/optim_step.py --sizes 10M --authors-dir ~/authors_code  # + authors' torch
    python benchmarks/optim_step.py --groups torch_frugal_svd --authors-dir ~/authors_code
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, time_calls, use_cpu_devices, write_json

LAYERS = 4
VOCAB_PER_D = 16  # embedding rows per model dimension (d=2048 -> a 32k vocabulary)
# issue 14's targets (times the baseline's step in the same round)
SPAM_TARGET = 1.10  # adamw's: SPAM moves the same bytes
DIFFGRAD_TARGET = 1.35  # adamw's: two more passes over memory (prev_grad) than adamw's seven
CLIP_TARGET = 3.0  # an SGD step's, with the threshold still exact
FRUGAL_TARGET = 1.3  # adamw's, averaged over a refresh period (block mode)
FRUGAL_SVD_TARGET = 1.0  # the authors' PyTorch GaloreAdamW step, averaged over a refresh period
FRUGAL_DENSITY = 0.25


def parse_size(text: str) -> int:
    """``"10M"`` -> 10_000_000; ``"250k"`` -> 250_000; plain integers too."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def layout(target: int) -> dict[str, tuple[int, ...]]:
    """Leaf shapes of a transformer-like tree of about ``target`` parameters.

    An embedding of ``16 d x d``, ``LAYERS`` blocks of ``d x 3d`` (qkv), ``d x d`` (out),
    ``d x 4d`` and ``4d x d`` (MLP) with their biases and two layer-norm scales, and a final
    layer-norm scale: about ``64 d^2`` parameters, ``d`` a multiple of 32.
    """
    d = max(32, 32 * round(math.sqrt(target / (12 * LAYERS + VOCAB_PER_D)) / 32))
    shapes: dict[str, tuple[int, ...]] = {"embed": (VOCAB_PER_D * d, d)}
    for i in range(LAYERS):
        shapes |= {
            f"block{i}/ln1": (d,),
            f"block{i}/qkv": (d, 3 * d),
            f"block{i}/qkv_bias": (3 * d,),
            f"block{i}/out": (d, d),
            f"block{i}/out_bias": (d,),
            f"block{i}/ln2": (d,),
            f"block{i}/mlp_in": (d, 4 * d),
            f"block{i}/mlp_in_bias": (4 * d,),
            f"block{i}/mlp_out": (4 * d, d),
            f"block{i}/mlp_out_bias": (d,),
        }
    shapes["final_ln"] = (d,)
    return shapes


def optimizers(frugal_gap: int = 200) -> dict[str, dict[str, Callable[[], object]]]:
    """Groups of ``name -> factory``; the first of each group is its baseline."""
    import optax

    import optim

    frugal = dict(density=FRUGAL_DENSITY, update_gap=frugal_gap)
    return {
        "adam": {
            "adamw": lambda: optax.adamw(1e-3),
            "spam": lambda: optim.spam(1e-3),
            "diffgrad": lambda: optim.diffgrad(1e-3),
            "adam_coordinate_clipped": lambda: optim.adam_coordinate_clipped(1e-3, fraction=0.01),
            "frugal": lambda: optim.frugal(1e-3, **frugal),
            "frugal_svd": lambda: optim.frugal(1e-3, **frugal, projection="svd"),
        },
        "sgd": {
            "sgd": lambda: optax.sgd(1e-2),
            "coordinate_clip+sgd": lambda: optax.chain(
                optim.coordinate_clip(0.01), optax.sgd(1e-2)
            ),
            "sgd_coordinate_clipped": lambda: optim.sgd_coordinate_clipped(1e-2, fraction=0.01),
            "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
        },
    }


class Runner:
    """Runs one optimizer's steps; subclasses define ``advance(steps)`` and ``free()``."""

    def advance(self, steps: int) -> None:
        """Runs ``steps`` steps and waits for them."""
        raise NotImplementedError

    def run(self, steps: int) -> None:
        self.advance(steps)

    def timed(self, steps: int) -> float:
        """Seconds per step of ``steps`` steps (one round)."""
        (t,) = time_calls(lambda: self.run(steps), repeats=1, warmup=0)
        return t / steps

    def extra(self) -> dict:
        """Runner-specific fields of the result row."""
        return {}


class JaxRunner(Runner):
    """One optimizer's donated step, with its own params and state.

    ``step``, when given, replaces the optax step ``(params, state, grads) -> (params, state)``
    (``tx.update`` then ``optax.apply_updates``); ``tx`` still initializes the state.
    """

    def __init__(self, tx, make_params, grads, step=None):
        import jax
        import optax

        from jaxlib_ext import costs

        def optax_step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.step = jax.jit(step or optax_step, donate_argnums=(0, 1))
        self.params = make_params()
        # jitted: distinct output buffers (an eager FRUGAL init shares zeros between its moments,
        # which a donated step rejects)
        self.state = jax.jit(tx.init)(self.params)
        self.grads = grads
        self.state_bytes = sum(  # PRNG keys (FRUGAL's) left out
            x.size * x.dtype.itemsize
            for x in jax.tree.leaves(self.state)
            if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        )
        report = costs.analyze(self.step, self.params, self.state, grads)
        memory = report.memory
        self.bytes_accessed = report.bytes_accessed  # XLA's count: the step's memory traffic
        self.peak_bytes = memory.peak_bytes
        self.alias_bytes = memory.alias_bytes
        self.temp_bytes = memory.temp_bytes

    def advance(self, steps: int) -> None:
        import jax

        for _ in range(steps):
            self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))

    def free(self) -> None:
        import jax

        for x in jax.tree.leaves((self.params, self.state)):
            x.delete()
        self.params = self.state = self.grads = None


class RefreshAveraged(Runner):
    """A step averaged over a refresh period of ``gap`` steps (FRUGAL's, ours or the authors').

    The optimizer's step counter is set, untimed, before the timed steps (``set_count``): to 0 (a
    multiple of ``gap``) for a refresh step, to 1 for ordinary steps (and back to 1 after every
    ``gap - 1`` of them, should a round be that long). A round's step time is
    ``(t_refresh + (gap - 1) * t_ordinary) / gap``; with ``gap`` 1 every step is a refresh.
    """

    def init_refresh(self, gap: int) -> None:
        self.gap = gap
        self.refresh_seconds: list[float] = []
        self.ordinary_seconds: list[float] = []

    def set_count(self, count: int) -> None:
        raise NotImplementedError

    def _timed_steps(self, steps: int, *, refresh: bool) -> float:
        """Seconds of ``steps`` refresh or ordinary steps (the count resets untimed)."""
        start_count = 0 if refresh else min(1, self.gap - 1)
        # ordinary steps run back to back while the count stays below the next multiple of gap
        chunk = 1 if refresh else max(self.gap - 1, 1)
        total, done = 0.0, 0
        while done < steps:
            self.set_count(start_count)
            n = min(chunk, steps - done)
            start = time.perf_counter()
            self.advance(n)
            total += time.perf_counter() - start
            done += n
        return total

    def run(self, steps: int) -> None:  # warm-up: both branches of the refresh
        self._timed_steps(1, refresh=True)
        self._timed_steps(max(steps - 1, 1), refresh=False)

    def timed(self, steps: int) -> float:
        t_refresh = self._timed_steps(1, refresh=True)
        t_ordinary = self._timed_steps(steps, refresh=False) / steps
        self.refresh_seconds.append(t_refresh)
        self.ordinary_seconds.append(t_ordinary)
        return (t_refresh + (self.gap - 1) * t_ordinary) / self.gap

    def extra(self) -> dict:
        return {
            "update_gap": self.gap,
            "refresh_step_seconds": self.refresh_seconds,
            "ordinary_step_seconds": self.ordinary_seconds,
            "refresh_step_seconds_median": statistics.median(self.refresh_seconds),
            "ordinary_step_seconds_median": statistics.median(self.ordinary_seconds),
        }


class FrugalRunner(RefreshAveraged, JaxRunner):
    """``optim.frugal``'s step averaged over a refresh period; its counter is the count of the
    ``FrugalState`` (the chain state's first element)."""

    def __init__(self, tx, make_params, grads, gap: int):
        JaxRunner.__init__(self, tx, make_params, grads)
        self.init_refresh(gap)

    def set_count(self, count: int) -> None:
        import jax
        import jax.numpy as jnp

        frugal_state = self.state[0]
        count = jnp.asarray(count, frugal_state.count.dtype)
        count = jax.device_put(count, frugal_state.count.sharding)
        self.state = (frugal_state._replace(count=count), *self.state[1:])
        jax.block_until_ready(self.state)


class TorchRunner(Runner):
    """A PyTorch optimizer (``make(params)``) over torch tensors of the same shapes."""

    def __init__(self, make, shapes: dict[str, tuple[int, ...]]):
        import torch

        gen = torch.Generator().manual_seed(0)
        self.params = []
        for shape in shapes.values():
            p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen))
            p.grad = 1e-3 * torch.randn(shape, generator=gen)
            self.params.append(p)
        self.opt = self.build(make, list(shapes))
        self.opt.step()  # creates the state
        self.state_bytes = sum(
            tensor_bytes(v)
            for s in self.opt.state.values()
            if isinstance(s, dict)  # per-parameter state (SPAM also keeps global counters)
            for v in s.values()
        )
        self.peak_bytes = None
        self.alias_bytes = None
        self.temp_bytes = None
        self.bytes_accessed = None

    def build(self, make, names: list[str]):
        return make(self.params)

    def advance(self, steps: int) -> None:
        for _ in range(steps):
            self.opt.step()

    def free(self) -> None:
        self.opt = self.params = None


def tensor_bytes(value) -> int:
    """Bytes of the tensors in one optimizer-state entry: a tensor, a list of them, or an object
    holding them (the authors' FRUGAL keeps its projection matrix in a projector object)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(tensor_bytes(v) for v in vars(value).values())
    return 0


class TorchFrugalRunner(RefreshAveraged, TorchRunner):
    """The authors' PyTorch FRUGAL, its step averaged over a refresh period as ``FrugalRunner``.

    Their optimizer refreshes its subspace (and resets the Adam state) when the ``step`` of the
    projected group's first parameter is a multiple of ``update_gap``: that is the counter set.
    The projectable kernels are given in PyTorch's ``(out, in)`` layout, the transpose of JAX's.
    """

    def __init__(self, make, shapes: dict[str, tuple[int, ...]], gap: int):
        self.projectable = projectable_names(shapes)
        torch_shapes = {n: s[::-1] if n in self.projectable else s for n, s in shapes.items()}
        TorchRunner.__init__(self, make, torch_shapes)
        self.first = next(g["params"][0] for g in self.opt.param_groups if g.get("is_proj_params"))
        self.init_refresh(gap)

    def set_count(self, count: int) -> None:
        self.opt.state[self.first]["step"] = count

    def build(self, make, names: list[str]):
        """The authors' two groups: the projectable kernels and the rest (AdamW)."""
        proj = [p for p, n in zip(self.params, names, strict=True) if n in self.projectable]
        rest = [p for p, n in zip(self.params, names, strict=True) if n not in self.projectable]
        return make(
            [{"params": rest, "is_proj_params": False}, {"params": proj, "is_proj_params": True}]
        )


def authors_frugal(folder: Path):
    """The authors' ``frugal`` package from ``folder`` (restoring ``_dispatch_sqrt`` if needed)."""
    import torch.optim.optimizer as torch_optimizer

    if not hasattr(torch_optimizer, "_dispatch_sqrt"):

        def _dispatch_sqrt(x):  # torch's private helper as it was: sqrt of a float or a tensor
            return x.sqrt() if hasattr(x, "sqrt") else math.sqrt(x)

        torch_optimizer._dispatch_sqrt = _dispatch_sqrt
    return load_module(folder / "__init__.py", "authors_frugal")


def projectable_names(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The leaves ``optim.frugal`` projects by default (``optim.default_projectable``)."""
    import jax
    import jax.numpy as jnp

    import optim

    tree = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
    return {n for n, flag in optim.default_projectable(tree).items() if flag}


def load_module(path: Path, name: str):
    """Imports one Python file (the authors' optimizer code) as a module, or a package from its
    ``__init__.py`` (its relative imports resolve inside the package's folder)."""
    package = [str(path.parent)] if path.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def torch_optimizers(authors_dir: str | None, frugal_gap: int = 200):
    """``{group: (ours, {label: make(params) -> torch optimizer})}`` for what imports."""
    try:
        import pytorch_optimizer
        import torch
    except ImportError as e:
        print(f"torch / pytorch_optimizer not importable ({e}); the torch groups are skipped")
        return {}
    import optim

    torch.set_num_threads(os.cpu_count() or 1)
    spam = {"pytorch_optimizer.SPAM": lambda ps: pytorch_optimizer.SPAM(ps, lr=1e-3)}
    diffgrad = {"pytorch_optimizer.DiffGrad": lambda ps: pytorch_optimizer.DiffGrad(ps, lr=1e-3)}
    if authors_dir is not None:
        folder = Path(authors_dir).expanduser()
        for file, cls, rows, make in (
            (
                "SPAM.py",
                "AdamW",
                spam,
                lambda c: lambda ps: c(ps, 1e-3, no_deprecation_warning=True),
            ),
            ("diffGrad_v2.py", "diffgrad", diffgrad, lambda c: lambda ps: c(ps, lr=1e-3)),
        ):
            if (folder / file).is_file():
                rows[f"authors' {file}"] = make(getattr(load_module(folder / file, file[:-3]), cls))
            else:
                print(f"{folder / file} not found: the authors' {file} is skipped")
    pairs = {
        "spam": (lambda: optim.spam(1e-3), spam),
        "diffgrad": (lambda: optim.diffgrad(1e-3), diffgrad),
    }
    if authors_dir is not None:
        package = Path(authors_dir).expanduser() / "frugal"
        if (package / "__init__.py").is_file():
            pairs |= authors_frugal_pairs(authors_frugal(package), frugal_gap)
        else:
            print(f"{package}/__init__.py not found: the authors' FRUGAL is skipped")
    return pairs


def authors_frugal_pairs(frugal, gap: int) -> dict:
    """``optim.frugal`` in svd and block mode, each with the authors' class of the same mode."""
    import optim

    same = dict(density=FRUGAL_DENSITY, update_gap=gap, inactive_update_rule="sign_sgd")
    adam = dict(lr=1e-3, weight_decay=0.0, no_deprecation_warning=True)
    ours = dict(density=FRUGAL_DENSITY, update_gap=gap)
    return {
        "frugal_svd": (
            lambda: optim.frugal(1e-3, **ours, projection="svd"),
            {
                "authors' GaloreAdamW (svd)": lambda groups: frugal.GaloreAdamW(
                    groups, **same, proj_type="svd", **adam
                )
            },
        ),
        "frugal_block": (
            lambda: optim.frugal(1e-3, **ours, block_order="descending"),
            {
                "authors' BlockAdamW": lambda groups: frugal.BlockAdamW(
                    groups, **same, block_order="descending", **adam
                )
            },
        ),
    }


def measure(runners: dict, *, rounds: int, steps: int, warmup: int) -> dict[str, dict]:
    """Round-robin timing; per runner the per-step seconds of every round."""
    names = list(runners)
    for name in names:
        runners[name].run(warmup)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):  # alternate, so drifts in machine load hit all alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(runners[name].timed(steps))
    base = names[0]
    out = {}
    for name in names:
        paired = [t / b for t, b in zip(times[name], times[base], strict=True)]
        out[name] = {
            "step_seconds_median": statistics.median(times[name]),
            "step_seconds": times[name],
            "baseline": base,
            "ratio_to_baseline": statistics.median(paired),
            "ratio_of_medians": statistics.median(times[name]) / statistics.median(times[base]),
            "state_bytes": runners[name].state_bytes,
            "peak_bytes_per_device": runners[name].peak_bytes,
            "alias_bytes_per_device": runners[name].alias_bytes,
            "temp_bytes_per_device": runners[name].temp_bytes,
            "bytes_accessed_per_device": runners[name].bytes_accessed,
            **runners[name].extra(),
        }
    return out


def make_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def run_size(label: str, target: int, args, torch_pairs) -> dict:
    import jax

    shapes = layout(target)
    num_params = sum(math.prod(s) for s in shapes.values())
    print(
        f"\n== {label}: {num_params / 1e6:.1f}M params, {len(shapes)} leaves, "
        f"d={shapes['final_ln'][0]} ==",
        flush=True,
    )
    grads = make_tree(shapes, 1, 1e-3)

    def params():  # every optimizer gets its own copy (its step donates them)
        return make_tree(shapes, 0, 0.02)

    groups: dict[str, dict] = {}

    def runner(name: str, make_tx):
        if name.startswith("frugal"):
            return lambda: FrugalRunner(make_tx(), params, grads, args.frugal_gap)
        return lambda: JaxRunner(make_tx(), params, grads)

    plan = [
        (group, {n: runner(n, f) for n, f in opts.items()})
        for group, opts in optimizers(args.frugal_gap).items()
    ]
    gap = args.frugal_gap
    for name, (ours, theirs) in torch_pairs.items():
        makers = {name: runner(name, ours)}
        for label_, make in theirs.items():
            if name.startswith("frugal"):
                makers[label_] = lambda m=make: TorchFrugalRunner(m, shapes, gap)
            else:
                makers[label_] = lambda m=make: TorchRunner(m, shapes)
        plan.append((f"torch_{name}", makers))
    if args.groups:
        plan = [(group, makers) for group, makers in plan if group in args.groups.split(",")]
    for group, makers in plan:
        start = time.perf_counter()
        runners = {name: make() for name, make in makers.items()}
        groups[group] = measure(
            runners, rounds=args.rounds, steps=args.steps_per_round, warmup=args.warmup
        )
        for runner in runners.values():
            runner.free()
        del runners
        gc.collect()
        print(f"  {group}: {time.perf_counter() - start:.0f} s", flush=True)
    for x in jax.tree.leaves(grads):
        x.delete()
    return {"num_params": num_params, "num_leaves": len(shapes), "groups": groups}


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def per_param(n, params: int) -> str:
    """Bytes accessed per parameter (XLA's count for the compiled step)."""
    return "-" if n is None else f"{n / params:.1f}"


def print_table(results: dict) -> None:
    header = f"{'size':<6}{'optimizer':<36}{'step ms':>9}{'ratio':>8}{'vs':>14}"
    print("\n" + header + f"{'state MiB':>11}{'peak MiB':>10}{'B/param':>9}")
    for label, res in results.items():
        for rows in res["groups"].values():
            for name, row in rows.items():
                print(
                    f"{label:<6}{name:<36}{row['step_seconds_median'] * 1e3:>9.1f}"
                    f"{row['ratio_to_baseline']:>8.2f}{row['baseline']:>14}"
                    f"{mib(row['state_bytes']):>11}{mib(row['peak_bytes_per_device']):>10}"
                    f"{per_param(row.get('bytes_accessed_per_device'), res['num_params']):>9}"
                )


def verdicts(results: dict) -> list[dict]:
    out = []
    for label, res in results.items():
        g = res["groups"]
        checks = [
            ("adam", "spam", SPAM_TARGET),
            ("adam", "diffgrad", DIFFGRAD_TARGET),
            ("adam", "frugal", FRUGAL_TARGET),
            ("sgd", "coordinate_clip+sgd", CLIP_TARGET),
        ]
        rows = [
            (name, g[group][name]["baseline"], g[group][name]["ratio_to_baseline"], target)
            for group, name, target in checks
            if group in g  # --groups may leave it out
        ]
        for theirs, row in list(g.get("torch_frugal_svd", {}).items())[1:]:
            # ours over theirs: the group's baseline is ours (the median of an odd number of
            # per-round ratios inverts exactly)
            rows.append(("frugal_svd", theirs, 1 / row["ratio_to_baseline"], FRUGAL_SVD_TARGET))
        for name, baseline, ratio, target in rows:
            out.append(
                {
                    "size": label,
                    "optimizer": name,
                    "baseline": baseline,
                    "ratio": ratio,
                    "target": target,
                    "met": ratio <= target,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10M,50M,200M", help="comma-separated parameter counts")
    p.add_argument("--quick", action="store_true", help="one tiny size, few rounds (smoke test)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    p.add_argument(
        "--frugal-gap",
        type=int,
        default=200,
        help="FRUGAL's update_gap: its step time is averaged over one refresh per this many steps",
    )
    p.add_argument(
        "--authors-dir",
        help="a folder holding the authors' SPAM.py, diffGrad_v2.py and frugal/ package (timed "
        "when torch imports)",
    )
    p.add_argument(
        "--groups",
        help="comma-separated groups to time (default all): adam, sgd, torch_spam, "
        "torch_diffgrad, torch_frugal_svd, torch_frugal_block",
    )
    p.add_argument("--out", default="benchmarks/out/optim_step.json")
    args = p.parse_args()
    if args.frugal_gap < 1:
        p.error(f"--frugal-gap must be >= 1, got {args.frugal_gap}")
    if args.quick:
        args.sizes, args.rounds, args.steps_per_round, args.warmup = "100k", 3, 2, 1
    use_cpu_devices(1)
    start = time.perf_counter()
    torch_pairs = torch_optimizers(args.authors_dir, args.frugal_gap)
    if args.groups:
        known = [*optimizers(), *(f"torch_{name}" for name in torch_pairs)]
        unknown = sorted(set(args.groups.split(",")) - set(known))
        if unknown:
            p.error(f"--groups: unknown or unavailable {unknown}; available here: {known}")
    results = {}
    for label in args.sizes.split(","):
        results[label.strip()] = run_size(label.strip(), parse_size(label), args, torch_pairs)
    print_table(results)
    checks = verdicts(results)
    print("\ntargets (ratio = median over rounds of step time / baseline's in the same round):")
    for c in checks:
        print(
            f"  {c['size']:<6}{c['optimizer']:<22}{c['ratio']:.2f}x {c['baseline']} "
            f"(target <= {c['target']}x): {'met' if c['met'] else 'MISSED'}"
        )
    for label, res in results.items():
        for group, rows in res["groups"].items():
            for name, row in rows.items():
                if "update_gap" in row:
                    refresh_ms = row["refresh_step_seconds_median"] * 1e3
                    ordinary_ms = row["ordinary_step_seconds_median"] * 1e3
                    print(
                        f"  {label:<6}{group}/{name}: refresh step {refresh_ms:.1f} ms, ordinary "
                        f"step {ordinary_ms:.1f} ms, averaged over a gap of {row['update_gap']}"
                    )
        for group, rows in res["groups"].items():
            if group.startswith("torch_"):
                for name, row in list(rows.items())[1:]:
                    print(f"  {label:<6}{group}: {name} / ours = {row['ratio_to_baseline']:.2f}x")
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s")
    record = {
        "machine": machine(),
        "config": vars(args),
        "torch_compared": bool(torch_pairs),
        "sizes": results,
        "targets": checks,
        "seconds": elapsed,
    }
    print("wrote", write_json(args.out, record))


if __name__ == "__main__":
    main()
