"""FRUGAL: full-rank updates with gradient splitting into state-full and state-free subspaces.

Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
Training", https://arxiv.org/abs/2411.07837 (ICML 2025).

Every projectable gradient is split in two: a low-dimensional part updated by Adam (the only part
with optimizer state) and the rest updated by a state-free rule (signSGD, SGD or nothing). All
directions move every step; state exists for a fraction ``density`` of them. Every
``update_gap`` steps the state-full subspace is chosen anew (and, by default, its state reset).

Static shapes throughout: the subspace is a set of indices, a projector or a table of active
blocks of fixed size, so one compilation serves every step and the refresh is a ``lax.cond``.
The block mode lives in ``blocks.py``, the matrix modes in ``projections.py``; this module
composes them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.frugal import blocks, projections
from optim.frugal.rules import FREE_RULES, adam_step
from optim.hyperparams import check_range, static_int, static_number
from optim.moments import compute_dtype, reject_complex

PROJECTIONS = ("block", *projections.MATRIX_PROJECTIONS)
BLOCK_ORDERS = blocks.BLOCK_ORDERS
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
      subspace: per projectable leaf its kept indices (``columns``, ``rows``, ``randperm``),
        Feistel round keys (``randk``) or projector (``svd``, ``random``); in block mode per
        shape class the class-local indices of the active blocks (the class size where a slot
        is empty).

    Sharding: ``regular_mu``/``regular_nu`` are sharded like their params. The other buffers are
    not params-shaped (a pool per shape class, projected moments, projectors), so
    ``optax.tree.map_params`` cannot map them (the placeholder it passes to ``init`` hides the
    shapes that decide the pools); derive their shardings from ``jax.eval_shape(tx.init,
    params)`` instead, as ``jaxlib_ext.sharding.derive_state_shardings`` does, or let
    ``jax.jit(tx.init)`` propagate them from sharded params.
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


class _Layout(NamedTuple):
    leaves: list
    treedef: Any
    flags: list[bool]
    plan: blocks.BlockPlan | None


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
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""FRUGAL's update direction (no learning rate, no weight decay).

    .. math::
        u = s_p\,\Big(\uparrow\mathrm{Adam}(\downarrow G) + s_f\, F\big(G - \uparrow\downarrow G
        \big)\Big)

    for a projectable gradient :math:`G`, Adam's direction (inner eps) for a regular one; see
    :func:`frugal` for the modes and the symbols.

    Args:
      density, update_gap, projection, block_order, free_rule, free_lr_scale, proj_lr_scale,
        reset_state, b1, b2, eps, projectable, seed: see :func:`frugal`.
      state_dtype: dtype of the moments (default: the params'). The maths (projections, SVD,
        Adam) runs in ``promote_types(param dtype, float32)``.
      mu_dtype: dtype of the first moments only (optax's name), overriding ``state_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`FrugalState`.

    Raises:
      ValueError: see :func:`frugal`.
      TypeError: ``density``, ``update_gap`` or ``seed`` traced; complex params (at ``init``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_frugal(density=0.5, update_gap=10), optax.scale(-1e-3))
      >>> params = {"w": jnp.ones((8, 4)), "v": jnp.ones((8, 4)), "bias": jnp.zeros(4)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)

    References:
      Zmushko et al., FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
      Scalable Training, https://arxiv.org/abs/2411.07837, 2024.
    """
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
    adam = (b1, b2, eps)

    def layout(params) -> _Layout:
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [jax.tree_util.keystr(path) for path, _ in with_paths]
        leaves = [leaf for _, leaf in with_paths]
        mask = projectable if projectable is not None else default_projectable
        mask = mask(params) if callable(mask) else mask
        flags = [bool(f) for f in treedef.flatten_up_to(mask)]
        for name, leaf, flag in zip(names, leaves, flags, strict=True):
            if flag and projection != "block" and leaf.ndim not in (2, 3):
                raise ValueError(
                    f"projection={projection!r} needs matrices (2-D, or 3-D stacks of "
                    f"matrices), but projectable leaf {name} has shape {tuple(leaf.shape)}"
                )
            if flag and projection == "block" and leaf.ndim == 0:
                raise ValueError(f"projectable leaf {name} is a scalar")
        plan = None
        if projection == "block":
            plan = blocks.block_plan(leaves, flags, names, density, block_order)
        return _Layout(leaves, treedef, flags, plan)

    def init_fn(params):
        reject_complex(params, "frugal")
        leaves, treedef, flags, plan = layout(params)

        # every buffer is its own array: a donated state must not hold one buffer twice
        def regular(dtype):
            return treedef.unflatten(
                [
                    optax.MaskedNode() if f else jnp.zeros_like(p, dtype=dtype or p.dtype)
                    for p, f in zip(leaves, flags, strict=True)
                ]
            )

        if plan is not None:

            def pools(dtype):
                return tuple(
                    jnp.zeros((s, *shape), dtype or leaves[members[0][0]].dtype)
                    for (shape, members, _), s in zip(plan.classes, plan.slots, strict=True)
                )

            subspace = tuple(
                jnp.full((s,), size, jnp.int32)
                for (_, _, size), s in zip(plan.classes, plan.slots, strict=True)
            )
            active_mu, active_nu = pools(mu_dtype or state_dtype), pools(state_dtype)
        else:

            def matrix(p, dtype):
                mat = projections.as_matrix(p)
                dtype = dtype or p.dtype
                return projections.init_matrix(
                    projection, mat, density, dtype, compute_dtype(p.dtype)
                )

            def per_leaf(dtype, part):
                return treedef.unflatten(
                    [
                        matrix(p, dtype)[part] if f else optax.MaskedNode()
                        for p, f in zip(leaves, flags, strict=True)
                    ]
                )

            active_mu = per_leaf(mu_dtype or state_dtype, 0)
            active_nu = per_leaf(state_dtype, 0)
            subspace = per_leaf(None, 1)
        zero = jnp.zeros([], jnp.int32)
        return FrugalState(
            zero,
            jnp.zeros([], jnp.int32),
            jax.random.key(seed),
            regular(mu_dtype or state_dtype),
            regular(state_dtype),
            active_mu,
            active_nu,
            subspace,
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef, flags, plan = layout(updates)
        count = optax.safe_increment(state.count)
        refresh = (state.count % update_gap) == 0
        key, choice_key = jax.random.split(state.key)
        reset = refresh & reset_state

        def maybe_zero(tree):
            return jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), tree)

        active_mu, active_nu = maybe_zero(state.active_mu), maybe_zero(state.active_nu)
        inner = optax.safe_increment(
            jnp.where(reset, jnp.zeros_like(state.inner_count), state.inner_count)
        )
        out: list[Any] = [None] * len(leaves)

        # regular params: Adam on the global count (exactly optax.scale_by_adam)
        reg_mu = treedef.flatten_up_to(state.regular_mu)
        reg_nu = treedef.flatten_up_to(state.regular_nu)
        for i, (g, f) in enumerate(zip(leaves, flags, strict=True)):
            if not f:
                u, reg_mu[i], reg_nu[i] = adam_step(g, reg_mu[i], reg_nu[i], count, *adam)
                out[i] = u.astype(g.dtype)

        def scales(dtype):
            return {
                "free_scale": jnp.asarray(free_lr_scale).astype(dtype),
                "proj_scale": jnp.asarray(proj_lr_scale).astype(dtype),
            }

        if plan is not None:
            subspace = jax.lax.cond(
                refresh,
                lambda: blocks.new_blocks(choice_key, plan, state.count // update_gap, block_order),
                lambda: state.subspace,
            )
            if not reset_state:  # blocks staying active keep their moments, new ones start at 0
                sizes = [size for _, _, size in plan.classes]

                def carry(pools):
                    return tuple(
                        blocks.carry_moments(p, old, new, size)
                        for p, old, new, size in zip(
                            pools, state.subspace, subspace, sizes, strict=True
                        )
                    )

                active_mu = jax.lax.cond(refresh, carry, lambda p: p, active_mu)
                active_nu = jax.lax.cond(refresh, carry, lambda p: p, active_nu)
            new_mu, new_nu = [], []
            for c, (_, members, size) in enumerate(plan.classes):
                compute = compute_dtype(*(leaves[i].dtype for i, _ in members))
                directions, pool_m, pool_v = blocks.class_update(
                    leaves,
                    members,
                    size,
                    subspace[c],
                    (active_mu[c], active_nu[c]),
                    inner_count=inner,
                    free_rule=free_rule,
                    adam=adam,
                    compute=compute,
                    **scales(compute),
                )
                for i, d in directions.items():
                    out[i] = d
                new_mu.append(pool_m)
                new_nu.append(pool_v)
            active_mu, active_nu = tuple(new_mu), tuple(new_nu)
        else:
            subs = treedef.flatten_up_to(state.subspace)
            mus, nus = treedef.flatten_up_to(active_mu), treedef.flatten_up_to(active_nu)
            leaf_keys = jax.random.split(choice_key, max(len(leaves), 1))
            for i, (g, f) in enumerate(zip(leaves, flags, strict=True)):
                if f:
                    compute = compute_dtype(g.dtype)
                    out[i], subs[i], mus[i], nus[i] = projections.matrix_update(
                        projection,
                        g,
                        subs[i],
                        mus[i],
                        nus[i],
                        refresh=refresh,
                        key=leaf_keys[i],
                        inner_count=inner,
                        density=density,
                        free_rule=free_rule,
                        adam=adam,
                        compute=compute,
                        **scales(compute),
                    )
            subspace = treedef.unflatten(subs)
            active_mu, active_nu = treedef.unflatten(mus), treedef.unflatten(nus)

        new_state = FrugalState(
            count,
            inner,
            key,
            treedef.unflatten(reg_mu),
            treedef.unflatten(reg_nu),
            active_mu,
            active_nu,
            subspace,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
