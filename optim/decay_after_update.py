"""Decoupled weight decay applied to the *updated* params, exactly, as SPAM's authors do.

Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
https://arxiv.org/abs/2501.06842 (ICLR 2025).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim.hyperparams import check_learning_rate, check_range
from optim.moments import compute_dtype


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def scale_and_decay_after_update(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float | jax.Array = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    r"""``-lr * d`` then decoupled weight decay applied to the *updated* params, exactly.

    For an incoming direction :math:`d` and params :math:`p`:
    :math:`p' = p - \eta d`, then :math:`p'' = p' - \eta\lambda p'`, so the update is
    :math:`-\eta d - \eta\lambda (p - \eta d)`. (``chain(add_decayed_weights, scale_by_lr)``
    decays the *old* params, which differs by :math:`O(\eta^2\lambda)`.) ``mask`` selects the
    params that decay: a bool pytree with the params' structure or a prefix of it (one bool for a
    subtree), or a callable of the params returning one, as in ``optax.adamw``. The learning
    rate may be a schedule of the update count. Computed in ``promote_types(dtype, float32)``.
    """
    check_learning_rate(learning_rate)
    check_range("weight_decay", weight_decay, 0.0)

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_and_decay_after_update needs `params` in update()")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decays = mask(params) if callable(mask) else mask
        if decays is None:
            decays = True
        decays = jax.tree.map(  # a prefix mask: one bool for a whole subtree
            lambda flag, sub: jax.tree.map(lambda _: flag, sub),
            decays,
            params,
            is_leaf=_is_masked,
        )

        def leaf(d, p, decay):
            dtype = compute_dtype(d.dtype, p.dtype)
            lr_, wd_ = jnp.asarray(lr).astype(dtype), jnp.asarray(weight_decay).astype(dtype)
            step = -lr_ * d.astype(dtype)
            if decay:
                step = step - lr_ * wd_ * (p.astype(dtype) + step)
            return step.astype(d.dtype)

        out = jax.tree.map(leaf, updates, params, decays)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
