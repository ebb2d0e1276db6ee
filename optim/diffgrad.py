"""diffGrad: Adam whose step is damped where the gradient changes slowly.

Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks",
https://arxiv.org/abs/1909.11015 (IEEE TNNLS 2020). Ported from the authors' fixed
``diffGrad_v2.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.hyperparams import check_learning_rate, check_range
from optim.moments import adam_direction, after, compute_dtype, reject_complex, tree_ema


class ScaleByDiffGradState(NamedTuple):
    """State of :func:`scale_by_diffgrad`.

    Attributes:
      count: number of updates so far (int32).
      mu: first moment EMA, shaped like the params.
      nu: second moment EMA, shaped like the params.
      prev_grad: the gradient of the previous step (zeros before the first), like the params.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    prev_grad: optax.Updates


def scale_by_diffgrad(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    state_dtype=None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    r"""Rescales updates by diffGrad's friction-damped Adam direction (no learning rate).

    With :math:`k` the 1-based step, :math:`g_k` the incoming update and :math:`g_0 = 0`:

    .. math::
        m_k = \beta_1 m_{k-1} + (1-\beta_1) g_k,\quad
        v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2,\quad
        \xi_k = \sigma(|g_{k-1} - g_k|)\\
        u_k = \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}\,\frac{m_k\,\xi_k}{\sqrt{v_k} + \epsilon}

    with :math:`\sigma` the logistic sigmoid (so :math:`\xi \in [0.5, 1)`) and the *outer* eps of
    the original (not optax's :math:`\hat m / (\sqrt{\hat v} + \epsilon)`). The friction is not
    stored in :math:`m`. On the first step :math:`\xi_1 = \sigma(|g_1|)`, not 0.5.

    Differences from the authors' code: none in the maths. Their first version aliased the
    previous gradient to the live gradient tensor (so :math:`\xi = 0.5` after step 1, i.e. Adam at
    half the learning rate); this is the fixed ``diffGrad_v2`` behaviour.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v}`, >= 0.
      state_dtype: dtype of the three buffers (default: each param's dtype); float32 with
        bfloat16 params keeps full-precision moments. The maths runs in
        ``promote_types(dtype, float32)`` whatever the buffers' dtype.
      mu_dtype: dtype of the first moment only (optax's name), overriding ``state_dtype``.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`ScaleByDiffGradState`.

    Raises:
      ValueError: a concrete hyperparameter out of range (the message names it).
      TypeError: complex params (at ``init``).

    Non-finite gradients: a NaN or Inf gradient makes ``mu``, ``nu`` and ``prev_grad``
    non-finite for good (as in Adam); skip such steps with
    ``optax.apply_if_finite(diffgrad(...), max_consecutive_errors)``, which leaves the whole
    state untouched on a non-finite step (tested).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_diffgrad(), optax.scale(-1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)

    References:
      Dubey et al., diffGrad: An Optimization Method for Convolutional Neural Networks,
      https://arxiv.org/abs/1909.11015, 2019.
    """
    check_range("b1", b1, 0.0, 1.0, high_open=True)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)

    def init_fn(params):
        reject_complex(params, "diffgrad")
        return ScaleByDiffGradState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, mu_dtype or state_dtype),
            nu=optax.tree.zeros_like(params, state_dtype),
            prev_grad=optax.tree.zeros_like(params, state_dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = tree_ema(state.mu, updates, b1)
        nu = tree_ema(state.nu, updates, b2, order=2)

        def direction(g, prev, m, v):
            dtype = compute_dtype(g.dtype, prev.dtype, m.dtype, v.dtype)
            friction = jax.nn.sigmoid(jnp.abs(prev.astype(dtype) - g.astype(dtype)))
            u = adam_direction(m, v, count, b1, b2, eps, outer_eps=True, scale=friction)
            return u.astype(g.dtype)

        out = jax.tree.map(direction, updates, state.prev_grad, mu, nu)
        # `after`: write the new previous gradient only once the direction has read the old one
        # (otherwise XLA copies the donated buffer every step; see optim.moments.after).
        prev = jax.tree.map(
            lambda g, p, u: after(g.astype(p.dtype), u), updates, state.prev_grad, out
        )
        return out, ScaleByDiffGradState(count, mu, nu, prev)

    return optax.GradientTransformation(init_fn, update_fn)


def diffgrad(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    *,
    decoupled_weight_decay: bool = False,
    mask=None,
    state_dtype=None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    r"""The diffGrad optimizer: :func:`scale_by_diffgrad` times the learning rate, with L2.

    As in the original, weight decay is a coupled L2 term added to the gradient *before* the
    moments (and before the previous-gradient memory): :math:`g \leftarrow g + \lambda p`, then
    :math:`p \leftarrow p - \eta\, u`. With ``decoupled_weight_decay=True`` it is AdamW-style
    instead: :math:`p \leftarrow p - \eta\,(u + \lambda p)`.

    Args:
      learning_rate: a number >= 0 or an ``optax`` schedule.
      b1, b2, eps: see :func:`scale_by_diffgrad`.
      weight_decay: L2 (or decoupled) weight decay, >= 0.
      decoupled_weight_decay: AdamW-style decay instead of the original's L2.
      mask: which params get weight decay (an ``optax.add_decayed_weights`` mask).
      state_dtype, mu_dtype: see :func:`scale_by_diffgrad`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = diffgrad(1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Dubey et al., diffGrad: An Optimization Method for Convolutional Neural Networks,
      https://arxiv.org/abs/1909.11015, 2019.
    """
    check_learning_rate(learning_rate)
    check_range("weight_decay", weight_decay, 0.0)
    direction = scale_by_diffgrad(b1, b2, eps, state_dtype=state_dtype, mu_dtype=mu_dtype)
    if decoupled_weight_decay:
        return optax.chain(
            direction,
            optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(learning_rate),
        )
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        direction,
        optax.scale_by_learning_rate(learning_rate),
    )
