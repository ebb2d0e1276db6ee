"""SPAM: Spike-Aware Adam with Momentum Reset.

Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
https://arxiv.org/abs/2501.06842 (ICLR 2025). Ported from the authors' code
(github.com/TianjinYellow/SPAM-Optimizer), step for step; differences are listed in
:func:`scale_by_spam`.

The pieces are also available on their own, to wrap other optimizers: spike-aware clipping as
:func:`optim.clip_spikes`, the periodic momentum reset as :func:`optim.periodic_reset` and the
post-reset warmup as :func:`spam_warmup_factor` (see ``optim/momentum_reset.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.decay_after_update import scale_and_decay_after_update
from optim.explicit_sharding import replicated_like, shard_like
from optim.hyperparams import check_learning_rate, check_range, static_int, static_number
from optim.moments import adam_direction, compute_dtype, ema, reject_complex


class ScaleBySpamState(NamedTuple):
    """State of :func:`scale_by_spam`.

    Attributes:
      count: number of updates so far (int32); never reset.
      mu: first moment per param; for a sparse (density < 1) param a vector of its kept entries.
      nu: second moment, laid out like ``mu``.
      indices: per param, the flat indices of its kept entries (int32 vector, sorted) for sparse
        params, ``optax.MaskedNode()`` for dense ones.
      key: the PRNG key that draws the next masks (present, and unused, when every param is
        dense, so that the state's type does not depend on ``density``).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    indices: Any
    key: jax.Array


def spam_warmup_factor(
    count: jax.Array,
    reset_interval: int | jax.Array,
    warmup_steps: int | jax.Array,
    dtype: Any = jnp.float32,
) -> jax.Array:
    r"""SPAM's post-reset learning-rate warmup :math:`sf(s)` for the 1-based step ``count``.

    .. math::
        sf(s) = 1 \text{ if } s < \Delta T, \text{ else with } j = s \bmod \Delta T:\;
        1 \text{ if } j \ge N \text{ else } 1 - 0.99\,\frac{1 + \cos(\pi j / (N + 1))}{2}

    i.e. 0.01 on the reset step itself, back to 1 after ``warmup_steps`` steps; no warmup before
    the first reset. In ``dtype`` (float32 by default).
    """
    s = count.astype(jnp.int32)
    interval = jnp.asarray(reset_interval).astype(jnp.int32)
    n = jnp.asarray(warmup_steps).astype(dtype)
    j = (s % interval).astype(dtype)
    cosine = 1 - jnp.asarray(0.99, dtype) * (1 + jnp.cos(jnp.pi * j / (n + 1))) / 2
    return jnp.where((s < interval) | (j >= n), jnp.ones((), dtype), cosine)


def spike_clip_active(
    count: jax.Array,
    spike_threshold: float | jax.Array,
    reset_interval: int | jax.Array,
    no_clip_steps: int | jax.Array,
) -> jax.Array:
    """Whether SPAM clips at step ``count``: ``theta > 0 and s >= G and s % DeltaT >= G``."""
    s = count.astype(jnp.int32)
    g = jnp.asarray(no_clip_steps).astype(jnp.int32)
    interval = jnp.asarray(reset_interval).astype(jnp.int32)
    return (jnp.asarray(spike_threshold) > 0) & (s >= g) & (s % interval >= g)


def check_steps(reset_interval: Any, warmup_steps: Any = 0, no_clip_steps: Any = 0) -> None:
    """Validates SPAM's step counts when concrete: integers, ``reset_interval >= 1``, others >= 0,
    and ``no_clip_steps < reset_interval``."""
    for name, value, low in (
        ("reset_interval", reset_interval, 1),
        ("warmup_steps", warmup_steps, 0),
        ("no_clip_steps", no_clip_steps, 0),
    ):
        check_range(name, value, low)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"`{name}` must be an integer, got {name}={value!r}")
    if isinstance(reset_interval, int | float) and isinstance(no_clip_steps, int | float):
        if no_clip_steps >= reset_interval:
            raise ValueError(
                f"`no_clip_steps` must be < reset_interval={reset_interval}, got "
                f"no_clip_steps={no_clip_steps}"
            )


def clip_spike_from_updated(
    g: jax.Array, v_new: jax.Array, threshold: Any, b2: Any, active: jax.Array
) -> jax.Array:
    """SPAM's spike clip, ``sign(g) * sqrt(theta * v)`` where ``g**2 > theta * v`` (and
    ``active``), else ``g``, against the *previous* second moment ``v``, read from the updated
    one ``v_new = b2 v + (1 - b2) min(g**2, theta v)``. Computed in ``compute_dtype(g, v_new)``,
    returned in ``g``'s dtype.

    ``g**2 > theta v`` holds exactly when ``g**2 > theta v_new / (b2 + (1 - b2) theta)``, and
    then ``theta v`` equals that bound (in exact arithmetic; in floating point up to the rounding
    of ``v_new``). Reading the updated moment lets XLA write ``v`` in place before the first
    moment's update runs, instead of ordering the first moment's read of the old ``v`` first.
    """
    dtype = compute_dtype(g.dtype, v_new.dtype)
    gc = g.astype(dtype)
    theta = jnp.asarray(threshold).astype(dtype)
    decay = jnp.asarray(b2).astype(dtype)
    bound = theta * v_new.astype(dtype) / (decay + (1 - decay) * theta)
    spike = active & (gc * gc > bound)
    return jnp.where(spike, jnp.sign(gc) * jnp.sqrt(bound), gc).astype(g.dtype)


def clipped_square(g: jax.Array, v: jax.Array, threshold: Any, active: jax.Array) -> jax.Array:
    """The square of SPAM's clipped gradient: ``min(g**2, theta * v)`` when ``active``, else
    ``g**2``, in ``compute_dtype(g, v)`` (not rounded to a bfloat16 ``g``'s dtype: it feeds
    the second moment's EMA, which runs in that dtype)."""
    dtype = compute_dtype(g.dtype, v.dtype)
    gc = g.astype(dtype)
    square = gc * gc
    bound = jnp.asarray(threshold).astype(dtype) * v.astype(dtype)
    return jnp.where(active, jnp.minimum(square, bound), square)


def _default_sparse(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim == 2, params)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def scale_by_spam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    *,
    spike_threshold: float | jax.Array = 5000.0,
    reset_interval: int | jax.Array = 500,
    warmup_steps: int | jax.Array = 150,
    no_clip_steps: int | jax.Array = 20,
    density: float = 1.0,
    seed: int = 0,
    sparse_mask: Any = None,
    state_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""SPAM's update direction (no learning rate, no weight decay).

    At the 1-based step :math:`s`, for every coordinate, with :math:`\theta` the spike threshold,
    :math:`\Delta T` the reset interval, :math:`G` the no-clip window:

    1. momentum reset: if :math:`s \bmod \Delta T = 0`, :math:`m = v = 0` (the bias-correction
       count is *not* reset);
    2. spike-aware clipping, active iff :math:`\theta > 0,\ s \ge G,\ s \bmod \Delta T \ge G`:
       where :math:`g^2 > \theta v` (previous raw :math:`v`), :math:`g \leftarrow
       \operatorname{sign}(g)\sqrt{\theta v}`;
    3. :math:`m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2`;
    4. output :math:`\frac{\sqrt{1-\beta_2^s}}{1-\beta_1^s}\, sf(s)\, \frac{m}{\sqrt v + \epsilon}`
       with the *outer* eps of the original and :math:`sf` of :func:`spam_warmup_factor`.

    As computed: :math:`v` is updated first (with :math:`\min(g^2, \theta v)`), and the bound
    :math:`\theta v` of step 2 is read back from the updated :math:`v'` as
    :math:`\theta v' / (\beta_2 + (1-\beta_2)\theta)`, which equals it exactly where a spike is
    clipped (in floating point up to the rounding of the stored :math:`v'`, e.g. a bfloat16
    ``state_dtype``); and :math:`g^2 > \theta v` exactly when :math:`g^2` exceeds that bound, so
    the same coordinates are clipped. Neither moment then reads the other's old value, and XLA
    updates each in place in one loop (44 bytes per parameter per step on CPU, ``optax.adamw``
    40; see ``benchmarks/RESULTS.md``).

    Sparse momentum (``density < 1``): for the params ``sparse_mask`` selects (default: every 2-D
    param), moments exist only for ``int(density * size)`` entries drawn uniformly without
    replacement; entries off the mask get a zero update. Masks are redrawn from ``key`` at the end
    of every step :math:`s` with :math:`(s+1) \bmod \Delta T = 0`, just before the reset wipes the
    moments. Static shapes: the state holds the kept indices, moments are vectors.

    Differences from the authors' code (each deliberate): the count of kept entries is exactly
    ``max(1, int(density * size))`` at every redraw (they draw Bernoulli masks after the first,
    a variable count that cannot have a static shape; and where ``int(density * size)`` is 0
    they keep no entry, so the param never moves, which here keeps one); the random state is
    the ``key`` in the optimizer state, not a global RNG; weight decay (in :func:`spam`)
    applies to sparse params too (they skip it there, a bug).

    Args:
      b1, b2: moment decays, in [0, 1).
      eps: outer epsilon, >= 0.
      spike_threshold: :math:`\theta \ge 0`; 0 disables clipping.
      reset_interval: :math:`\Delta T \ge 1` steps between momentum resets.
      warmup_steps: :math:`N \ge 0` steps of the post-reset warmup.
      no_clip_steps: :math:`G`, in [0, reset_interval).
      density: fraction of entries with momentum, in (0, 1]; static (with
        ``optax.inject_hyperparams`` list it in ``static_args``, as ``seed``).
      seed: seed of the mask key.
      sparse_mask: which params are sparse when ``density < 1``: a bool pytree or a callable of
        the params; default every 2-D param (pass a mask to exclude embeddings and the output
        head, as the authors do).
      state_dtype: dtype of ``mu`` and ``nu`` (default: each param's dtype). The maths runs in
        ``promote_types(dtype, float32)`` whatever the buffers' dtype.
      mu_dtype: dtype of ``mu`` only (optax's name), overriding ``state_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySpamState`.

    Raises:
      ValueError: a concrete hyperparameter out of range, e.g. ``no_clip_steps >=
        reset_interval`` (the message names it and echoes the value).
      TypeError: ``density`` or ``seed`` traced; complex params (at ``init``).

    Non-finite gradients: a NaN or Inf gradient makes ``mu`` and ``nu`` non-finite until the
    next momentum reset (as in the original; the clip cannot catch it, ``NaN > bound`` is
    false). Skip such steps with ``optax.apply_if_finite(spam(...), max_consecutive_errors)``,
    which leaves the whole state untouched (tested).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_spam(reset_interval=100), optax.scale(-1e-3))
      >>> params = {"w": jnp.ones((4, 3))}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((4, 3))}, state, params)

    References:
      Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training,
      https://arxiv.org/abs/2501.06842, 2025.
    """
    check_range("b1", b1, 0.0, 1.0, high_open=True)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)
    check_range("spike_threshold", spike_threshold, 0.0)
    check_steps(reset_interval, warmup_steps, no_clip_steps)
    density = static_number("density", density, 0.0, 1.0, low_open=True)
    seed = static_int("seed", seed, 0)
    sparse = density < 1.0

    def is_sparse_tree(params):
        if not sparse:
            return jax.tree.map(lambda _: False, params)
        chosen = sparse_mask if sparse_mask is not None else _default_sparse
        chosen = chosen(params) if callable(chosen) else chosen
        # `chosen` may be a prefix of the params (one bool for a subtree), as optax masks are
        return jax.tree.map(
            lambda c, sub: jax.tree.map(lambda p: bool(c) and p.ndim >= 1 and p.size > 0, sub),
            chosen,
            params,
            is_leaf=_is_masked,
        )

    def kept(p) -> int:
        return max(1, int(density * math.prod(p.shape)))

    def draw(key, params, sparse_tree):
        leaves, treedef = jax.tree.flatten(params)
        flags = treedef.flatten_up_to(sparse_tree)
        keys = jax.random.split(key, len(leaves) + 1)
        out = []
        for i, (p, flag) in enumerate(zip(leaves, flags, strict=True)):
            if flag:
                size = math.prod(p.shape)
                chosen = jax.random.choice(keys[i], size, (kept(p),), replace=False)
                out.append(jnp.sort(chosen).astype(jnp.int32))
            else:
                out.append(optax.MaskedNode())
        return treedef.unflatten(out), keys[-1]

    def init_fn(params):
        reject_complex(params, "spam")
        sparse_tree = is_sparse_tree(params)

        def moment(p, flag, dtype):
            if flag:
                return jnp.zeros((kept(p),), dtype or p.dtype)
            return jnp.zeros_like(p, dtype=dtype or p.dtype)  # keeps p's sharding

        mu = jax.tree.map(lambda p, f: moment(p, f, mu_dtype or state_dtype), params, sparse_tree)
        nu = jax.tree.map(lambda p, f: moment(p, f, state_dtype), params, sparse_tree)
        key = jax.random.key(seed)
        if sparse:
            indices, key = draw(key, params, sparse_tree)
        else:
            indices = jax.tree.map(lambda _: optax.MaskedNode(), params)
        return ScaleBySpamState(jnp.zeros([], jnp.int32), mu, nu, indices, key)

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        reset = (count % jnp.asarray(reset_interval).astype(jnp.int32)) == 0
        active = spike_clip_active(count, spike_threshold, reset_interval, no_clip_steps)

        def leaf(g, m, v, idx):
            sparse_leaf = not isinstance(idx, optax.MaskedNode)
            if sparse_leaf:
                gk = g.reshape(-1).at[idx].get(out_sharding=replicated_like(g))
            else:
                gk = g
            m = jnp.where(reset, jnp.zeros_like(m), m)
            v = jnp.where(reset, jnp.zeros_like(v), v)
            # v takes min(g**2, theta * v) (the clipped square, without a square root) and is
            # updated first; m takes the clipped g, its bound read back from the updated v. Each
            # moment is then one loop, and v is written in place before m reads it (reading the
            # old v for m would order m's loop before v's write: one more read of m per step).
            v = ema(v, clipped_square(gk, v, spike_threshold, active), b2)
            m = ema(m, clip_spike_from_updated(gk, v, spike_threshold, b2, active), b1)
            warmup = spam_warmup_factor(
                count, reset_interval, warmup_steps, compute_dtype(m.dtype, v.dtype)
            )
            u = adam_direction(m, v, count, b1, b2, eps, outer_eps=True, scale=warmup)
            if sparse_leaf:
                u = shard_like(jnp.zeros(g.size, u.dtype).at[idx].set(u).reshape(g.shape), g)
            return u.astype(g.dtype), m, v

        is_node = lambda x: isinstance(x, optax.MaskedNode)
        g_leaves, treedef = jax.tree.flatten(updates)
        idx_leaves = treedef.flatten_up_to(state.indices)
        results = [
            leaf(g, m, v, i)
            for g, m, v, i in zip(
                g_leaves,
                treedef.flatten_up_to(state.mu),
                treedef.flatten_up_to(state.nu),
                idx_leaves,
                strict=True,
            )
        ]
        out, mu, nu = (treedef.unflatten([r[k] for r in results]) for k in range(3))
        indices, key = state.indices, state.key
        if sparse:
            redraw = ((count + 1) % jnp.asarray(reset_interval).astype(jnp.int32)) == 0
            # laid out like `updates` (which may hold optax.MaskedNode()s under optax.masked)
            sparse_tree = jax.tree.map(lambda _, i: not is_node(i), updates, state.indices)
            indices, key = jax.lax.cond(
                redraw,
                lambda k: draw(k, updates, sparse_tree),
                lambda k: (state.indices, k),
                state.key,
            )
        del params
        return out, ScaleBySpamState(count, mu, nu, indices, key)

    return optax.GradientTransformation(init_fn, update_fn)


def spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    weight_decay: float | jax.Array = 0.0,
    *,
    spike_threshold: float | jax.Array = 5000.0,
    reset_interval: int | jax.Array = 500,
    warmup_steps: int | jax.Array = 150,
    no_clip_steps: int | jax.Array = 20,
    density: float = 1.0,
    seed: int = 0,
    sparse_mask: Any = None,
    state_dtype: Any = None,
    mu_dtype: Any = None,
    mask: Any | Callable[[optax.Params], Any] = None,
) -> optax.GradientTransformation:
    r"""The SPAM optimizer: :func:`scale_by_spam`, the learning rate, then weight decay.

    :math:`p \leftarrow p - \eta\, d` with :math:`d` from :func:`scale_by_spam`, then
    :math:`p \leftarrow p - \eta\lambda p` on the updated params, exactly as the original (see
    :func:`scale_and_decay_after_update`).

    Args:
      learning_rate: a number >= 0 or an optax schedule.
      b1, b2, eps, spike_threshold, reset_interval, warmup_steps, no_clip_steps, density, seed,
        sparse_mask, state_dtype, mu_dtype: see :func:`scale_by_spam`.
      weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
      mask: which params decay (a bool pytree, a prefix of one, or a callable), default all.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = spam(1e-3, weight_decay=0.1)
      >>> params = {"w": jnp.ones((4, 3))}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((4, 3))}, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training,
      https://arxiv.org/abs/2501.06842, 2025.
    """
    check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_spam(
            b1,
            b2,
            eps,
            spike_threshold=spike_threshold,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            no_clip_steps=no_clip_steps,
            density=density,
            seed=seed,
            sparse_mask=sparse_mask,
            state_dtype=state_dtype,
            mu_dtype=mu_dtype,
        ),
        scale_and_decay_after_update(learning_rate, weight_decay, mask),
    )
