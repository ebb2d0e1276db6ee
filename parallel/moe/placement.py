"""Where every expert lives for one step: owners, materialized copies and the token routes.

Hecate's Algorithm 1 (Qing et al., *Hecate: Unlocking Efficient Sparse Model Training via Fully
Sharded Sparse Data Parallelism*, https://arxiv.org/abs/2502.02581, 2025), with JAX's static
shapes. The expert axis ``[E, ...]`` is stored in *owner order*: row ``r`` holds canonical expert
``order[r]`` and belongs to device ``r // El`` (``El = E / D``). Each step, from per-expert loads:

1. every device broadcasts its ``c`` most loaded owned experts (the ``send`` table);
2. if ``m = D * c`` every device keeps all ``D * c`` broadcast experts in its ``m`` slots (the
   paper's "replicate the top-t experts on every device", ``t = D * c``); otherwise the ``D * m``
   slots are dealt to the broadcast experts in proportion to their load, consecutive copies of an
   expert on consecutive devices (the ``recv`` table);
3. a token's copy for expert ``e`` stays on its device when the device holds ``e`` (owned or
   materialized), else goes to one of ``e``'s holders, spread evenly by token index.

Everything is ``jnp`` on small integer tables, so the placement changes every step inside one
compiled program. With ``m = 0`` this is plain expert parallelism (:func:`owner_placement`).

When ``m < D`` a broadcast of one expert per device moves more than the ``m`` slots keep, so
:func:`plan_replication` gives the other form of the paper's "replicate the top-t experts on
every device" (t = m): the ``m`` most loaded experts, wherever they are owned, copied to every
device by one all-reduce (:func:`parallel.moe.sparse_collectives.replicate_rows`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_FAR = jnp.iinfo(jnp.int32).max


class Placement(NamedTuple):
    """One step's placement of one MoE layer (replicated on every device).

    Attributes:
      send: ``[D, c]`` int32 owned rows (local index) each device broadcasts.
      recv: ``[D, m]`` int32 index into the ``[D * c]`` broadcast buffer filling each slot.
      holds: ``[D, E]`` bool, device ``i`` holds canonical expert ``e`` (owned or materialized).
      slot: ``[D, E]`` int32 local slot of ``e`` on device ``i``: owned rows are ``0..El-1``,
        materialized slots ``El..El+m-1``; ``-1`` where not held. Owned copies win.
    """

    send: jax.Array
    recv: jax.Array
    holds: jax.Array
    slot: jax.Array


def _tables(order: jax.Array, num_devices: int, slot_expert: jax.Array | None):
    num_experts = order.shape[0]
    per_device = num_experts // num_devices
    row_of = jnp.argsort(order)
    device = jnp.arange(num_devices, dtype=jnp.int32)[:, None]
    owned = (row_of // per_device)[None, :] == device
    slot = jnp.where(owned, (row_of % per_device)[None, :], _FAR)
    if slot_expert is not None and slot_expert.shape[1]:
        local = per_device + jnp.arange(slot_expert.shape[1], dtype=jnp.int32)[None, :, None]
        match = slot_expert[:, :, None] == jnp.arange(num_experts, dtype=jnp.int32)
        slot = jnp.minimum(slot, jnp.min(jnp.where(match, local, _FAR), axis=1))
    holds = slot < _FAR
    return holds, jnp.where(holds, slot, -1).astype(jnp.int32)


def owner_placement(order: jax.Array, num_devices: int) -> Placement:
    """Expert parallelism: every expert only on its owner, no copies (``c = m = 0``)."""
    holds, slot = _tables(order, num_devices, None)
    empty = jnp.zeros((num_devices, 0), jnp.int32)
    return Placement(empty, empty, holds, slot)


def plan_placement(
    loads: jax.Array, order: jax.Array, num_devices: int, slots: int, send_per_device: int
) -> Placement:
    """Algorithm 1: copies of the most loaded experts, within ``slots`` per device.

    Args:
      loads: ``[E]`` per-expert load (e.g. a sliding-window mean of token counts), canonical.
      order: ``[E]`` int32 owner order (row ``r`` holds expert ``order[r]``).
      num_devices: ``D``.
      slots: ``m``, extra expert slots per device.
      send_per_device: ``c <= E / D``, experts each device broadcasts (``D * c >= m``).

    Returns:
      The :class:`Placement`.

    Example:
      >>> loads, order = jnp.array([9.0, 1, 1, 1]), jnp.arange(4)
      >>> p = plan_placement(loads, order, 2, slots=2, send_per_device=1)
      >>> p.send.tolist(), p.holds[:, 0].tolist()
      ([[0], [0]], [True, True])
    """
    num_experts = order.shape[0]
    per_device = num_experts // num_devices
    width = num_devices * send_per_device
    if slots == 0 or send_per_device == 0:
        return owner_placement(order, num_devices)
    loads = jax.lax.stop_gradient(loads).astype(jnp.float32)
    row_load = loads[order].reshape(num_devices, per_device)
    send = jax.lax.top_k(row_load, send_per_device)[1].astype(jnp.int32)
    first_row = jnp.arange(num_devices, dtype=jnp.int32)[:, None] * per_device
    sent_expert = order[(first_row + send).reshape(-1)]
    if width == slots:
        recv = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (num_devices, slots))
    else:
        weight = loads[sent_expert]
        total = jnp.sum(weight)
        share = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 1.0 / width)
        edges = jnp.cumsum(share) * (num_devices * slots)
        position = jnp.arange(num_devices * slots, dtype=jnp.float32) + 0.5
        chunk = jnp.searchsorted(edges, position, side="right").astype(jnp.int32)
        recv = jnp.minimum(chunk, width - 1).reshape(slots, num_devices).T
    holds, slot = _tables(order, num_devices, sent_expert[recv])
    return Placement(send, recv, holds, slot)


def plan_replication(loads: jax.Array, order: jax.Array, num_devices: int, slots: int) -> Placement:
    """The ``slots`` most loaded experts copied to every device (Algorithm 1 with t = m).

    Returns a :class:`Placement` whose ``send [D, m]`` holds, on every device, the global stored
    rows of those experts (what :func:`~parallel.moe.sparse_collectives.replicate_rows` reads)
    and ``recv [D, m]`` is ``0..m-1`` (slot ``j`` holds the ``j``-th of them).

    Example:
      >>> p = plan_replication(jnp.array([1.0, 9, 1, 5]), jnp.array([3, 2, 1, 0]), 2, slots=2)
      >>> p.send[0].tolist(), p.holds[:, 1].tolist()
      ([2, 0], [True, True])
    """
    if slots == 0:
        return owner_placement(order, num_devices)
    loads = jax.lax.stop_gradient(loads).astype(jnp.float32)
    hot = jax.lax.top_k(loads, slots)[1].astype(jnp.int32)
    rows = jnp.argsort(order).astype(jnp.int32)[hot]
    send = jnp.broadcast_to(rows, (num_devices, slots))
    recv = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (num_devices, slots))
    holds, slot = _tables(order, num_devices, jnp.broadcast_to(hot, (num_devices, slots)))
    return Placement(send, recv, holds, slot)


def choose_devices(
    placement: Placement, experts: jax.Array, device: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Where each of this device's token copies is computed: ``(dest, slot)``, both ``[n, k]``.

    Args:
      placement: the step's :class:`Placement`.
      experts: ``[n, k]`` canonical experts of this device's ``n`` tokens.
      device: this device's index along the expert axis (``lax.axis_index``).

    A copy stays on ``device`` when it holds the expert, else goes to holder number
    ``(device * n + token) mod holders`` of that expert (so remote tokens are spread evenly).
    """
    n = experts.shape[0]
    column = placement.holds.T[experts]  # [n, k, D]
    count = jnp.sum(column, axis=-1, dtype=jnp.int32)
    token = device * n + jnp.arange(n, dtype=jnp.int32)[:, None]
    rank = token % jnp.maximum(count, 1)
    remote = jnp.argmax(jnp.cumsum(column, axis=-1, dtype=jnp.int32) > rank[..., None], axis=-1)
    local = placement.holds[device][experts]
    dest = jnp.where(local, device, remote).astype(jnp.int32)
    return dest, placement.slot[dest, experts]


def materialized_counts(placement: Placement, per_device: int) -> jax.Array:
    """``[D]`` distinct experts each device holds but does not own (the copies it received)."""
    return jnp.sum(placement.holds, axis=1, dtype=jnp.int32) - per_device
