"""One MoE layer executed three ways: expert parallelism, FSDP over experts, and FSSDP.

:class:`MoeStrategy` holds the choice and its knobs; :meth:`MoeStrategy.layer` computes
``sum_j gate_j * expert_{e_j}(x)`` for every token from the layer's routing, the expert weights
``wi [E, d, f]``, ``wo [E, f, d]`` (stored in owner order, sharded by expert over the strategy's
mesh axes, ``E / D`` per device) and the layer's :class:`MoeLayerState`. All three give the dense
reference's result (round-off aside); they differ in what moves:

======  =========================================================  ===============================
kind    expert weights                                             tokens
======  =========================================================  ===============================
ep      stay on their owner                                        ``all_to_all`` to the owner
fsdp    all ``E`` all-gathered; gradients reduce-scattered         stay on their device
fssdp   ``c`` per owner broadcast into ``m`` slots per device      stay where a copy is, else
        (:func:`sparse_all_gather`), gradients summed back          ``all_to_all`` to a holder
        (:func:`sparse_reduce_scatter`)
======  =========================================================  ===============================

FSSDP (Qing et al., *Hecate: Unlocking Efficient Sparse Model Training via Fully Sharded Sparse
Data Parallelism*, https://arxiv.org/abs/2502.02581, 2025): each expert and its optimizer state
live on exactly one owner, where the update runs; each step a placement
(:func:`parallel.moe.placement.plan_placement`) built from a sliding window of per-expert loads
(optionally corrected with this step's routing) materializes copies of the hottest experts, tokens
go to a local copy when there is one, and the gradient copies are summed onto the owners. The
placement changes every step inside one compiled program. ``remat=True`` frees the materialized
(fsdp: gathered) weights after the forward and gathers them again for the backward
(``jax.checkpoint`` saving only the expert hidden activations).

With ``m < D`` slots, fssdp copies the ``m`` hottest experts to every device with one all-reduce
instead (``materialize="all_reduce"``: :func:`~parallel.moe.sparse_collectives.replicate_rows`).

Per device per step and layer, with ``s`` the bytes of one expert (``wi`` and ``wo``) and ``C``
the dispatch capacity (:mod:`parallel.moe.wire_bytes` gives the exact figures the tests check
against the compiled HLO): fsdp moves ``2 (D-1)/D E s`` (``3`` with remat), fssdp
``2 (D-1) c s`` (``3`` with remat; all_reduce: ``2 x 2 (D-1)/D m s``), ep none; ep and fssdp
move ``4 (D-1) C d`` activation bytes plus ``(D-1) C 4`` of slot ids in their padded
``all_to_all`` (the ragged dispatch moves only the routed rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from parallel.moe.dispatch import capacity as dispatch_capacity
from parallel.moe.dispatch import (
    dispatch_combine,
    emulated_ragged_all_to_all,
    ragged_all_to_all_supported,
    ragged_dispatch_combine,
)
from parallel.moe.experts import grouped_ffn
from parallel.moe.placement import (
    Placement,
    choose_devices,
    materialized_counts,
    owner_placement,
    plan_placement,
    plan_replication,
)
from parallel.moe.routing import Routing, expert_counts
from parallel.moe.sparse_collectives import replicate_rows, sparse_all_gather
from parallel.rules import DEFAULT_RULES, Rules

STRATEGIES = ("ep", "fsdp", "fssdp")
DISPATCHES = ("auto", "padded", "ragged", "ragged-emulated")
MATERIALIZE = ("auto", "all_gather", "all_reduce")
_HIDDEN = "moe_hidden"


class MoeLayerState(NamedTuple):
    """What a strategy keeps about one MoE layer between steps.

    Attributes:
      order: ``[E]`` int32 owner order: stored expert row ``r`` holds canonical expert
        ``order[r]`` (identity until a re-sharding).
      loads: ``[w, E]`` float32 assignments per canonical expert in the last ``w`` steps, oldest
        first (the sliding window the placement reads).
    """

    order: jax.Array
    loads: jax.Array


class MoeLayerStats(NamedTuple):
    """What one layer's execution reports (all float32).

    Attributes:
      counts: ``[E]`` assignments per canonical expert this step.
      rows: ``[D]`` token copies each device computed (the straggler metric: max/mean).
      sent: ``[D]`` token copies each device sent to another device.
      copies: ``[D]`` distinct experts each device held without owning them.
    """

    counts: jax.Array
    rows: jax.Array
    sent: jax.Array
    copies: jax.Array


@dataclasses.dataclass(frozen=True)
class MoeStrategy:
    """How the MoE layers of a model execute over a mesh.

    Args:
      kind: ``"ep"``, ``"fsdp"`` or ``"fssdp"``.
      mesh: the device mesh.
      axis_name: the mesh axes the experts are owned over and the tokens are split over (the
        batch's axes); default all axes of ``mesh``.
      slots: ``m``, extra expert slots per device per layer (fssdp only), ``0 <= m <= E``.
      capacity_factor: ``None`` (default) never drops a token copy; a float ``> 0`` sizes the
        ``all_to_all`` buffers (ep, fssdp) as in GShard and drops what does not fit.
      remat: free gathered expert weights after the forward, gather again for the backward.
      load_window: ``w``, steps in the load window (fssdp placement).
      current_routing: correct the window with this step's routing before placing.
      reshard_every: steps between heterogeneous re-shardings (0 = never); the training loop
        applies it (:mod:`parallel.moe.resharding`).
      dispatch: the token exchange of ep and fssdp: ``"padded"`` (capacity-padded
        ``all_to_all``, every backend), ``"ragged"`` (``lax.ragged_all_to_all``: only real rows
        travel; GPU/TPU), ``"ragged-emulated"`` (the ragged path with the collective emulated
        by a padded ``all_to_all``, for testing on CPU) or ``"auto"`` (default: ragged where the
        backend compiles it and no capacity factor is set, else padded).
        :attr:`dispatch_path` says which runs.
      materialize: how fssdp copies experts: ``"all_gather"`` (each device broadcasts its
        ``c = ceil(m / D)`` hottest owned experts, every device keeps ``m`` of the ``D c``:
        :func:`sparse_all_gather`), ``"all_reduce"`` (the ``m`` hottest experts copied to every
        device by one all-reduce: :func:`~parallel.moe.sparse_collectives.replicate_rows`,
        for ``m < D``) or ``"auto"`` (default: all_gather when ``m >= D``, else all_reduce).

    Example:
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> s = MoeStrategy("fssdp", mesh, slots=8)
      >>> s.num_devices, s.send_per_device
      (8, 1)
    """

    kind: str
    mesh: Mesh
    axis_name: str | tuple[str, ...] | None = None
    slots: int = 0
    capacity_factor: float | None = None
    remat: bool = False
    load_window: int = 5
    current_routing: bool = True
    reshard_every: int = 0
    dispatch: str = "auto"
    materialize: str = "auto"

    def __post_init__(self):
        if self.kind not in STRATEGIES:
            raise ValueError(f"`kind` must be one of {STRATEGIES}, got kind={self.kind!r}")
        axes = self.axis_name if self.axis_name is not None else tuple(self.mesh.axis_names)
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        missing = [a for a in axes if a not in self.mesh.axis_names]
        if missing or not axes:
            raise ValueError(
                f"`axis_name` must name axes of the mesh {tuple(self.mesh.axis_names)}, got "
                f"axis_name={self.axis_name!r}"
            )
        object.__setattr__(self, "axis_name", axes)
        _check_int("slots", self.slots, 0)
        if self.slots and self.kind != "fssdp":
            raise ValueError(f"`slots` is an fssdp knob, got slots={self.slots} for {self.kind!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"`capacity_factor` must be > 0 or None, got capacity_factor={self.capacity_factor}"
            )
        _check_int("load_window", self.load_window, 1)
        _check_int("reshard_every", self.reshard_every, 0)
        if self.dispatch not in DISPATCHES:
            raise ValueError(
                f"`dispatch` must be one of {DISPATCHES}, got dispatch={self.dispatch!r}"
            )
        if self.materialize not in MATERIALIZE:
            raise ValueError(
                f"`materialize` must be one of {MATERIALIZE}, got materialize={self.materialize!r}"
            )
        if self.dispatch.startswith("ragged") and self.capacity_factor is not None:
            raise ValueError(
                f"`dispatch`={self.dispatch!r} never drops a token copy, so it takes no "
                f"capacity factor, got capacity_factor={self.capacity_factor}"
            )

    @property
    def dispatch_path(self) -> str:
        """The token exchange that runs: ``"padded"``, ``"ragged"`` or ``"ragged-emulated"``
        (``"none"`` for fsdp, which moves no tokens)."""
        if self.kind == "fsdp":
            return "none"
        if self.dispatch != "auto":
            return self.dispatch
        platform = self.mesh.devices.flat[0].platform
        if self.capacity_factor is None and ragged_all_to_all_supported(platform):
            return "ragged"
        return "padded"

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axis_name)

    @property
    def materialize_path(self) -> str:
        """``"all_gather"``, ``"all_reduce"`` or ``"none"`` (ep, fsdp, or no slots)."""
        if self.kind != "fssdp" or self.slots == 0:
            return "none"
        if self.materialize != "auto":
            return self.materialize
        return "all_gather" if self.slots >= self.num_devices else "all_reduce"

    @property
    def send_per_device(self) -> int:
        """``c = ceil(m / D)``: experts each device broadcasts per layer and step (all_gather;
        0 otherwise)."""
        if self.materialize_path != "all_gather":
            return 0
        return -(-self.slots // self.num_devices)

    def check(self, num_experts: int, top_k: int) -> None:
        """Raises ``ValueError`` naming the argument when the model does not fit the strategy."""
        if num_experts % self.num_devices:
            raise ValueError(
                f"`num_experts` must be divisible by the {self.num_devices} devices of "
                f"{self.axis_name} that own them, got num_experts={num_experts}"
            )
        if self.slots > num_experts:
            raise ValueError(
                f"`slots` must be <= num_experts={num_experts}, got slots={self.slots}"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"`top_k` must be in [1, num_experts={num_experts}], got {top_k=}")

    def rules(self, base: Rules = DEFAULT_RULES) -> Rules:
        """``base`` with the ``expert`` axis of the expert weights over :attr:`axis_name` first
        (so it takes those mesh axes before ``embed`` can)."""
        return (("expert", self.axis_name), *base)

    @property
    def hot_experts(self) -> int:
        """Experts copied per layer and step, what re-sharding spreads over the owners: ``D c``
        (all_gather), ``m`` (all_reduce), 0 (no copies)."""
        path = self.materialize_path
        if path == "all_gather":
            return self.num_devices * self.send_per_device
        return self.slots if path == "all_reduce" else 0

    def init_layer_state(self, num_experts: int) -> MoeLayerState:
        """Identity owner order and an empty load window."""
        return MoeLayerState(
            jnp.arange(num_experts, dtype=jnp.int32),
            jnp.zeros((self.load_window, num_experts), jnp.float32),
        )

    def next_layer_state(self, state: MoeLayerState, stats: MoeLayerStats) -> MoeLayerState:
        """The window slid by one step: this step's counts in, the oldest out."""
        loads = jnp.concatenate([state.loads[1:], stats.counts[None].astype(state.loads.dtype)])
        return MoeLayerState(state.order, loads)

    def placement(self, state: MoeLayerState, counts: jax.Array) -> Placement:
        """This step's placement (owner-only for ep and fsdp)."""
        path = self.materialize_path
        if path == "none":
            return owner_placement(state.order, self.num_devices)
        window = jnp.sum(state.loads, axis=0)
        if self.current_routing:
            loads = (window + counts) / (self.load_window + 1)
        else:
            loads = window / self.load_window
        if path == "all_reduce":
            return plan_replication(loads, state.order, self.num_devices, self.slots)
        return plan_placement(
            loads, state.order, self.num_devices, self.slots, self.send_per_device
        )

    def layer(
        self,
        x: jax.Array,
        routing: Routing,
        wi: jax.Array,
        wo: jax.Array,
        state: MoeLayerState,
        dtype: jnp.dtype = jnp.float32,
    ) -> tuple[jax.Array, MoeLayerStats]:
        """The experts' combined output ``[..., d]`` for tokens ``x [B, ..., d]`` and the stats.

        ``x``'s leading (batch) axis is split over :attr:`axis_name`; ``wi``/``wo`` are in the
        owner order ``state.order``. Run inside ``jit``; the collectives are a ``shard_map``.
        """
        num_experts, top_k = wi.shape[0], routing.experts.shape[-1]
        self.check(num_experts, top_k)
        split, whole = PartitionSpec(self.axis_name), PartitionSpec()
        body = functools.partial(self._device, dtype=dtype, num_experts=num_experts)
        run = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(split, split, split, split, split, whole, whole),
            out_specs=(split, MoeLayerStats(whole, split, split, whole)),
        )
        return run(x, routing.experts, routing.gates, wi, wo, state.order, state.loads)

    def _device(self, x, experts, gates, wi, wo, order, loads, *, dtype, num_experts):
        axes = self.axis_name
        shape, d = x.shape, x.shape[-1]
        top_k = experts.shape[-1]
        x = x.reshape(-1, d)
        experts, gates = experts.reshape(-1, top_k), gates.reshape(-1, top_k)
        counts = jax.lax.psum(expert_counts(experts, num_experts), axes)
        state = MoeLayerState(order, loads)
        place = self.placement(state, counts)
        send, recv = place.send[jax.lax.axis_index(axes)], place.recv[jax.lax.axis_index(axes)]
        row_of = jnp.argsort(order).astype(jnp.int32)
        if self.kind == "fsdp":

            def ffn(rows, slots, wi, wo):
                gather = lambda w: jax.lax.all_gather(w, axes, axis=0, tiled=True)
                return grouped_ffn(rows, slots, gather(wi), gather(wo), dtype, name=_HIDDEN)

            ffn = self._maybe_remat(ffn)
            n = x.shape[0]
            rows = jnp.take(x, jnp.arange(n * top_k) // top_k, axis=0)
            y = ffn(rows, row_of[experts].reshape(-1), wi, wo).reshape(n, top_k, d)
            out = jnp.sum(y * gates[..., None].astype(y.dtype), axis=1)
            computed = jnp.full((1,), n * top_k, jnp.int32)
            sent = jnp.zeros((1,), jnp.int32)
        else:
            mode = self.materialize_path

            def ffn(rows, slots, wi, wo):
                if mode == "all_gather":
                    wi = jnp.concatenate([wi, sparse_all_gather(wi, send, recv, axes)])
                    wo = jnp.concatenate([wo, sparse_all_gather(wo, send, recv, axes)])
                elif mode == "all_reduce":
                    wi = jnp.concatenate([wi, replicate_rows(wi, send, axes)])
                    wo = jnp.concatenate([wo, replicate_rows(wo, send, axes)])
                return grouped_ffn(rows, slots, wi, wo, dtype, name=_HIDDEN)

            ffn = self._maybe_remat(ffn)
            num_slots = num_experts // self.num_devices + self.slots
            dest, where = choose_devices(place, experts, jax.lax.axis_index(axes))
            local = lambda rows, slots: ffn(rows, slots, wi, wo)
            path = self.dispatch_path
            if path == "padded":
                rows_per_dest = self.dispatch_capacity(x.shape[0], top_k, num_experts)
                out, computed, sent = dispatch_combine(
                    x, dest, where, gates, local,
                    capacity=rows_per_dest, num_slots=num_slots, axis_name=axes,
                )  # fmt: skip
            else:
                exchange = (
                    emulated_ragged_all_to_all
                    if path == "ragged-emulated"
                    else jax.lax.ragged_all_to_all
                )
                out, computed, sent = ragged_dispatch_combine(
                    x, dest, where, gates, local,
                    num_slots=num_slots, axis_name=axes, exchange=exchange,
                )  # fmt: skip
        per_device = num_experts // self.num_devices
        held = materialized_counts(place, per_device).astype(jnp.float32)
        rows, sent = computed.astype(jnp.float32), sent.astype(jnp.float32)
        return out.reshape(shape), MoeLayerStats(counts, rows, sent, held)

    def _maybe_remat(self, ffn):
        if not self.remat:
            return ffn
        return jax.checkpoint(ffn, policy=jax.checkpoint_policies.save_only_these_names(_HIDDEN))

    def dispatch_capacity(self, tokens_per_device: int, top_k: int, num_experts: int) -> int:
        """``C``, the rows per destination of the padded ``all_to_all`` (0 for fsdp and the
        ragged paths, whose bytes are the routed rows: see the layer's stats)."""
        if self.dispatch_path != "padded":
            return 0
        num_slots = num_experts // self.num_devices + self.slots
        return dispatch_capacity(
            tokens_per_device, top_k, self.num_devices, num_slots, self.capacity_factor
        )


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {name}={value!r}")
