"""The FRUGAL optimizer: :func:`scale_by_frugal`, decoupled weight decay and the learning rate.

Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
Training", https://arxiv.org/abs/2411.07837 (ICML 2025).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optim.frugal.transform import scale_by_frugal
from optim.hyperparams import check_learning_rate, check_range


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
    mask: Any = None,
    projectable: Any = None,
    seed: int = 0,
    state_dtype: Any = None,
    mu_dtype: Any = None,
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
      so a scanned model walks its blocks as its unrolled twin does; unstacked leaves are
      ordered by path with the numbers in it read as numbers, so ``layers_10`` follows
      ``layers_9``); ``round(N * density)`` blocks are active: full Adam on them, the free rule
      elsewhere. Orders: ``descending`` (from the last block down, cyclically), ``ascending``,
      ``mirror`` (pairs of blocks from both ends, ``(0, N-1), (1, N-2), ...``, moving inwards
      and cycling back to the ends), ``random`` (stratified: ``round(N_c * density)`` random
      blocks of each shape class). State is allocated only for slots of active blocks: per shape
      class, the most blocks of that class ever active at once (a static schedule), so inactive
      blocks cost nothing. With ``reset_state=False`` a block that stays active across a refresh
      keeps its moments and a newly active block starts from zero (inactive blocks hold none).
    * ``columns`` / ``rows`` / ``randk`` (the fine-tuning choice): a random ``int(density * k)``
      subset of the original's columns (a Flax kernel's rows, axis -2), of the rows (axis -1), or
      of the entries of each matrix.
    * ``svd`` / ``random`` / ``randperm`` (GaLore-style), for a Flax kernel :math:`G` of
      ``(in, out) = (m, n)``: the original's rule on its PyTorch ``(out, in)`` weight, so with
      :math:`n \ge m` (square kernels included) the left factor :math:`A` (``round(m *
      density)`` columns of :math:`U`, a random orthonormal basis, or a random selection) and
      :math:`\downarrow G = A^\top G,\ \uparrow L = A L`; else the right factor :math:`B`
      (``round(n * density)`` rows of :math:`V^\top`) and :math:`\downarrow G = G B^\top,\
      \uparrow L = L B`. SVD in ``promote_types(param dtype, float32)``.

    ``frugal(lr, projection='svd', free_rule='none', reset_state=False)`` is the GaLore baseline.
    It differs from ``optax.contrib.galore`` in the rank (``density`` times the smaller
    dimension, not an absolute rank) and in the residual and resets it can add; with the same
    rank and side the two compute the same update (tested on a square kernel).

    Non-finite gradients: a NaN or Inf gradient poisons the moments it reaches (regular params'
    and the active subspace's, as in Adam). Skip such steps with
    ``optax.apply_if_finite(frugal(...), max_consecutive_errors)``, which leaves the whole state
    (refresh count and key included) untouched (tested).

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
      weight_decay: decoupled weight decay (as ``optax.adamw``).
      mask: which params decay (an ``optax.add_decayed_weights`` mask, a prefix is fine);
        default all.
      projectable: a bool pytree or callable of the params choosing the projectable leaves;
        default :func:`default_projectable`. Matrix modes need 2-D leaves or 3-D stacks.
      seed: seed of the random choices (a key in the state).
      state_dtype, mu_dtype: see :func:`scale_by_frugal`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``) whose first state is a
      :class:`FrugalState`.

    Raises:
      ValueError: ``density`` outside (0, 1], ``update_gap`` < 1, an unknown projection, order or
        rule, a projectable leaf that is not a matrix in a matrix mode, ``mirror`` with an odd
        number of active blocks (the message names the argument and the value).
      TypeError: complex params (at ``init``).

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
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
