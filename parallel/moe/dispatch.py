"""Token dispatch and combine with ``all_to_all``: each token copy to the device that computes it.

Inside ``jax.shard_map`` over the expert axis, each device has ``n`` tokens with ``k`` copies each
(one per routed expert), a destination device and a slot there (:func:`placement.choose_devices`).
Copies are packed into a static send buffer ``[D, C, d]`` (``C`` rows per destination), exchanged
with one ``all_to_all``, computed, and sent back with a second ``all_to_all``; the source then sums
each token's copies weighted by its gates. The slot of every row travels with it (int32).

``lax.ragged_all_to_all`` is not implemented on XLA:CPU (jax 0.10), so the buffer is capacity-padded
everywhere: ``C = n * min(k, slots on a device)`` never drops a copy; a capacity factor ``cf`` sets
``C = ceil(cf * n * k / D)`` and copies beyond it are dropped (they contribute zero, as in GShard
and Switch). The issued bytes are the buffer's; the useful bytes are the rows that really
travel to another device (:func:`dispatch_combine` returns them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def capacity(
    tokens: int, top_k: int, num_devices: int, slots: int, capacity_factor: float | None
) -> int:
    """Rows per destination in the send buffer (see the module docstring).

    Example:
      >>> capacity(64, 2, 8, slots=4, capacity_factor=None), capacity(64, 2, 8, 4, 1.25)
      (128, 20)
    """
    full = tokens * min(top_k, slots)
    if capacity_factor is None:
        return full
    return max(1, min(full, math.ceil(capacity_factor * tokens * top_k / num_devices)))


def dispatch_combine(
    x: jax.Array,
    dest: jax.Array,
    slot: jax.Array,
    gates: jax.Array,
    compute: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    capacity: int,
    num_slots: int,
    axis_name: str | tuple[str, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``sum_j gates[i, j] * expert_{j}(x[i])`` with the copies computed where ``dest`` says.

    Args:
      x: ``[n, d]`` this device's tokens.
      dest, slot: ``[n, k]`` int32 device and slot (on that device) of every copy.
      gates: ``[n, k]`` combine weights.
      compute: ``compute(rows [R, d], slots [R]) -> [R, d]``, the local expert computation;
        padding rows carry slot ``num_slots``.
      capacity: ``C``, rows per destination.
      num_slots: local slots per device (the padding tag).
      axis_name: the expert axis.

    Returns:
      ``(out [n, d], rows_computed [1], rows_sent_away [1])``: the combined outputs, the real
      rows this device computed, and the copies it sent to another device.
    """
    num_devices = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    n, k = dest.shape
    flat_dest, flat_slot = dest.reshape(-1), slot.reshape(-1)
    onehot = jax.nn.one_hot(flat_dest, num_devices, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    kept = position < capacity
    width = num_devices * capacity
    where = jnp.where(kept, flat_dest * capacity + position, width)
    rows = jnp.take(x, jnp.arange(n * k) // k, axis=0)
    send_rows = jnp.zeros((width, x.shape[1]), x.dtype).at[where].set(rows, mode="drop")
    send_slots = jnp.full((width,), num_slots, jnp.int32).at[where].set(flat_slot, mode="drop")
    exchange = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
    recv_slots = exchange(send_slots)
    out_rows = exchange(compute(exchange(send_rows), recv_slots))
    back = jnp.take(out_rows, jnp.minimum(where, width - 1), axis=0)
    back = jnp.where(kept[:, None], back, jnp.zeros_like(back))
    weighted = back * gates.reshape(-1, 1).astype(back.dtype)
    out = jnp.sum(weighted.reshape(n, k, -1), axis=1)
    computed = jnp.sum(recv_slots < num_slots, dtype=jnp.int32)
    sent_away = jnp.sum(kept & (flat_dest != me), dtype=jnp.int32)
    return out, computed[None], sent_away[None]
