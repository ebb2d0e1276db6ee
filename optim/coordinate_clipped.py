"""The authors' placements of coordinate-wise clipping, as ready optimizers.

Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers",
https://arxiv.org/abs/2306.00204 (2023): for SGD with momentum the gradient is clipped before the
momentum; for Adam the clipped gradient feeds the *first* moment only while the second moment sees
the raw gradient (so ``chain(coordinate_clip, scale_by_adam)`` is not their Adam), and the final
update direction may be clipped as well.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.coordinate_clip import clip_top, coordinate_clip
from optim.hyperparams import check_learning_rate, check_range
from optim.moments import adam_direction, reject_complex, tree_ema


def sgd_coordinate_clipped(
    learning_rate: optax.ScalarOrSchedule,
    fraction: float | jax.Array,
    momentum: float | jax.Array = 0.9,
    *,
    nesterov: bool = False,
    threshold_scale: float | jax.Array = 1.0,
    weight_decay: float | jax.Array = 0.0,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    r"""SGD with momentum on coordinate-clipped gradients.

    :math:`\tilde g = \mathrm{clip\_top}(g + \lambda p, c, s)`,
    :math:`m \leftarrow \mu m + \tilde g`, :math:`p \leftarrow p - \eta m` (``optax.trace``;
    Nesterov optional). Weight decay, when non-zero, is L2 added before the clip.

    Args:
      learning_rate: a number >= 0 or a schedule.
      fraction: :math:`c \in [0, 1]`, the globally largest fraction of coordinates clipped.
      momentum: :math:`\mu \in [0, 1)` (0.9 by default, as in the paper's SGD baselines).
      nesterov: Nesterov momentum.
      threshold_scale: :math:`s \ge 0` (see :func:`optim.clip_top`).
      weight_decay: L2 coefficient :math:`\lambda \ge 0`.
      mask: which params get weight decay.
      axis_name: see :func:`optim.top_fraction_threshold` (``shard_map`` only).

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``).

    Raises:
      ValueError: a concrete hyperparameter out of range (the message names it).

    Non-finite gradients: a NaN counts as larger than every number, so it sets the clip
    threshold and reaches the momentum (as any NaN in SGD); skip such steps with
    ``optax.apply_if_finite(sgd_coordinate_clipped(...), max_consecutive_errors)`` (tested).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = sgd_coordinate_clipped(0.1, fraction=0.01)
      >>> state = tx.init({"w": jnp.zeros(4)})

    References:
      Pan & Li, https://arxiv.org/abs/2306.00204, 2023.
    """
    check_learning_rate(learning_rate)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        coordinate_clip(fraction, threshold_scale, axis_name=axis_name),
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )


class ScaleByAdamCoordinateClippedState(NamedTuple):
    """State of :func:`scale_by_adam_coordinate_clipped`: ``count``, ``mu`` (of clipped
    gradients), ``nu`` (of raw gradients), params-shaped."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_coordinate_clipped(
    fraction: float | jax.Array,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    update_fraction: float | jax.Array = 0.0,
    threshold_scale: float | jax.Array = 1.0,
    axis_name: str | None = None,
    state_dtype=None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    r"""Adam whose first moment sees coordinate-clipped gradients (no learning rate).

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\,\mathrm{clip\_top}(g, c),\quad
        v \leftarrow \beta_2 v + (1-\beta_2)\, g^2,\quad
        u = \mathrm{clip\_top}\Big(\frac{m/(1-\beta_1^k)}{\sqrt{v/(1-\beta_2^k)} + \epsilon},
        c_u\Big)

    with optax's (and PyTorch Adam's) inner eps; the final clip is skipped when
    :math:`c_u` = ``update_fraction`` is 0.

    Args:
      fraction: :math:`c \in [0, 1]` for the gradient entering the first moment.
      b1, b2: moment decays in [0, 1); eps >= 0.
      update_fraction: :math:`c_u \in [0, 1]` for the final direction (0: no clip).
      threshold_scale: threshold multiplier of both clips, >= 0.
      axis_name: see :func:`optim.top_fraction_threshold`.
      state_dtype: dtype of the moments (default: the params'). The maths runs in
        ``promote_types(dtype, float32)`` whatever the buffers' dtype.
      mu_dtype: dtype of the first moment only (optax's name), overriding ``state_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamCoordinateClippedState`.

    Raises:
      ValueError: a concrete hyperparameter out of range (the message names it).
      TypeError: complex params (at ``init``).

    Non-finite gradients: an Inf makes ``nu`` infinite, and that coordinate never moves again
    (as in Adam); a NaN poisons both moments. Skip such steps with
    ``optax.apply_if_finite(adam_coordinate_clipped(...), max_consecutive_errors)``, which
    leaves the whole state untouched (tested).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_adam_coordinate_clipped(0.01), optax.scale(-1e-3))
      >>> params = {"w": jnp.ones(8)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.arange(8.0)}, state, params)

    References:
      Pan & Li, Toward Understanding Why Adam Converges Faster Than SGD for Transformers,
      https://arxiv.org/abs/2306.00204, 2023.
    """
    check_range("fraction", fraction, 0.0, 1.0)
    check_range("update_fraction", update_fraction, 0.0, 1.0)
    check_range("b1", b1, 0.0, 1.0, high_open=True)
    check_range("b2", b2, 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)
    check_range("threshold_scale", threshold_scale, 0.0)

    def init_fn(params):
        reject_complex(params, "adam_coordinate_clipped")
        return ScaleByAdamCoordinateClippedState(
            jnp.zeros([], jnp.int32),
            optax.tree.zeros_like(params, mu_dtype or state_dtype),
            optax.tree.zeros_like(params, state_dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        clipped = clip_top(updates, fraction, threshold_scale, axis_name=axis_name)
        mu = tree_ema(state.mu, clipped, b1)
        nu = tree_ema(state.nu, updates, b2, order=2)
        out = jax.tree.map(
            lambda g, m, v: adam_direction(m, v, count, b1, b2, eps).astype(g.dtype),
            updates,
            mu,
            nu,
        )
        out = clip_top(out, update_fraction, threshold_scale, axis_name=axis_name)
        return out, ScaleByAdamCoordinateClippedState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adam_coordinate_clipped(
    learning_rate: optax.ScalarOrSchedule,
    fraction: float | jax.Array,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    update_fraction: float | jax.Array = 0.0,
    *,
    threshold_scale: float | jax.Array = 1.0,
    weight_decay: float | jax.Array = 0.0,
    mask: Any = None,
    axis_name: str | None = None,
    state_dtype=None,
    mu_dtype=None,
) -> optax.GradientTransformation:
    r"""Pan & Li's clipped Adam: :func:`scale_by_adam_coordinate_clipped`, decoupled weight
    decay (AdamW-style, :math:`-\eta(u + \lambda p)`), learning rate.

    .. math::
        p \leftarrow p - \eta\,\big(u + \lambda p\big)

    with :math:`u` the clipped Adam direction of :func:`scale_by_adam_coordinate_clipped`.

    Args:
      learning_rate: a number >= 0 or an optax schedule.
      fraction: :math:`c \in [0, 1]` for the gradient entering the first moment (required: it
        has no canonical default).
      b1, b2, eps, update_fraction, threshold_scale, axis_name, state_dtype, mu_dtype: see
        :func:`scale_by_adam_coordinate_clipped`.
      weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
      mask: which params decay (an ``optax.add_decayed_weights`` mask; a prefix is fine).

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``).

    Raises:
      ValueError: a concrete hyperparameter out of range (the message names it).
      TypeError: complex params (at ``init``).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = adam_coordinate_clipped(1e-3, fraction=0.01)
      >>> state = tx.init({"w": jnp.zeros(4)})

    References:
      Pan & Li, https://arxiv.org/abs/2306.00204, 2023.
    """
    check_learning_rate(learning_rate)
    check_range("weight_decay", weight_decay, 0.0)
    return optax.chain(
        scale_by_adam_coordinate_clipped(
            fraction,
            b1,
            b2,
            eps,
            update_fraction=update_fraction,
            threshold_scale=threshold_scale,
            axis_name=axis_name,
            state_dtype=state_dtype,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
