"""SPAM's building blocks for any optimizer: spike-aware clipping, periodic momentum reset and the
post-reset warmup, as separate optax transforms.

Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
https://arxiv.org/abs/2501.06842 (ICLR 2025).

Composition: with the same ``b2``, ``reset_interval`` and ``no_clip_steps``::

    optax.chain(
        clip_spikes(spike_threshold, b2, reset_interval=T, no_clip_steps=G),
        periodic_reset(optax.scale_by_adam(b1, b2, eps=eps), reset_interval=T),
        scale_by_spam_warmup(T, warmup_steps),
    )

tracks exactly SPAM's moments: ``clip_spikes`` keeps its own EMA of the clipped squared gradient,
which is reset on the same steps as Adam's, so it equals Adam's ``nu``. The only difference from
:func:`optim.scale_by_spam` is the eps convention (optax's inner eps,
``m_hat / (sqrt(v_hat) + eps)``, against SPAM's outer eps), and one more params-shaped buffer.
The same blocks wrap other optimizers (Lion, Adafactor, SGD with momentum...).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.hyperparams import check_range
from optim.moments import compute_dtype, ema, reject_complex
from optim.spam import (
    check_steps,
    clip_spike_from_updated,
    clipped_square,
    spam_warmup_factor,
    spike_clip_active,
)


class ClipSpikesState(NamedTuple):
    """State of :func:`clip_spikes`: the step ``count`` and the EMA ``nu`` of clipped g**2."""

    count: jax.Array
    nu: optax.Updates


def clip_spikes(
    spike_threshold: float | jax.Array = 5000.0,
    b2: float | jax.Array = 0.999,
    *,
    reset_interval: int | jax.Array = 500,
    no_clip_steps: int | jax.Array = 20,
    state_dtype=None,
) -> optax.GradientTransformation:
    r"""Spike-aware clipping of whatever passes through, with its own second-moment EMA.

    At the 1-based step :math:`s`: :math:`v = 0` if :math:`s \bmod \Delta T = 0`; where
    :math:`g^2 > \theta v` (and :math:`\theta > 0,\ s \ge G,\ s \bmod \Delta T \ge G`),
    :math:`g \leftarrow \operatorname{sign}(g)\sqrt{\theta v}`; then
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2` with the clipped :math:`g`.

    Args:
      spike_threshold: :math:`\theta \ge 0`.
      b2: decay of the EMA, in [0, 1).
      reset_interval: :math:`\Delta T \ge 1`; 0-based multiples reset the EMA.
      no_clip_steps: :math:`G` in [0, reset_interval).
      state_dtype: dtype of ``nu`` (default: the params').

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(clip_spikes(reset_interval=100), optax.lion(1e-4))
      >>> state = tx.init({"w": jnp.zeros(3)})

    References:
      Huang et al., SPAM, https://arxiv.org/abs/2501.06842, 2025.
    """
    check_range("spike_threshold", spike_threshold, 0.0)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_steps(reset_interval, 0, no_clip_steps)

    def init_fn(params):
        reject_complex(params, "clip_spikes")
        return ClipSpikesState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params, state_dtype))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        reset = (count % jnp.asarray(reset_interval).astype(jnp.int32)) == 0
        active = spike_clip_active(count, spike_threshold, reset_interval, no_clip_steps)

        def leaf(g, v):
            v = jnp.where(reset, jnp.zeros_like(v), v)
            # as in scale_by_spam: v first, the clip bound read back from the updated v, so
            # that XLA writes v in place instead of copying it for the clip's read of the old v
            v = ema(v, clipped_square(g, v, spike_threshold, active), b2)
            return clip_spike_from_updated(g, v, spike_threshold, b2, active), v

        g_leaves, treedef = jax.tree.flatten(updates)
        pairs = [leaf(g, v) for g, v in zip(g_leaves, treedef.flatten_up_to(state.nu), strict=True)]
        clipped = treedef.unflatten([g for g, _ in pairs])
        nu = treedef.unflatten([v for _, v in pairs])
        return clipped, ClipSpikesState(count, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class PeriodicResetState(NamedTuple):
    """State of :func:`periodic_reset`: the step ``count`` and the wrapped ``inner_state``."""

    count: jax.Array
    inner_state: optax.OptState


def periodic_reset(
    inner: optax.GradientTransformation, reset_interval: int | jax.Array
) -> optax.GradientTransformation:
    r"""Zeros ``inner``'s floating-point state every ``reset_interval`` steps (momentum reset).

    Before the inner update of every step :math:`s` with :math:`s \bmod \Delta T = 0`
    (1-based), every floating-point leaf of the inner state (moments, EMAs) is set to zero;
    integer leaves (step counters, hence bias corrections) are kept, as in SPAM. Wrap
    ``optax.inject_hyperparams`` *around* this transform, not inside it (its float
    hyperparameters would be zeroed too).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = periodic_reset(optax.scale_by_adam(), reset_interval=500)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_steps(reset_interval)

    def init_fn(params):
        return PeriodicResetState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        count = optax.safe_increment(state.count)
        reset = (count % jnp.asarray(reset_interval).astype(jnp.int32)) == 0

        def zero(x):
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
                return jnp.where(reset, jnp.zeros_like(x), x)
            return x

        inner_state = jax.tree.map(zero, state.inner_state)
        updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, inner_state, params, **extra_args
        )
        return updates, PeriodicResetState(count, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_spam_warmup(
    reset_interval: int | jax.Array, warmup_steps: int | jax.Array
) -> optax.GradientTransformation:
    """Multiplies updates by SPAM's post-reset warmup factor (:func:`optim.spam_warmup_factor`)."""
    check_steps(reset_interval, warmup_steps)

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(g):
            dtype = compute_dtype(g.dtype)
            factor = spam_warmup_factor(count, reset_interval, warmup_steps, dtype)
            return (g.astype(dtype) * factor).astype(g.dtype)

        out = jax.tree.map(leaf, updates)
        return out, optax.ScaleByScheduleState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)
