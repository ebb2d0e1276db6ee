"""Sharding-in-types helpers for meshes with Explicit axes (``jax.make_mesh``'s default).

On such a mesh an array's sharding is part of its type: a gather or scatter across a sharded
dimension must say where its result lives, and two operands of an elementwise op must agree.
On Auto meshes (and without a mesh) every helper here is the identity and XLA decides, as
before. The optimizers call them only at the few places that gather, scatter or mix buffers
laid out differently (SPAM's sparse moments, FRUGAL's subspaces, the clip's histograms).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def is_explicit(x: Any) -> bool:
    """True when ``x``'s type carries a sharding over Explicit mesh axes."""
    sharding = jax.typeof(x).sharding
    explicit = jax.sharding.AxisType.Explicit
    return any(t == explicit for t in sharding.mesh.axis_types) and any(
        s is not None for s in sharding.spec
    )


def replicated_like(x: Any) -> NamedSharding | None:
    """The replicated sharding on ``x``'s (abstract) mesh when ``x`` is explicitly sharded,
    else None (an ``out_sharding`` of None lets XLA choose)."""
    if not is_explicit(x):
        return None
    return NamedSharding(jax.typeof(x).sharding.mesh, P())


def replicate(x: jax.Array) -> jax.Array:
    """``x`` replicated on its mesh if it is explicitly sharded (an all-gather), else ``x``."""
    target = replicated_like(x)
    return x if target is None else jax.sharding.reshard(x, target)


def shard_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` resharded to ``like``'s type sharding when either is explicitly sharded."""
    if not (is_explicit(like) or is_explicit(x)):
        return x
    target = jax.typeof(like).sharding
    if jax.typeof(x).sharding.spec == target.spec:
        return x
    return jax.sharding.reshard(x, target)
