"""Sparse all-gather and sparse reduce-scatter: static-shape collectives over owner-held chunks.

A tensor ``[N, ...]`` is split into chunks (rows; for MoE one expert each), ``N / D`` owned by
each of the ``D`` devices of ``axis_name``. A *sparse* all-gather (Hecate's SparseAllGather)
gives each device copies of a few chunks it does not own; the *sparse* reduce-scatter
(SparseReduceScatter) sums the gradients of those copies back onto the owners. In JAX the
collectives need static shapes, so the exchange is index-driven with two static budgets:

* every device broadcasts ``c`` of its own chunks (``send [c]``: local row indices), which one
  ``all_gather`` delivers to every device as a buffer ``[D * c, ...]`` (chunk ``j`` of device
  ``i`` at ``i * c + j``);
* every device fills ``m`` slots from that buffer (``recv [m]``: buffer indices).

Which chunks travel changes every call without recompiling. The reduce-scatter is the exact
transpose: scatter-add the ``m`` slot gradients into the ``[D * c]`` buffer, ``psum_scatter`` it
(each device receives the sums for its own ``c`` broadcast chunks), scatter-add them onto the
owned rows. :func:`sparse_all_gather` is differentiable and ``jax.grad`` produces exactly
:func:`sparse_reduce_scatter` (tests check both ways).

Wire bytes per device per call, with ``s`` the bytes of one chunk (:func:`sparse_wire_bytes`):
``(D - 1) * c * s`` for each of the two, whatever ``N`` is. When every device uses every
broadcast chunk (``m = D * c``, Hecate's "replicate the top experts everywhere") nothing moved is
wasted; otherwise ``D * c - m`` chunks a device receives are not kept.

Both functions run inside ``jax.shard_map`` over ``axis_name`` (a mesh axis name or a tuple).

When fewer chunks must travel than there are devices (``m < D``: the ``m`` hottest experts copied
everywhere), :func:`replicate_rows` does it with one all-reduce of an ``[m, ...]`` buffer that only
the owners fill: ``2 (D - 1) / D * m * s`` bytes per device, about twice the ``m s`` it delivers,
instead of the ``(D - 1) s`` of a broadcast of one chunk per device. Its gradient is again an
all-reduce, each owner keeping the sums of its rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sparse_all_gather(
    local: jax.Array, send: jax.Array, recv: jax.Array, axis_name: str | tuple[str, ...]
) -> jax.Array:
    """Copies of other devices' chunks: ``[El, ...]`` owned rows -> ``[m, ...]`` slots.

    Args:
      local: ``[El, ...]`` the chunks this device owns.
      send: ``[c]`` int32 rows of ``local`` this device broadcasts.
      recv: ``[m]`` int32 indices into the gathered ``[D * c, ...]`` buffer, one per slot.
      axis_name: the mesh axis (or axes) of the ``D`` owners.

    Returns:
      ``[m, ...]``: slot ``j`` holds chunk ``send_i[r]`` of device ``i`` where
      ``recv[j] = i * c + r``.

    Example (8 devices; each keeps device ``i + 1``'s row 0):
      >>> import numpy as np
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
      >>> def body(local, send, recv):
      ...     return sparse_all_gather(local, send[0], recv[0], "x")
      >>> chunks = jnp.arange(16.0).reshape(16, 1)  # 2 rows per device
      >>> send = jnp.zeros((8, 1), jnp.int32)
      >>> recv = (jnp.arange(8, dtype=jnp.int32)[:, None] + 1) % 8
      >>> f = jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
      >>> put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, P("x")))
      >>> f(put(chunks), put(send), put(recv))[:, 0].tolist()
      [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 0.0]
    """
    outgoing = jnp.take(local, send, axis=0)
    gathered = jax.lax.all_gather(outgoing, axis_name, axis=0, tiled=True)
    return jnp.take(gathered, recv, axis=0)


def sparse_reduce_scatter(
    copies: jax.Array,
    send: jax.Array,
    recv: jax.Array,
    axis_name: str | tuple[str, ...],
    num_local: int,
) -> jax.Array:
    """Sums slot copies back onto their owners: ``[m, ...]`` -> ``[num_local, ...]``.

    The transpose of :func:`sparse_all_gather` with the same ``send``/``recv``: owned row ``r``
    receives the sum of every slot (on every device) that holds a copy of it. Rows nobody holds
    get zeros.

    Args:
      copies: ``[m, ...]`` one value per slot (e.g. the gradient of each materialized copy).
      send, recv, axis_name: as given to :func:`sparse_all_gather`.
      num_local: ``El``, the rows this device owns.
    """
    num_devices = jax.lax.axis_size(axis_name)
    width = num_devices * send.shape[0]
    buffer = jnp.zeros((width, *copies.shape[1:]), copies.dtype).at[recv].add(copies)
    mine = jax.lax.psum_scatter(buffer, axis_name, scatter_dimension=0, tiled=True)
    return jnp.zeros((num_local, *copies.shape[1:]), copies.dtype).at[send].add(mine)


def replicate_rows(
    local: jax.Array, rows: jax.Array, axis_name: str | tuple[str, ...]
) -> jax.Array:
    """Copies of the global rows ``rows [m]`` (``row // El`` owns row ``row``) on every device:
    ``[El, ...]`` owned chunks -> ``[m, ...]``, by one ``psum`` of a buffer each owner fills with
    its rows (zeros elsewhere). Differentiable: the gradient sums every device's cotangents
    (another all-reduce) and each owner keeps its rows'."""
    per_device = local.shape[0]
    mine = rows // per_device == jax.lax.axis_index(axis_name)
    picked = jnp.take(local, rows % per_device, axis=0)
    mask = mine.reshape(-1, *[1] * (local.ndim - 1))
    return jax.lax.psum(jnp.where(mask, picked, jnp.zeros_like(picked)), axis_name)


def replicated_wire_bytes(num_devices: int, rows: int, chunk_bytes: int) -> float:
    """Bytes one device sends in one :func:`replicate_rows` (a ring all-reduce of ``rows``
    chunks): ``2 (D - 1) / D * rows * chunk_bytes``.

    Example:
      >>> replicated_wire_bytes(8, 2, 1024)
      3584.0
    """
    return 2 * (num_devices - 1) / num_devices * rows * chunk_bytes


def sparse_wire_bytes(num_devices: int, send_per_device: int, chunk_bytes: int) -> int:
    """Bytes one device sends (= receives) in one :func:`sparse_all_gather` or one
    :func:`sparse_reduce_scatter`: ``(D - 1) * c * chunk_bytes``.

    Example:
      >>> sparse_wire_bytes(8, 1, 1024)
      7168
    """
    return (num_devices - 1) * send_per_device * chunk_bytes
