"""Heterogeneous re-sharding of expert ownership (Hecate's Algorithm 2), as a permutation.

Every ``reshard_every`` steps the owner of each expert is chosen anew from the loads, so that the
hot experts (the ones :mod:`parallel.moe.placement` broadcasts) are spread over the owners and no
device owns only cold experts, i.e. no device becomes the all-to-all hot spot:

1. the ``hot`` most loaded experts are dealt to the devices in turn (device ``i mod D``), so each
   owner broadcasts at most ``ceil(hot / D)`` of them;
2. the others, most loaded first, each go to the least loaded device (sum of its owned cold
   experts' loads) that still has a free row.

The paper places the cold experts first and fills the remaining rows with the hot ones; here the
hot ones come first because the static broadcast budget (``c`` experts per owner) must be able
to send them all. Devices stand for the paper's nodes (one level). The result is a new owner
order; :func:`reorder_index` turns two orders into the row permutation that moves parameters and
optimizer state together (``new = take(old, index, axis=0)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def balanced_order(loads: jax.Array, num_devices: int, hot: int) -> jax.Array:
    """A new owner order ``[E]`` (row ``r`` holds expert ``order[r]``) from loads ``[E]``.

    Example:
      >>> balanced_order(jnp.array([8.0, 4, 2, 1]), 2, hot=2).tolist()
      [0, 2, 1, 3]
    """
    num_experts = loads.shape[0]
    per_device = num_experts // num_devices
    loads = jax.lax.stop_gradient(loads).astype(jnp.float32)
    ranked = jnp.argsort(-loads, stable=True)

    def place(i, carry):
        device_load, free, owner = carry
        expert = ranked[i]
        candidates = jnp.where(free > 0, device_load, jnp.inf)
        device = jnp.where(i < hot, i % num_devices, jnp.argmin(candidates)).astype(jnp.int32)
        cold_load = jnp.where(i < hot, 0.0, loads[expert])
        device_load = device_load.at[device].add(cold_load)
        return device_load, free.at[device].add(-1), owner.at[expert].set(device)

    init = (
        jnp.zeros((num_devices,), jnp.float32),
        jnp.full((num_devices,), per_device, jnp.int32),
        jnp.zeros((num_experts,), jnp.int32),
    )
    _, _, owner = jax.lax.fori_loop(0, num_experts, place, init)
    key = owner * num_experts + jnp.arange(num_experts, dtype=jnp.int32)
    return jnp.argsort(key).astype(jnp.int32)


def reorder_index(old_order: jax.Array, new_order: jax.Array) -> jax.Array:
    """Rows to take from an array stored in ``old_order`` to store it in ``new_order``.

    Example:
      >>> reorder_index(jnp.array([2, 0, 1]), jnp.array([0, 1, 2])).tolist()
      [1, 2, 0]
    """
    return jnp.argsort(old_order)[new_order].astype(jnp.int32)
