"""Train state and a pure, jitted, sharded train step that takes any optax transform.

The pieces compose as follows (``model`` is any object with ``abstract_params``, ``logical_axes``
and ``init(seed)``, e.g. :class:`jaxlib_ext.model.LanguageModel`)::

    mesh = make_mesh({"data": 2, "fsdp": 4})
    shardings = train_state_shardings(model, tx, mesh)          # derived from the rules table
    state = init_train_state(model, tx, shardings, seed=0)      # born sharded, never gathered
    step = make_train_step(lm_loss(model), tx, shardings, batch_sharding(mesh))
    state, metrics = step(state, shard_batch(tokens, batch_sharding(mesh)))

Parameters and optimizer buffers are split over the ``fsdp`` mesh axis through their ``embed``
dimension (ZeRO-3 / FSDP), the batch over ``data`` x ``fsdp``; XLA's SPMD partitioner inserts the
all-gathers and gradient reductions. The step donates the state, so the old buffers are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.rules import (
    DEFAULT_RULES,
    Rules,
    derive_state_shardings,
    logical_sharding,
    tree_shardings,
)

LossFn = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree.

    Attributes:
      step: number of updates applied so far (int32 scalar).
      params: the parameters (a nested dict of arrays).
      opt_state: the optax state of ``tx``.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def train_state_shardings(
    model: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> TrainState:
    """The sharding of every leaf of the train state, derived from the rules table.

    Raises:
      ValueError: a parameter dimension is not divisible by the mesh axes it is split over (the
        message names the parameter).
    """
    params = model.abstract_params
    param_shardings = tree_shardings(params, model.logical_axes, mesh, rules)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_shardings = derive_state_shardings(opt_abstract, params, param_shardings, mesh)
    return TrainState(NamedSharding(mesh, PartitionSpec()), param_shardings, opt_shardings)


def init_train_state(
    model: Any, tx: optax.GradientTransformation, shardings: TrainState, *, seed: int = 0
) -> TrainState:
    """A fresh train state, created directly in its shardings (no full copy on any device)."""
    params = jax.jit(model.init, static_argnums=0, out_shardings=shardings.params)(int(seed))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step, params, opt_state)


def abstract_train_state(
    model: Any, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """The train state's shapes, dtypes and shardings, without creating it: a checkpoint
    restore target (``Checkpointer.restore(abstract_train_state(model, tx, shardings))``) for
    any mesh the ``shardings`` were derived for."""
    abstract = jax.eval_shape(lambda: init_train_state(model, tx, shardings))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def batch_sharding(
    mesh: Mesh, rules: Rules = DEFAULT_RULES, *, global_batch: int | None = None
) -> NamedSharding:
    """Sharding of a ``[batch, tokens]`` array: the batch over the rules' ``batch`` axes.

    Raises:
      ValueError: ``global_batch`` (when given) is not divisible by those axes.
    """
    shape = (global_batch if global_batch is not None else 0, 1)
    return logical_sharding(shape, ("batch", None), mesh, rules, name="the batch")


def shard_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` from a host batch that every process holds whole.

    Each process copies only the rows its devices own, so this works unchanged with several
    processes (``jax.distributed``).
    """
    batch = np.asarray(batch)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def lm_loss(model: Any, *, aux_weight: float | None = None) -> LossFn:
    """Next-token cross-entropy (nats per token) of a batch ``[B, T + 1]`` of token ids.

    The MoE load-balancing loss is added with ``aux_weight`` (default: the model config's
    ``router_aux_weight``). Returns ``loss_fn(params, batch) -> (loss, metrics)``.
    """
    weight = model.config.router_aux_weight if aux_weight is None else aux_weight

    def loss_fn(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = model.apply(params, inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + weight * aux, {"cross_entropy": ce, "aux_loss": aux}

    return loss_fn


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    batch_shardings: NamedSharding,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``train_step(state, batch) -> (state, metrics)`` that donates ``state``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (loss, metrics)``, e.g. :func:`lm_loss`.
      tx: any optax transform (a chain, ``inject_hyperparams``, ``MultiSteps``...).
      shardings: the train state's shardings (:func:`train_state_shardings`).
      batch_shardings: the batch's sharding (:func:`batch_sharding`).

    Returns:
      The step. ``metrics`` holds ``loss``, ``grad_norm``, ``update_norm``, ``param_norm``,
      ``tokens`` (targets in the batch) and whatever ``loss_fn`` reports; tokens per second is
      a wall-clock figure, so the training loop computes it from ``tokens``.
    """
    replicated = NamedSharding(batch_shardings.mesh, PartitionSpec())

    def train_step(state: TrainState, batch: jax.Array):
        (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        params, opt_state, metrics = apply_optimizer(tx, state, grads, loss, batch)
        return TrainState(state.step + 1, params, opt_state), {**metrics, **extra}

    return jax.jit(
        train_step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def apply_optimizer(
    tx: optax.GradientTransformation, state: Any, grads: Any, loss: jax.Array, batch: jax.Array
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer update of ``state.params`` / ``state.opt_state`` from ``grads``, inside a
    jitted step: ``(params, opt_state, metrics)`` with ``loss``, ``grad_norm``, ``update_norm``,
    ``param_norm`` and ``tokens`` (targets in the batch ``[B, T + 1]``)."""
    # optax's own transforms mix Python floats with int32 counters (``b1 ** count``), which
    # jax_numpy_dtype_promotion="strict" rejects; the user's transform runs under standard
    # promotion whatever the global setting (the model and loss stay under the user's).
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        "tokens": jnp.asarray(batch.shape[0] * (batch.shape[1] - 1), jnp.int32),
    }
    return params, opt_state, metrics
