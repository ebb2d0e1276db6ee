"""Cost accounting from the compiled program: collective bytes, peak memory, FLOPs.

Everything here is read from what XLA will run, after SPMD partitioning (``compile().as_text()``,
``memory_analysis()``, ``cost_analysis()``), so the figures are deterministic and per device.

Collective wire bytes per device, for a collective over groups of ``n`` devices whose result has
``R`` bytes on each device (the bandwidth-optimal ring / pairwise algorithms):

==================  ======================  ===============================================
kind                wire bytes per device   why
==================  ======================  ===============================================
all-gather          ``R * (n-1) / n``       receive the ``n-1`` shards you do not have
reduce-scatter      ``R * (n-1)``           send ``n-1`` partial shards of size ``R``
all-reduce          ``2 * R * (n-1) / n``   a reduce-scatter then an all-gather
all-to-all          ``R * (n-1) / n``       keep one of ``n`` chunks, exchange the rest
collective-permute  ``R``                   send the whole buffer to one peer
==================  ======================  ===============================================

Groups of one device move nothing. Ops inside a ``while`` are multiplied by its
``known_trip_count`` (nested loops multiply); ops inside a ``conditional`` are attributed to their
branch, and totals take, per conditional, the branch that moves the most bytes (``branches="max"``,
the worst case) or all branches (``branches="sum"``).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import jax

COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "collective-permute",
)

_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e4m3fnuz": 8,
    "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8, "f8e3m4": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _array_bytes(type_text: str) -> int:
    """Bytes of an HLO type (an array or a tuple of arrays), from the text before the opcode."""
    total_bits = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _DTYPE_BITS:
            continue
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total_bits += count * _DTYPE_BITS[dtype]
    return total_bits // 8


def _split_type_and_op(rhs: str) -> tuple[str, str, str]:
    """``"f32[4]{0} all-gather(%x), ..."`` -> (type text, opcode, rest)."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                type_text, rest = rhs[: i + 1], rhs[i + 1 :].lstrip()
                break
        else:
            return rhs, "", ""
    else:
        type_text, _, rest = rhs.partition(" ")
    opcode, _, rest = rest.partition("(")
    return type_text, opcode.strip(), rest


def _group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group, from any of the three ways HLO prints replica groups."""
    mesh_form = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\([^)]*\))?\s*\{([^}]*)\}", attrs
    )
    if mesh_form:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh_form.group(1))}
        size = 1
        for axis in re.findall(r"'([^']+)'", mesh_form.group(2)):
            size *= sizes[axis]
        return size
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if iota:
        return int(iota.group(1).split(",")[-1])
    listed = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if listed:
        return len(re.findall(r"\d+", listed.group(1)))
    return num_devices  # replica_groups={} or absent: every device


def _wire_bytes(kind: str, result_bytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all-gather" or kind == "all-to-all":
        return result_bytes * (n - 1) / n
    if kind == "reduce-scatter":
        return float(result_bytes * (n - 1))
    if kind == "all-reduce":
        return 2.0 * result_bytes * (n - 1) / n
    return float(result_bytes)  # collective-permute


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective instruction of the compiled program.

    Attributes:
      kind: one of :data:`COLLECTIVE_KINDS`.
      name: the HLO instruction name.
      computation: the HLO computation that contains it.
      result_bytes: bytes of its result on one device.
      group_size: devices per replica group.
      executions: how often it runs per call (product of enclosing loops' trip counts).
      branch: the enclosing conditionals as ``((conditional_name, branch_index), ...)``.
      wire_bytes: bytes one device sends or receives per execution (see the module docstring).
    """

    kind: str
    name: str
    computation: str
    result_bytes: int
    group_size: int
    executions: int
    branch: tuple[tuple[str, int], ...]
    wire_bytes: float

    @property
    def total_wire_bytes(self) -> float:
        return self.wire_bytes * self.executions


@dataclasses.dataclass(frozen=True)
class _Computation:
    ops: list[tuple[str, str, int, int]]  # (kind, name, result_bytes, group_size)
    calls: list[tuple[str, int]]  # (callee, multiplier)
    conditionals: list[tuple[str, list[str]]]  # (instruction name, branch computations)


def _num_devices(hlo_text: str) -> int:
    """Devices the module runs on: ``num_partitions x replica_count`` from its header."""
    partitions = re.search(r"num_partitions=(\d+)", hlo_text)
    replicas = re.search(r"replica_count=(\d+)", hlo_text)
    return (int(partitions.group(1)) if partitions else 1) * (
        int(replicas.group(1)) if replicas else 1
    )


def _parse_module(hlo_text: str) -> tuple[dict[str, _Computation], str]:
    num_devices = _num_devices(hlo_text)
    computations: dict[str, _Computation] = {}
    entry = ""
    current: _Computation | None = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = _Computation([], [], [])
            computations[head.group(2)] = current
            if head.group(1):
                entry = head.group(2)
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        name, rhs = inst.groups()
        type_text, opcode, rest = _split_type_and_op(rhs)
        base = opcode.removesuffix("-start")
        if base in COLLECTIVE_KINDS and not opcode.endswith("-done"):
            if opcode.endswith("-start") and type_text.startswith("("):
                # async pairs return (operands..., results..., [contexts]): keep the result part
                arrays = _ARRAY.findall(type_text)
                pick = arrays[-1] if base == "all-gather" else arrays[0]
                type_text = f"{pick[0]}[{pick[1]}]"
            current.ops.append(
                (base, name, _array_bytes(type_text), _group_size(rest, num_devices))
            )
        trips = 1
        if opcode == "while":
            found = _TRIP_COUNT.search(rest)
            trips = int(found.group(1)) if found else 1
        if opcode == "conditional":
            branches = _BRANCHES.search(rest)
            if branches:
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            else:
                true_false = dict(_CALLEES.findall(rest))
                names = [true_false["true_computation"], true_false["false_computation"]]
                names.reverse()  # branch 0 is false, as in lax.cond's index form
            current.conditionals.append((name, names))
            continue
        for _, callee in _CALLEES.findall(rest):
            current.calls.append((callee, trips))
    return computations, entry


def collectives_from_hlo(hlo_text: str) -> list[CollectiveOp]:
    """Every collective of a compiled HLO module, with its execution count and branch context.

    Args:
      hlo_text: ``jax.jit(f).lower(...).compile().as_text()`` (post-partitioning HLO).
    """
    computations, entry = _parse_module(hlo_text)
    found: list[CollectiveOp] = []

    def walk(name: str, executions: int, branch: tuple[tuple[str, int], ...], depth: int) -> None:
        comp = computations.get(name)
        if comp is None or depth > 64:
            return
        for kind, op_name, result_bytes, n in comp.ops:
            found.append(
                CollectiveOp(
                    kind,
                    op_name,
                    name,
                    result_bytes,
                    n,
                    executions,
                    branch,
                    _wire_bytes(kind, result_bytes, n),
                )
            )
        for callee, trips in comp.calls:
            walk(callee, executions * trips, branch, depth + 1)
        for cond_name, branch_names in comp.conditionals:
            for index, callee in enumerate(branch_names):
                walk(callee, executions, (*branch, (cond_name, index)), depth + 1)

    walk(entry, 1, (), 0)
    return found


def _fold(ops: list[CollectiveOp], branches: str) -> dict[str, float]:
    """Per-kind totals; conditionals resolved per ``branches`` ('max' or 'sum'), nested too."""
    totals: dict[str, float] = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    plain = [op for op in ops if not op.branch]
    for op in plain:
        totals[op.kind] += op.total_wire_bytes
    by_cond: dict[str, dict[int, list[CollectiveOp]]] = defaultdict(lambda: defaultdict(list))
    for op in ops:
        if op.branch:
            cond, index = op.branch[0]
            by_cond[cond][index].append(dataclasses.replace(op, branch=op.branch[1:]))
    for per_branch in by_cond.values():
        folded = [_fold(branch_ops, branches) for branch_ops in per_branch.values()]
        if branches == "max":
            folded = [max(folded, key=lambda t: sum(t.values()))]
        for branch_totals in folded:
            for kind, value in branch_totals.items():
                totals[kind] += value
    return totals


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Per-device memory of a compiled program, from ``compiled.memory_analysis()`` (bytes).

    ``peak_bytes`` is ``argument + output + temp - alias``: every buffer the program holds at
    once (temporaries as XLA's buffer assignment packs them; donated inputs that alias outputs
    counted once). ``reported_peak_bytes`` is XLA's own ``peak_memory_in_bytes``, which on the
    CPU backend leaves temporaries out, so it is kept for reference only.
    """

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    peak_bytes: int
    reported_peak_bytes: int


@dataclasses.dataclass(frozen=True)
class CostReport:
    """What one call of a compiled program costs on one device.

    Attributes:
      collectives: every collective op (see :class:`CollectiveOp`).
      memory: per-device memory (:class:`MemoryStats`).
      flops: XLA's cost-analysis FLOP count for one device (XLA counts a loop body once).
      num_devices: devices the program is partitioned over.
      bytes_accessed: XLA's cost-analysis count of the bytes one device's program reads and
        writes in memory (each fusion's operands and results; a loop body once): the memory
        traffic a bandwidth-bound step (an optimizer update) is limited by.
    """

    collectives: tuple[CollectiveOp, ...]
    memory: MemoryStats
    flops: float
    num_devices: int
    bytes_accessed: float = 0.0

    def wire_bytes(self, branches: str = "max") -> dict[str, float]:
        """Per-device wire bytes of each collective kind for one call.

        Args:
          branches: ``"max"`` takes, for every conditional, its most expensive branch (the worst
            case of one call); ``"sum"`` adds all branches.
        """
        if branches not in ("max", "sum"):
            raise ValueError(f"`branches` must be 'max' or 'sum', got {branches=}")
        return _fold(list(self.collectives), branches)

    def total_wire_bytes(self, branches: str = "max") -> float:
        return sum(self.wire_bytes(branches).values())

    def branch_wire_bytes(self) -> dict[tuple[tuple[str, int], ...], dict[str, float]]:
        """Wire bytes per kind inside each conditional branch (keyed by the branch path)."""
        out: dict[tuple[tuple[str, int], ...], dict[str, float]] = {}
        for op in self.collectives:
            if op.branch:
                per_kind = out.setdefault(op.branch, dict.fromkeys(COLLECTIVE_KINDS, 0.0))
                per_kind[op.kind] += op.total_wire_bytes
        return out

    def counts(self) -> dict[str, int]:
        """How many collectives of each kind run per call (loops weighted, all branches)."""
        out = dict.fromkeys(COLLECTIVE_KINDS, 0)
        for op in self.collectives:
            out[op.kind] += op.executions
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the headline figures."""
        return {
            "wire_bytes_per_device": self.wire_bytes(),
            "collective_counts": self.counts(),
            "peak_bytes_per_device": self.memory.peak_bytes,
            "temp_bytes_per_device": self.memory.temp_bytes,
            "argument_bytes_per_device": self.memory.argument_bytes,
            "flops_per_device": self.flops,
            "bytes_accessed_per_device": self.bytes_accessed,
            "num_devices": self.num_devices,
        }


def _memory_stats(compiled: Any) -> MemoryStats:
    stats = compiled.memory_analysis()
    argument = int(stats.argument_size_in_bytes)
    output = int(stats.output_size_in_bytes)
    temp = int(stats.temp_size_in_bytes)
    alias = int(stats.alias_size_in_bytes)
    reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return MemoryStats(argument, output, temp, alias, argument + output + temp - alias, reported)


def _cost_analysis(compiled: Any) -> dict:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def analyze_compiled(compiled: Any) -> CostReport:
    """A :class:`CostReport` of an already compiled program (``jit(f).lower(...).compile()``)."""
    text = compiled.as_text()
    ops = tuple(collectives_from_hlo(text))
    analysis = _cost_analysis(compiled)
    return CostReport(
        ops,
        _memory_stats(compiled),
        float(analysis.get("flops", 0.0)),
        _num_devices(text),
        float(analysis.get("bytes accessed", 0.0)),
    )


def analyze(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CostReport:
    """Compiles ``fn`` for ``args`` (arrays or ``ShapeDtypeStruct``s) and reports its costs.

    Args:
      fn: a ``jax.jit``-wrapped function (its shardings and donations are kept) or a plain
        function (it is jitted with defaults).
      *args, **kwargs: the call's arguments; nothing is executed.

    Returns:
      A :class:`CostReport`.

    Example:
      >>> import jax.numpy as jnp
      >>> report = analyze(lambda x: x @ x.T, jnp.ones((8, 4)))
      >>> report.flops > 0, report.total_wire_bytes()
      (True, 0.0)
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return analyze_compiled(jitted.lower(*args, **kwargs).compile())


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def wire_bytes_table(per_kind: Mapping[str, float]) -> str:
    """A small text table of per-kind wire bytes, skipping kinds that move nothing."""
    rows = [(k, format_bytes(v)) for k, v in per_kind.items() if v]
    return "\n".join(f"  {k:<20}{v:>14}" for k, v in rows) or "  (no collectives)"
