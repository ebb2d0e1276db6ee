"""Device meshes for any device count and axis layout.

One function, :func:`make_mesh`, builds a :class:`jax.sharding.Mesh` from an ordered mapping of axis
names to sizes, for 1 device, 8 simulated CPU devices, a ``2 x 4`` layout, or all the devices of a
multi-process run (``jax.distributed.initialize``). Axis names are the caller's choice: algorithms
never assume them, they receive them through the rules table (:mod:`parallel.rules`) or an explicit
``axis_name`` argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh


def make_mesh(
    axes: Mapping[str, int] | Sequence[tuple[str, int]],
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh with ``Auto`` axes over ``devices`` (default: all global devices).

    Args:
      axes: ordered ``{axis_name: size}``; at most one size may be ``-1``, meaning "all the devices
        that are left". For example ``{"data": 2, "fsdp": -1}`` on 8 devices is a ``2 x 4`` mesh.
      devices: the devices to lay out, in order; default ``jax.devices()`` (every process's devices
        in a multi-process run, arranged by ``jax.make_mesh`` so that neighbouring mesh positions
        share a host where possible).

    Returns:
      A :class:`jax.sharding.Mesh` whose axes are all :attr:`AxisType.Auto`, so that ``jit`` may
      propagate shardings and ``shard_map`` accepts ``NamedSharding`` inputs.

    Raises:
      ValueError: an axis size below 1 (other than a single ``-1``), duplicate or empty names, or
        sizes whose product differs from the number of devices.

    Example:
      >>> mesh = make_mesh({"data": 1, "fsdp": -1}, devices=jax.devices()[:1])
      >>> dict(mesh.shape)
      {'data': 1, 'fsdp': 1}
    """
    items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
    if not items:
        raise ValueError(f"`axes` must name at least one mesh axis, got {axes=}")
    names = [name for name, _ in items]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"`axes` needs distinct non-empty string names, got {names=}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(size) for _, size in items]
    free = [i for i, size in enumerate(sizes) if size == -1]
    bad = [(n, s) for n, s in zip(names, sizes, strict=True) if s < 1 and s != -1]
    if bad or len(free) > 1:
        raise ValueError(f"mesh axis sizes must be >= 1 (one may be -1), got {dict(items)}")
    if free:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(
                f"cannot fill axis {names[free[0]]!r}: {len(devices)} devices are not divisible "
                f"by the other axes' product {known} ({dict(items)})"
            )
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are given"
        )
    return jax.make_mesh(
        tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices
    )
