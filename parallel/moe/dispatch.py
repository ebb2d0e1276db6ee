"""Token dispatch and combine with ``all_to_all``: each token copy to the device that computes it.

Inside ``jax.shard_map`` over the expert axis, each device has ``n`` tokens with ``k`` copies each
(one per routed expert), a destination device and a slot there (:func:`placement.choose_devices`).
Copies are packed into a static send buffer ``[D, C, d]`` (``C`` rows per destination), exchanged
with one ``all_to_all``, computed, and sent back with a second ``all_to_all``; the source then sums
each token's copies weighted by its gates. The slot of every row travels with it (int32).

Two exchanges implement it:

* :func:`dispatch_combine`, capacity-padded ``all_to_all`` (every backend):
  ``C = n * min(k, slots on a device)`` never drops a copy; a capacity factor ``cf`` sets
  ``C = ceil(cf * n * k / D)`` and copies beyond it are dropped (they contribute zero, as in
  GShard and Switch). The issued bytes are the buffer's; the useful bytes are the rows that
  really travel to another device (returned as ``rows_sent_away``).
* :func:`ragged_dispatch_combine`, ``lax.ragged_all_to_all`` (GPU/TPU; XLA:CPU does not
  implement it in jax 0.10, :func:`ragged_all_to_all_supported` probes the backend): copies are
  sorted by destination and only the real rows travel; the receive buffer is sized for the worst
  case (``D n k`` rows), never dropping. :func:`emulated_ragged_all_to_all` is the same collective
  written with a padded ``all_to_all`` (its documented semantics), so the ragged path's offsets
  are tested on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


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
    out = _combine(back, gates, n, k)
    computed = jnp.sum(recv_slots < num_slots, dtype=jnp.int32)
    sent_away = jnp.sum(kept & (flat_dest != me), dtype=jnp.int32)
    return out, computed[None], sent_away[None]


def _combine(back, gates, n, k):
    weighted = back * gates.reshape(-1, 1).astype(back.dtype)
    return jnp.sum(weighted.reshape(n, k, -1), axis=1)


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """``lax.ragged_all_to_all`` (one slice per device) written with a padded ``all_to_all``:
    the same result on every backend, for testing the ragged path where the primitive is not
    implemented. Each slice is padded to ``operand.shape[0]`` rows on the wire."""
    num_devices = jax.lax.axis_size(axis_name)
    length = operand.shape[0]
    lane = jnp.arange(length, dtype=jnp.int32)
    padded = jnp.concatenate([operand, jnp.zeros_like(operand)])
    take = lambda start: jax.lax.dynamic_slice_in_dim(padded, start, length)
    slices = jax.vmap(take)(input_offsets)  # [D, length, ...]
    live = (lane[None, :] < send_sizes[:, None]).reshape(
        num_devices, length, *[1] * (operand.ndim - 1)
    )
    slices = jnp.where(live, slices, jnp.zeros_like(slices))
    received = jax.lax.all_to_all(slices, axis_name, 0, 0, tiled=True)
    starts = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    rows = output.shape[0]
    where = jnp.where(lane[None, :] < recv_sizes[:, None], starts[:, None] + lane[None, :], rows)
    flat = received.reshape(num_devices * length, *operand.shape[1:])
    return output.at[where.reshape(-1)].set(flat, mode="drop")


def ragged_dispatch_combine(
    x: jax.Array,
    dest: jax.Array,
    slot: jax.Array,
    gates: jax.Array,
    compute: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    num_slots: int,
    axis_name: str | tuple[str, ...],
    exchange: Callable = jax.lax.ragged_all_to_all,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`dispatch_combine` with ragged exchanges: only the real rows travel, none dropped.

    Args and returns as :func:`dispatch_combine` (no capacity); ``exchange`` is
    ``lax.ragged_all_to_all`` or :func:`emulated_ragged_all_to_all`.
    """
    num_devices = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    n, k = dest.shape
    flat_dest = dest.reshape(-1)
    order = jnp.argsort(flat_dest, stable=True)  # copies grouped by destination
    rows = jnp.take(x, order // k, axis=0)
    slots = jnp.take(slot.reshape(-1), order)
    send_sizes = jnp.sum(jax.nn.one_hot(flat_dest, num_devices, dtype=jnp.int32), axis=0)
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis=0, tiled=False)
    sizes = gather(send_sizes)  # [source, destination]
    before_me = (jnp.arange(num_devices) < me)[:, None]
    output_offsets = jnp.sum(jnp.where(before_me, sizes, 0), axis=0)  # where my rows land
    recv_sizes = jnp.take(sizes, me, axis=1)
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    capacity = num_devices * n * k
    go = functools.partial(exchange, axis_name=axis_name)
    recv_rows = go(rows, jnp.zeros((capacity, x.shape[1]), x.dtype),
                   input_offsets, send_sizes, output_offsets, recv_sizes)  # fmt: skip
    recv_slots = go(slots, jnp.full((capacity,), num_slots, jnp.int32),
                    input_offsets, send_sizes, output_offsets, recv_sizes)  # fmt: skip
    out_rows = compute(recv_rows, recv_slots)
    home = jnp.take(gather(input_offsets), me, axis=1)  # where each source's rows started
    back = go(out_rows, jnp.zeros((n * k, out_rows.shape[1]), out_rows.dtype),
              recv_offsets, recv_sizes, home, send_sizes)  # fmt: skip
    back = jnp.take(back, jnp.argsort(order), axis=0)
    computed = jnp.sum(recv_sizes, dtype=jnp.int32)
    sent_away = jnp.sum(send_sizes, dtype=jnp.int32) - jnp.take(send_sizes, me)
    return _combine(back, gates, n, k), computed[None], sent_away[None]


@functools.cache
def ragged_all_to_all_supported(platform: str) -> bool:
    """Whether the backend compiles ``lax.ragged_all_to_all`` (probed once per platform on a
    one-device mesh; XLA:CPU answers UNIMPLEMENTED)."""
    device = jax.devices(platform)[0]
    mesh = jax.sharding.Mesh([device], ("probe",))

    def body(a):
        z = jnp.zeros((1,), jnp.int32)
        return jax.lax.ragged_all_to_all(
            a, jnp.zeros_like(a), z, z + 1, z, z + 1, axis_name="probe"
        )

    spec = PartitionSpec("probe")
    probe = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
    try:
        probe.lower(jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    except Exception:
        return False
    return True
