"""FRUGAL's block mode (the paper's pre-training choice): whole tensors are state-full in turn.

A block is one projectable tensor; a stacked ``[L, ...]`` tensor counts as L blocks. Blocks of
one shape form a *shape class*; each class has a pool of moment slots, as many as the most
blocks of that class ever active at once, so inactive blocks cost no memory. The subspace in
the state is, per class, the class-local indices of the active blocks (the class size marks an
empty slot).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optim.explicit_sharding import shard_like
from optim.frugal.rules import adam_step, free_direction

BLOCK_ORDERS = ("descending", "ascending", "random", "mirror")


class BlockPlan(NamedTuple):
    """Static layout of block mode: shape classes, their members and slot tables."""

    classes: tuple  # per class: (block shape, ((leaf index, stacked), ...), class size)
    slots: tuple[int, ...]  # slots per class
    tables: tuple  # per class: np.ndarray [period, slots] of class-local indices (deterministic)
    order_global: tuple  # global block order: ((class, local index), ...)


def natural_key(path: str) -> tuple:
    """A sort key reading the numbers in a path as numbers: ``layers_2`` before ``layers_10``."""
    parts = re.split(r"(\d+)", path)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _schedule(order: str, total: int, n_act: int) -> list[list[int]]:
    """Global block positions active at each refresh of one period of the cyclic order."""
    if order == "mirror":
        # pairs (j, total-1-j) from the two ends inwards; each refresh takes the next n_act/2
        # pairs, cyclically (with an odd total the middle block is a pair of one)
        pairs, h = math.ceil(total / 2), n_act // 2
        period = pairs // math.gcd(pairs, h) if h else 1
        fronts = [[(r * h + i) % pairs for i in range(h)] for r in range(period)]
        return [sorted({j for f in front for j in (f, total - 1 - f)}) for front in fronts]
    period = total // math.gcd(total, n_act) if n_act else 1
    if order == "ascending":
        return [[(r * n_act + i) % total for i in range(n_act)] for r in range(period)]
    # descending: from the last block down, cyclically
    return [[(total - 1 - r * n_act - i) % total for i in range(n_act)] for r in range(period)]


def block_plan(
    leaves: list, flags: list[bool], names: list[str], density: float, order: str
) -> BlockPlan:
    """The static block layout of projectable ``leaves`` (``names``: their paths).

    The global order is: unstacked blocks by path (numbers compared as numbers, so
    ``layers_10`` comes after ``layers_9``), then the stacked blocks layer by layer.

    Raises:
      ValueError: stacked leaves of different depths; ``mirror`` with an odd number of active
        blocks.
    """
    shapes, members, sizes, blocks_of_leaf = [], [], [], {}
    ranked = sorted((i for i, f in enumerate(flags) if f), key=lambda i: natural_key(names[i]))
    for i in ranked:
        leaf = leaves[i]
        stacked = leaf.ndim == 3
        shape = tuple(leaf.shape[1:]) if stacked else tuple(leaf.shape)
        if shape not in shapes:
            shapes.append(shape)
            members.append([])
            sizes.append(0)
        c = shapes.index(shape)
        count = leaf.shape[0] if stacked else 1
        blocks_of_leaf[i] = [(c, sizes[c] + j) for j in range(count)]
        members[c].append((i, stacked))
        sizes[c] += count
    unstacked = [b for i in ranked if leaves[i].ndim != 3 for b in blocks_of_leaf[i]]
    stacked_ids = [i for i in ranked if leaves[i].ndim == 3]
    depths = {leaves[i].shape[0] for i in stacked_ids}
    if len(depths) > 1:
        raise ValueError(f"stacked projectable leaves must share their layer count, got {depths}")
    layer_major = [
        blocks_of_leaf[i][layer] for layer in range(max(depths, default=0)) for i in stacked_ids
    ]
    order_global = tuple(unstacked + layer_major)
    total = len(order_global)
    n_act = round(total * density)
    if order == "mirror" and n_act % 2:
        raise ValueError(
            f"`block_order='mirror'` needs an even number of active blocks, got "
            f"round({total} blocks x density {density}) = {n_act}"
        )
    classes = tuple(zip(shapes, map(tuple, members), sizes, strict=True))
    if order == "random":
        return BlockPlan(classes, tuple(round(size * density) for size in sizes), (), order_global)
    active_sets = [[order_global[j] for j in chosen] for chosen in _schedule(order, total, n_act)]
    slots = tuple(
        max(sum(1 for cc, _ in act if cc == c) for act in active_sets) for c in range(len(shapes))
    )
    tables = []
    for c in range(len(shapes)):
        table = np.full((len(active_sets), slots[c]), sizes[c], np.int32)
        for r, act in enumerate(active_sets):
            local = sorted(j for cc, j in act if cc == c)
            table[r, : len(local)] = local
        tables.append(table)
    return BlockPlan(classes, slots, tuple(tables), order_global)


def new_blocks(key: jax.Array, plan: BlockPlan, refresh_index: jax.Array, order: str) -> tuple:
    """Per class, the class-local indices of the active blocks at refresh ``refresh_index``."""
    out = []
    keys = jax.random.split(key, max(len(plan.classes), 1))
    for c, (_, _, size) in enumerate(plan.classes):
        if order == "random":
            chosen = jax.random.choice(keys[c], size, (plan.slots[c],), replace=False)
            out.append(jnp.sort(chosen).astype(jnp.int32))
        else:
            table = jnp.asarray(plan.tables[c])
            out.append(table[refresh_index % table.shape[0]])
    return tuple(out)


def carry_moments(pool: jax.Array, old: jax.Array, new: jax.Array, size: int) -> jax.Array:
    """The pool re-laid for the slots ``new``: a block active before and after keeps its
    moments (moved to its new slot), a newly active block starts from zero."""
    same = (new[:, None] == old[None, :]) & (new < size)[:, None]
    source = jnp.argmax(same, axis=1)
    kept = jnp.any(same, axis=1).reshape((-1,) + (1,) * (pool.ndim - 1))
    return jnp.where(kept, pool[source], jnp.zeros_like(pool))


def class_update(
    leaves: list,
    members: tuple,
    size: int,
    active: jax.Array,
    pools: tuple[jax.Array, jax.Array],
    *,
    inner_count: jax.Array,
    free_rule: str,
    free_scale: jax.Array,
    proj_scale: jax.Array,
    adam: tuple[Any, Any, Any],
    compute: Any,
) -> tuple[dict, jax.Array, jax.Array]:
    """The directions of one shape class's member leaves and its new pools.

    Per member leaf, no class-wide copy: Adam on every block with the moments of its slot
    (discarded for inactive blocks), the free rule, a select, and the active blocks' moments
    written back to their slots. Returns ``({leaf index: direction}, mu pool, nu pool)``.
    """
    slots = active.shape[0]
    # slot_of[j]: the pool slot of the class's block j, -1 when j is inactive
    slot_of = (
        jnp.full((size,), -1, jnp.int32)
        .at[active]
        .set(jnp.arange(slots, dtype=jnp.int32), mode="drop")
    )
    pool_m, pool_v = pools
    out, offset = {}, 0
    for i, stacked in members:
        leaf = leaves[i]
        depth = leaf.shape[0] if stacked else 1
        g = leaf.astype(compute)
        g = g if stacked else g[None]
        if slots == 0:  # this class never has an active block
            d = proj_scale * free_scale * free_direction(free_rule, g)
        else:
            slot = slot_of[offset : offset + depth]
            is_active = (slot >= 0).reshape((-1,) + (1,) * (g.ndim - 1))
            safe = jnp.maximum(slot, 0)
            m, v = shard_like(pool_m[safe], g), shard_like(pool_v[safe], g)
            u, m, v = adam_step(g, m, v, inner_count, *adam)
            free = free_scale * free_direction(free_rule, g)
            d = jnp.where(is_active, u.astype(compute), free) * proj_scale
            write = jnp.where(slot >= 0, slot, slots)  # inactive: out of range, dropped
            pool_m = pool_m.at[write].set(shard_like(m, pool_m), mode="drop")
            pool_v = pool_v.at[write].set(shard_like(v, pool_v), mode="drop")
        out[i] = (d if stacked else d[0]).astype(leaf.dtype)
        offset += depth
    return out, pool_m, pool_v
