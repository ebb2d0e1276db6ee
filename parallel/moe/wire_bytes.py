"""Wire bytes of the MoE strategies, per device per step and MoE layer, as formulas.

The tests check every formula against the collectives of the compiled program
(:mod:`jaxlib_ext.costs`); the demo and ``benchmarks/moe.py`` report them next to the useful bytes
the routing needed.
"""

from __future__ import annotations

from parallel.moe.sparse_collectives import replicated_wire_bytes
from parallel.moe.strategy import MoeStrategy


def expert_wire_bytes(
    strategy: MoeStrategy, num_experts: int, expert_bytes: int
) -> dict[str, float]:
    """Expert-weight bytes one device sends per step and MoE layer, by collective kind.

    fsdp: an all-gather of all ``E`` experts (again in the backward with remat) and a
    reduce-scatter of their gradients; fssdp: a sparse all-gather and a sparse reduce-scatter
    of ``c`` experts per device (all_gather), or an all-reduce of the ``m`` copied experts
    forward and one of their gradients (all_reduce); ep: nothing
    (:mod:`parallel.moe.sparse_collectives`).
    """
    d = strategy.num_devices
    gathers = 2 if strategy.remat else 1
    path = strategy.materialize_path
    if path == "all_reduce":
        moved = replicated_wire_bytes(d, strategy.slots, expert_bytes)
        return {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": (gathers + 1) * moved}
    if strategy.kind == "fsdp":
        moved = num_experts * expert_bytes * (d - 1) / d
    elif path == "all_gather":
        moved = (d - 1) * strategy.send_per_device * expert_bytes
    else:
        moved = 0.0
    return {"all-gather": gathers * moved, "reduce-scatter": moved, "all-reduce": 0.0}


def token_wire_bytes(
    strategy: MoeStrategy, tokens_per_device: int, top_k: int, num_experts: int, row_bytes: int
) -> dict[str, float]:
    """Padded ``all_to_all`` bytes one device sends per step and MoE layer (forward and
    backward): four exchanges of ``D * C`` activation rows and one of ``D * C`` int32 slot ids
    (0 for fsdp; the ragged paths move only the routed rows, reported in the layer's stats)."""
    c = strategy.dispatch_capacity(tokens_per_device, top_k, num_experts)
    d = strategy.num_devices
    per_exchange = (d - 1) * c  # rows leaving this device
    return {"all-to-all": per_exchange * (4 * row_bytes + 4)}
