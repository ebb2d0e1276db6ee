"""FRUGAL: full-rank updates with gradient splitting into state-full and state-free subspaces.

Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
Training", https://arxiv.org/abs/2411.07837 (ICML 2025).

Every projectable gradient is split in two: a low-dimensional part updated by Adam (the only part
with optimizer state) and the rest updated by a state-free rule (signSGD, SGD or nothing). All
directions move every step; state exists for a fraction ``density`` of them. Every
``update_gap`` steps the state-full subspace is chosen anew (and, by default, its state reset).

Static shapes throughout: the subspace is a set of indices, a projector or a table of active
blocks of fixed size, so one compilation serves every step and the refresh is a ``lax.cond``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim.hyperparams import check_learning_rate, check_range, static_int, static_number
from optim.moments import bias_correction, ema

PROJECTIONS = ("block", "columns", "rows", "randk", "svd", "random", "randperm")
BLOCK_ORDERS = ("descending", "ascending", "random", "mirror")
FREE_RULES = ("sign_sgd", "sgd", "none")
_REGULAR_NAMES = ("embed", "embedding", "position", "head", "lm_head", "wte", "wpe", "unembed")


class FrugalState(NamedTuple):
    """State of :func:`scale_by_frugal`.

    Attributes:
      count: updates so far (int32).
      inner_count: updates since the last refresh that reset the state (Adam's bias correction
        count for the state-full part).
      key: PRNG key of the random subspace choices.
      regular_mu, regular_nu: Adam moments of the regular (non-projectable) params, params-shaped
        (``optax.MaskedNode()`` at projectable leaves).
      active_mu, active_nu: Adam moments of the state-full subspace: per projectable leaf in the
        matrix modes (shape of the projected gradient), per shape class of blocks in block mode
        (``[slots, *block_shape]``).
      subspace: per projectable leaf its kept indices (``columns``, ``rows``, ``randk``,
        ``randperm``) or projector (``svd``, ``random``); in block mode per shape class the
        class-local indices of the active blocks (the class size where a slot is empty).
    """

    count: jax.Array
    inner_count: jax.Array
    key: jax.Array
    regular_mu: Any
    regular_nu: Any
    active_mu: Any
    active_nu: Any
    subspace: Any


def frugal_projections() -> tuple[str, ...]:
    """The ``projection`` names :func:`frugal` accepts."""
    return PROJECTIONS


def default_projectable(params: Any) -> Any:
    """The default ``projectable`` mask: matrices (2-D, or 3-D stacks of matrices) except
    embeddings, position tables and output heads (matched by path name), which stay regular."""

    def keep(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        return leaf.ndim in (2, 3) and not any(n in _REGULAR_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def _free(rule: str, residual: jax.Array) -> jax.Array:
    if rule == "sign_sgd":
        return jnp.sign(residual)
    if rule == "sgd":
        return residual
    return jnp.zeros_like(residual)


def _adam_direction(d, m, v, b1, b2, eps, count):
    m = ema(m, d, b1)
    v = ema(v, d, b2, order=2)
    m_hat = m.astype(jnp.float32) / bias_correction(b1, count)
    v_hat = v.astype(jnp.float32) / bias_correction(b2, count)
    return m_hat / (jnp.sqrt(v_hat) + jnp.asarray(eps).astype(jnp.float32)), m, v


# ------------------------------------------------------------------ matrix modes (per leaf)


class _Matrix(NamedTuple):
    """How one projectable leaf is viewed: ``stack`` matrices of ``rows x cols``."""

    stack: int
    rows: int
    cols: int
    stacked: bool


def _as_matrix(leaf) -> _Matrix:
    if leaf.ndim == 2:
        return _Matrix(1, leaf.shape[0], leaf.shape[1], False)
    return _Matrix(leaf.shape[0], leaf.shape[1], leaf.shape[2], True)


def _subspace_size(mode: str, mat: _Matrix, density: float) -> tuple[int, str]:
    """(kept size, side): side 'rows' selects/projects the row axis, 'cols' the column axis."""
    m, n = mat.rows, mat.cols
    if mode == "columns":  # the original's (out, in) columns are a Flax kernel's rows
        return int(m * density), "rows"
    if mode == "rows":
        return int(n * density), "cols"
    if mode == "randk":
        return int(m * n * density), "flat"
    if m >= n:  # svd, random, randperm: GaLore's side rule
        return round(n * density), "cols"
    return round(m * density), "rows"


def _mix(x: jax.Array, key: jax.Array) -> jax.Array:
    """A keyed 32-bit integer hash (murmur3's finalizer on ``x ^ key``)."""
    x = x ^ key
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keyed_indices(round_keys: jax.Array, size: int, count: int) -> jax.Array:
    """``count`` distinct indices in ``[0, size)`` from 4 uint32 round keys, storing nothing else.

    A 4-round Feistel network on the smallest even number of bits covering ``size`` is a
    bijection; cycle-walking (re-applying it while the value is ``>= size``) restricts it to
    ``[0, size)``; the images of ``0 .. count-1`` are therefore distinct. This is how ``randk``
    keeps its random entries without an int32 index per entry (which would cost 50% more state
    than the two moments' savings allow).
    """
    half = max(1, math.ceil(math.ceil(math.log2(max(size, 2))) / 2))
    mask = jnp.uint32((1 << half) - 1)

    def permute(v):
        left, right = v >> half, v & mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, round_keys[r]) & mask)
        return (left << half) | right

    def walk(v):
        return jax.lax.while_loop(
            lambda x: jnp.any(x >= size), lambda x: jnp.where(x >= size, permute(x), x), permute(v)
        )

    return walk(jnp.arange(count, dtype=jnp.uint32)).astype(jnp.int32)


def _init_matrix(mode, mat: _Matrix, density, dtype):
    k, side = _subspace_size(mode, mat, density)
    s, m, n = mat.stack, mat.rows, mat.cols
    moment_shape = {"rows": (s, k, n), "cols": (s, m, k), "flat": (s, k)}[side]
    if mode in ("svd", "random"):
        sub = jnp.zeros((s, m, k) if side == "rows" else (s, k, n), jnp.float32)
    elif mode == "randk":
        sub = jnp.zeros((s, 4), jnp.uint32)  # Feistel round keys (see keyed_indices)
    else:
        sub = jnp.zeros((s, k), jnp.int32)
    return jnp.zeros(moment_shape, dtype), sub


def _choose(mode, key, g, mat: _Matrix, density):
    """A new subspace for every matrix of ``g`` (``[stack, rows, cols]``)."""
    k, side = _subspace_size(mode, mat, density)
    keys = jax.random.split(key, mat.stack)
    if mode == "randk":
        return jax.random.bits(key, (mat.stack, 4), jnp.uint32)
    if mode in ("columns", "rows", "randperm"):
        size = {"rows": mat.rows, "cols": mat.cols, "flat": mat.rows * mat.cols}[side]

        def pick(kk):
            return jnp.sort(jax.random.choice(kk, size, (k,), replace=False)).astype(jnp.int32)

        return jax.vmap(pick)(keys)
    if mode == "random":
        dim = mat.rows if side == "rows" else mat.cols

        def orthogonal(kk):
            q, _ = jnp.linalg.qr(jax.random.normal(kk, (dim, k), jnp.float32))
            return q if side == "rows" else q.T

        return jax.vmap(orthogonal)(keys)

    def svd(matrix):  # mode == "svd"
        u, _, vh = jnp.linalg.svd(matrix.astype(jnp.float32), full_matrices=False)
        return u[:, :k] if side == "rows" else vh[:k]

    return jax.vmap(svd)(g)


def _down(mode, g, sub, mat: _Matrix, density):
    _, side = _subspace_size(mode, mat, density)
    if mode in ("svd", "random"):
        if side == "rows":
            return jnp.einsum("smk,smn->skn", sub, g)  # A^T G
        return jnp.einsum("smn,skn->smk", g, sub)  # G B^T
    if side == "flat":
        k = _subspace_size(mode, mat, density)[0]
        idx = jax.vmap(lambda keys: keyed_indices(keys, mat.rows * mat.cols, k))(sub)
        return jax.vmap(lambda x, i: x.reshape(-1)[i])(g, idx)
    axis = 0 if side == "rows" else 1
    return jax.vmap(lambda x, i: jnp.take(x, i, axis=axis))(g, sub)


def _up(mode, low, sub, mat: _Matrix, density):
    _, side = _subspace_size(mode, mat, density)
    if mode in ("svd", "random"):
        if side == "rows":
            return jnp.einsum("smk,skn->smn", sub, low)  # A L
        return jnp.einsum("smk,skn->smn", low, sub)  # L B
    shape = (mat.rows, mat.cols)
    if side == "flat":
        k = _subspace_size(mode, mat, density)[0]
        idx = jax.vmap(lambda keys: keyed_indices(keys, mat.rows * mat.cols, k))(sub)
        return jax.vmap(
            lambda x, i: jnp.zeros(shape[0] * shape[1], x.dtype).at[i].set(x).reshape(shape)
        )(low, idx)
    if side == "rows":
        return jax.vmap(lambda x, i: jnp.zeros(shape, x.dtype).at[i].set(x))(low, sub)
    return jax.vmap(lambda x, i: jnp.zeros(shape, x.dtype).at[:, i].set(x))(low, sub)


# ------------------------------------------------------------------ block mode


class _BlockPlan(NamedTuple):
    """Static layout of block mode: shape classes, their members and slot tables."""

    classes: tuple  # per class: (block shape, ((leaf index, stacked), ...), class size)
    slots: tuple[int, ...]  # slots per class
    tables: tuple  # per class: np.ndarray [period, slots] of class-local indices (deterministic)
    order_global: tuple  # global block order: ((class, local index), ...)


def _block_plan(leaves, flags, density, order) -> _BlockPlan:
    shapes, members, sizes, blocks_of_leaf = [], [], [], {}
    for i, (leaf, flag) in enumerate(zip(leaves, flags, strict=True)):
        if not flag:
            continue
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
    unstacked = [
        b for i in sorted(blocks_of_leaf) if leaves[i].ndim != 3 for b in blocks_of_leaf[i]
    ]
    stacked_ids = [i for i in sorted(blocks_of_leaf) if leaves[i].ndim == 3]
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
    if order == "random":
        slots = tuple(round(size * density) for size in sizes)
        return _BlockPlan(
            tuple(zip(shapes, map(tuple, members), sizes, strict=True)), slots, (), order_global
        )
    step = n_act // 2 if order == "mirror" else n_act
    period = total // math.gcd(total, step) if step else 1
    active_sets = []
    for r in range(period):
        if order == "ascending":
            chosen = [(r * n_act + i) % total for i in range(n_act)]
        elif order == "descending":
            chosen = [(total - 1 - r * n_act - i) % total for i in range(n_act)]
        else:  # mirror
            h = n_act // 2
            front = [(r * h + i) % total for i in range(h)]
            back = [(total - 1 - r * h - i) % total for i in range(h)]
            chosen = sorted(set(front + back))
        active_sets.append([order_global[j] for j in chosen])
    slots = tuple(
        max(sum(1 for cc, _ in act if cc == c) for act in active_sets) for c in range(len(shapes))
    )
    tables = []
    for c in range(len(shapes)):
        table = np.full((period, slots[c]), sizes[c], np.int32)
        for r, act in enumerate(active_sets):
            local = sorted(j for cc, j in act if cc == c)
            table[r, : len(local)] = local
        tables.append(table)
    return _BlockPlan(
        tuple(zip(shapes, map(tuple, members), sizes, strict=True)),
        slots,
        tuple(tables),
        order_global,
    )


# ------------------------------------------------------------------ the transform


def scale_by_frugal(
    *,
    density: float = 0.25,
    update_gap: int = 200,
    projection: str = "block",
    block_order: str = "descending",
    free_rule: str = "sign_sgd",
    free_lr_scale: float | jax.Array = 1.0,
    proj_lr_scale: float | jax.Array = 1.0,
    reset_state: bool = True,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    projectable: Any = None,
    seed: int = 0,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""FRUGAL's update direction (no learning rate, no weight decay); see :func:`frugal`."""
    density = static_number("density", density, 0.0, 1.0, low_open=True)
    update_gap = static_int("update_gap", update_gap, 1)
    seed = static_int("seed", seed, 0)
    for name, value, allowed in (
        ("projection", projection, PROJECTIONS),
        ("block_order", block_order, BLOCK_ORDERS),
        ("free_rule", free_rule, FREE_RULES),
    ):
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {name}={value!r}")
    check_range("free_lr_scale", free_lr_scale, 0.0)
    check_range("proj_lr_scale", proj_lr_scale, 0.0)
    check_range("b1", b1, 0.0, 1.0, high_open=True)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)

    def layout(params):
        leaves, treedef = jax.tree.flatten(params)
        mask = projectable if projectable is not None else default_projectable
        mask = mask(params) if callable(mask) else mask
        flags = [bool(f) for f in treedef.flatten_up_to(mask)]
        for (path, leaf), flag in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], flags, strict=True
        ):
            if flag and projection != "block" and leaf.ndim not in (2, 3):
                raise ValueError(
                    f"projection={projection!r} needs matrices (2-D, or 3-D stacks of "
                    f"matrices), but projectable leaf {jax.tree_util.keystr(path)} has shape "
                    f"{tuple(leaf.shape)}"
                )
            if flag and projection == "block" and leaf.ndim == 0:
                raise ValueError(f"projectable leaf {jax.tree_util.keystr(path)} is a scalar")
        plan = _block_plan(leaves, flags, density, block_order) if projection == "block" else None
        return leaves, treedef, flags, plan

    def new_blocks(key, plan, r):
        """Per class, the class-local indices of the active blocks at refresh ``r``."""
        out = []
        keys = jax.random.split(key, max(len(plan.classes), 1))
        for c, (_, _, size) in enumerate(plan.classes):
            if block_order == "random":
                chosen = jax.random.choice(keys[c], size, (plan.slots[c],), replace=False)
                out.append(jnp.sort(chosen).astype(jnp.int32))
            else:
                table = jnp.asarray(plan.tables[c])
                out.append(table[r % table.shape[0]])
        return tuple(out)

    def init_fn(params):
        leaves, treedef, flags, plan = layout(params)
        dtype = lambda p: state_dtype or p.dtype

        # every buffer is its own array: a donated state must not hold one buffer twice
        def regular():
            return treedef.unflatten(
                [
                    jnp.zeros(p.shape, dtype(p)) if not f else optax.MaskedNode()
                    for p, f in zip(leaves, flags, strict=True)
                ]
            )

        key = jax.random.key(seed)
        if plan is not None:

            def pools():
                return tuple(
                    jnp.zeros((s, *shape), state_dtype or leaves[members[0][0]].dtype)
                    for (shape, members, _), s in zip(plan.classes, plan.slots, strict=True)
                )

            subspace = tuple(
                jnp.full((s,), size, jnp.int32)
                for (_, _, size), s in zip(plan.classes, plan.slots, strict=True)
            )
            active_mu, active_nu = pools(), pools()
        else:
            pairs = [
                (
                    _init_matrix(projection, _as_matrix(p), density, dtype(p))
                    if f
                    else (optax.MaskedNode(), optax.MaskedNode())
                )
                for p, f in zip(leaves, flags, strict=True)
            ]
            active_mu = treedef.unflatten([a for a, _ in pairs])
            active_nu = jax.tree.map(jnp.zeros_like, active_mu)
            subspace = treedef.unflatten([b for _, b in pairs])
        return FrugalState(
            jnp.zeros([], jnp.int32),
            jnp.zeros([], jnp.int32),
            key,
            regular(),
            regular(),
            active_mu,
            active_nu,
            subspace,
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef, flags, plan = layout(updates)
        count = optax.safe_increment(state.count)
        refresh = (state.count % update_gap) == 0
        refresh_index = state.count // update_gap
        key, choice_key = jax.random.split(state.key)
        reset = refresh & reset_state

        def maybe_zero(tree):
            return jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), tree)

        active_mu, active_nu = maybe_zero(state.active_mu), maybe_zero(state.active_nu)
        inner = optax.safe_increment(
            jnp.where(reset, jnp.zeros_like(state.inner_count), state.inner_count)
        )
        scale_free = jnp.asarray(free_lr_scale).astype(jnp.float32)
        scale_proj = jnp.asarray(proj_lr_scale).astype(jnp.float32)

        # regular params: Adam on the global count (exactly optax.scale_by_adam)
        reg_mu = treedef.flatten_up_to(state.regular_mu)
        reg_nu = treedef.flatten_up_to(state.regular_nu)
        out: list[Any] = [None] * len(leaves)
        new_reg_mu, new_reg_nu = list(reg_mu), list(reg_nu)
        for i, (g, f) in enumerate(zip(leaves, flags, strict=True)):
            if not f:
                u, new_reg_mu[i], new_reg_nu[i] = _adam_direction(
                    g, reg_mu[i], reg_nu[i], b1, b2, eps, count
                )
                out[i] = u.astype(g.dtype)

        if plan is not None:
            subspace = jax.lax.cond(
                refresh, lambda: new_blocks(choice_key, plan, refresh_index), lambda: state.subspace
            )
            depth = {
                i: (leaves[i].shape[0] if leaves[i].ndim == 3 else 1)
                for i, f in enumerate(flags)
                if f
            }
            new_mu, new_nu = [], []
            for c, (_, members, size) in enumerate(plan.classes):
                # slot_of[j]: the pool slot of the class's block j, -1 when j is inactive
                slots = subspace[c].shape[0]
                slot_of = (
                    jnp.full((size,), -1, jnp.int32)
                    .at[subspace[c]]
                    .set(jnp.arange(slots, dtype=jnp.int32), mode="drop")
                )
                pool_m, pool_v = active_mu[c], active_nu[c]
                offset = 0
                for i, stacked in members:
                    # Per member leaf, no class-wide copy: Adam on every block with the moments
                    # of its slot (discarded for inactive blocks), the free rule, a select, and
                    # the active blocks' moments written back to their slots.
                    g = leaves[i].astype(jnp.float32)
                    g = g if stacked else g[None]
                    if slots == 0:  # this class never has an active block
                        d = scale_proj * scale_free * _free(free_rule, g)
                        out[i] = d if stacked else d[0]
                        offset += depth[i]
                        continue
                    slot = slot_of[offset : offset + depth[i]]
                    active = (slot >= 0).reshape((-1,) + (1,) * (g.ndim - 1))
                    safe = jnp.maximum(slot, 0)
                    u, m, v = _adam_direction(g, pool_m[safe], pool_v[safe], b1, b2, eps, inner)
                    d = jnp.where(active, u, scale_free * _free(free_rule, g)) * scale_proj
                    out[i] = d if stacked else d[0]
                    write = jnp.where(slot >= 0, slot, slots)  # inactive: out of range, dropped
                    pool_m = pool_m.at[write].set(m.astype(pool_m.dtype), mode="drop")
                    pool_v = pool_v.at[write].set(v.astype(pool_v.dtype), mode="drop")
                    offset += depth[i]
                new_mu.append(pool_m)
                new_nu.append(pool_v)
            for i, f in enumerate(flags):
                if f:
                    out[i] = out[i].astype(leaves[i].dtype)
            active_mu, active_nu = tuple(new_mu), tuple(new_nu)
        else:
            subs = treedef.flatten_up_to(state.subspace)
            mus, nus = treedef.flatten_up_to(active_mu), treedef.flatten_up_to(active_nu)
            leaf_keys = jax.random.split(choice_key, max(len(leaves), 1))
            new_subs, new_mu, new_nu = list(subs), list(mus), list(nus)
            for i, (g, f) in enumerate(zip(leaves, flags, strict=True)):
                if not f:
                    continue
                mat = _as_matrix(g)
                g3 = g.reshape(mat.stack, mat.rows, mat.cols).astype(jnp.float32)
                sub = jax.lax.cond(
                    refresh,
                    lambda g3=g3, k=leaf_keys[i], mat=mat: _choose(projection, k, g3, mat, density),
                    lambda s=subs[i]: s,
                )
                low = _down(projection, g3, sub, mat, density)
                u, new_mu[i], new_nu[i] = _adam_direction(low, mus[i], nus[i], b1, b2, eps, inner)
                residual = g3 - _up(projection, low, sub, mat, density)
                d = _up(projection, u, sub, mat, density) + scale_free * _free(free_rule, residual)
                out[i] = (scale_proj * d).reshape(g.shape).astype(g.dtype)
                new_subs[i] = sub
            subspace = treedef.unflatten(new_subs)
            active_mu, active_nu = treedef.unflatten(new_mu), treedef.unflatten(new_nu)

        new_state = FrugalState(
            count,
            inner,
            key,
            treedef.unflatten(new_reg_mu),
            treedef.unflatten(new_reg_nu),
            active_mu,
            active_nu,
            subspace,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    *,
    density: float = 0.25,
    update_gap: int = 200,
    projection: str = "block",
    block_order: str = "descending",
    free_rule: str = "sign_sgd",
    free_lr_scale: float | jax.Array = 1.0,
    proj_lr_scale: float | jax.Array = 1.0,
    reset_state: bool = True,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    projectable: Any = None,
    seed: int = 0,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""FRUGAL: Adam on a subspace of each projectable gradient, a state-free rule on the rest.

    For a projectable gradient :math:`G` with state-full subspace (down-projection
    :math:`\downarrow`, up-projection :math:`\uparrow`):

    .. math::
        u = s_p\,\Big(\uparrow\mathrm{Adam}(\downarrow G) + s_f\, F\big(G - \uparrow\downarrow G
        \big)\Big), \qquad p \leftarrow p - \eta\,(u + \lambda p)

    with :math:`F` = sign (``sign_sgd``), identity (``sgd``) or 0 (``none``), :math:`s_p` =
    ``proj_lr_scale``, :math:`s_f` = ``free_lr_scale``, and Adam with optax's inner eps and a
    bias-correction count that restarts at each refresh when ``reset_state``. Regular params
    (embeddings, norms, biases, the output head by default) get exactly ``optax.adamw``.
    Before steps 1, T+1, 2T+1, ... (T = ``update_gap``) the subspace is chosen anew:

    * ``block`` (the paper's pre-training choice): a block is one projectable tensor (a stacked
      ``[L, ...]`` tensor counts as L blocks, ordered layer by layer across the stacked leaves,
      so a scanned model walks its blocks as its unrolled twin does); ``round(N * density)``
      blocks are active: full Adam on them, the free rule elsewhere. Orders: ``descending``
      (from the last block down, cyclically), ``ascending``, ``mirror`` (half from each end),
      ``random`` (stratified: ``round(N_c * density)`` random blocks of each shape class). State
      is allocated only for slots of active blocks: per shape class, the most blocks of that
      class ever active at once (a static schedule), so inactive blocks cost nothing.
    * ``columns`` / ``rows`` / ``randk`` (the fine-tuning choice): a random ``int(density * k)``
      subset of the original's columns (a Flax kernel's rows, axis -2), of the rows (axis -1), or
      of the entries of each matrix.
    * ``svd`` / ``random`` / ``randperm`` (GaLore-style): with :math:`m \ge n` the right factor
      :math:`B` (``round(n * density)`` rows of :math:`V^\top`, a random orthonormal basis, or a
      random selection) and :math:`\downarrow G = G B^\top,\ \uparrow L = L B`; else the left
      factor :math:`A` and :math:`\downarrow G = A^\top G,\ \uparrow L = A L`. SVD in float32.

    ``frugal(lr, projection='svd', free_rule='none', reset_state=False)`` is the GaLore baseline.
    It differs from ``optax.contrib.galore`` in the side it projects (FRUGAL keeps the larger
    dimension: ``G B^T`` for :math:`m \ge n`; optax reduces it: ``P^T G``), in the rank
    (``density`` times the smaller dimension, not an absolute rank) and in the residual and
    resets it can add; on a square matrix that optax sees transposed the two compute the same
    update (tested).

    Args:
      learning_rate: a number >= 0 or a schedule.
      density: :math:`\rho \in (0, 1]`, the state-full fraction (static).
      update_gap: steps between refreshes, >= 1 (static).
      projection: one of :data:`PROJECTIONS`.
      block_order: one of :data:`BLOCK_ORDERS` (block mode).
      free_rule: one of :data:`FREE_RULES`.
      free_lr_scale, proj_lr_scale: learning-rate multipliers, >= 0.
      reset_state: zero the state-full moments and restart their count at each refresh.
      b1, b2, eps: Adam's hyperparameters (inner eps).
      weight_decay: decoupled weight decay on every param (as ``optax.adamw``).
      projectable: a bool pytree or callable of the params choosing the projectable leaves;
        default :func:`default_projectable`. Matrix modes need 2-D leaves or 3-D stacks.
      seed: seed of the random choices (a key in the state).
      state_dtype: dtype of the moments (default: the params').

    Raises:
      ValueError: ``density`` outside (0, 1], ``update_gap`` < 1, an unknown projection, order or
        rule, a projectable leaf that is not a matrix in a matrix mode, ``mirror`` with an odd
        number of active blocks (the message names the argument and the value).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((8, 4))}, "bias": jnp.zeros(4)}
      >>> tx = frugal(1e-3, density=0.5, update_gap=10, projection="columns")
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)

    References:
      Zmushko et al., FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
      Scalable Training, https://arxiv.org/abs/2411.07837, 2024.
    """
    check_learning_rate(learning_rate)
    check_range("weight_decay", weight_decay, 0.0)
    return optax.chain(
        scale_by_frugal(
            density=density,
            update_gap=update_gap,
            projection=projection,
            block_order=block_order,
            free_rule=free_rule,
            free_lr_scale=free_lr_scale,
            proj_lr_scale=proj_lr_scale,
            reset_state=reset_state,
            b1=b1,
            b2=b2,
            eps=eps,
            projectable=projectable,
            seed=seed,
            state_dtype=state_dtype,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
