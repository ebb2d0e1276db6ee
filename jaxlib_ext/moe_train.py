"""Training a MoE model under a sharded strategy (ep, fsdp, fssdp): state, step, re-sharding.

The composition of :class:`parallel.moe.MoeStrategy` with the train state of
:mod:`jaxlib_ext.train`::

    strategy = MoeStrategy("fssdp", mesh, slots=8)
    model = LanguageModel(config, moe_strategy=strategy)         # num_experts > 0, unrolled
    shardings = moe_train_state_shardings(model, tx, mesh)       # experts split over the mesh
    state = init_moe_train_state(model, tx, shardings, seed=0)
    step = make_moe_train_step(model, tx, shardings, batch_sharding(mesh))
    reshard = make_moe_reshard(model, tx, shardings)             # Algorithm 2, when due
    state, metrics = step(state, batch)

:class:`MoeTrainState` adds ``moe``, each MoE layer's :class:`parallel.moe.MoeLayerState` (owner
order and load window), to the train state. The step slides the load windows; the placement
changes inside the one compiled step. :func:`make_moe_reshard` is a second program (run every
``reshard_every`` steps by the loop): it re-assigns expert ownership from the loads and permutes
the expert rows of the parameters AND of every optimizer-state buffer of them, and the recorded
order, together. Checkpoints hold the order, so a state restores as saved under any strategy and
device count; :func:`canonical_expert_layouts` restores it in canonical expert order (e.g. into
the dense reference model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlib_ext.checkpoint.layouts import PermuteAxis
from jaxlib_ext.train import (
    TrainState,
    apply_optimizer,
    init_train_state,
    train_state_shardings,
)
from parallel.moe.resharding import balanced_order, reorder_index
from parallel.rules import path_names, state_param_paths

EXPERT_WEIGHTS = ("wi", "wo")


class MoeTrainState(TrainState):
    """A :class:`jaxlib_ext.train.TrainState` with the MoE layers' strategy state.

    Attributes:
      moe: ``{"blocks": {i: {"mlp": MoeLayerState}}}`` (owner order and load window per layer).
    """

    moe: Any


def _strategy(model: Any):
    if getattr(model, "moe_strategy", None) is None:
        raise ValueError("`model` must be a LanguageModel built with moe_strategy=..., got none")
    return model.moe_strategy


def moe_train_state_shardings(
    model: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: Any = None
) -> MoeTrainState:
    """Shardings of the whole state: the expert axis over the strategy's axes (its
    :meth:`~parallel.moe.MoeStrategy.rules`), the rest by ``rules``, the MoE state replicated."""
    strategy = _strategy(model)
    base = train_state_shardings(model, tx, mesh, strategy.rules() if rules is None else rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    moe = jax.tree.map(lambda _: replicated, model.init_moe_state())
    return MoeTrainState(base.step, base.params, base.opt_state, moe)


def init_moe_train_state(
    model: Any, tx: optax.GradientTransformation, shardings: MoeTrainState, *, seed: int = 0
) -> MoeTrainState:
    """A fresh state in its shardings: identity owner order, empty load windows."""
    base = init_train_state(model, tx, shardings, seed=seed)
    moe = jax.device_put(model.init_moe_state(), shardings.moe)
    return MoeTrainState(base.step, base.params, base.opt_state, moe)


def abstract_moe_train_state(
    model: Any, tx: optax.GradientTransformation, shardings: MoeTrainState
) -> MoeTrainState:
    """Shapes, dtypes and shardings of the state: a checkpoint restore target."""
    abstract = jax.eval_shape(lambda: init_moe_train_state(model, tx, shardings))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def moe_metrics(stats: dict) -> dict[str, jax.Array]:
    """Per-step balance and traffic figures from the layers' :class:`MoeLayerStats`.

    ``moe_load_imbalance``: max/mean token copies computed per device, averaged over layers
    (1.0 is perfect balance; the straggler metric); ``moe_load_imbalance_max``: the worst layer;
    ``moe_rows_sent``: token copies sent to another device, per device, summed over layers;
    ``moe_expert_copies``: experts materialized per device, summed over layers.
    """
    layers = [layer["mlp"] for layer in stats["blocks"].values()]
    imbalance = jnp.stack([jnp.max(s.rows) / jnp.maximum(jnp.mean(s.rows), 1.0) for s in layers])
    return {
        "moe_load_imbalance": jnp.mean(imbalance),
        "moe_load_imbalance_max": jnp.max(imbalance),
        "moe_rows_sent": sum(jnp.mean(s.sent) for s in layers),
        "moe_expert_copies": sum(jnp.mean(s.copies) for s in layers),
    }


def make_moe_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    shardings: MoeTrainState,
    batch_shardings: NamedSharding,
    *,
    aux_weight: float | None = None,
) -> Callable[[MoeTrainState, jax.Array], tuple[MoeTrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch [B, T + 1]) -> (state, metrics)`` that donates ``state``.

    The loss is :func:`jaxlib_ext.train.lm_loss`'s (cross-entropy plus ``aux_weight`` times the
    load-balancing loss); ``metrics`` adds :func:`moe_metrics` to the train step's.
    """
    strategy = _strategy(model)
    weight = model.config.router_aux_weight if aux_weight is None else aux_weight
    replicated = NamedSharding(batch_shardings.mesh, PartitionSpec())

    def loss_fn(params, batch, moe):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux, stats = model.apply_moe(params, inputs, moe)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + weight * aux, (ce, aux, stats)

    def step(state: MoeTrainState, batch: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (ce, aux, stats)), grads = grad_fn(state.params, batch, state.moe)
        params, opt_state, metrics = apply_optimizer(tx, state, grads, loss, batch)
        moe = {
            "blocks": {
                i: {"mlp": strategy.next_layer_state(layer["mlp"], stats["blocks"][i]["mlp"])}
                for i, layer in state.moe["blocks"].items()
            }
        }
        metrics = {**metrics, "cross_entropy": ce, "aux_loss": aux, **moe_metrics(stats)}
        return MoeTrainState(state.step + 1, params, opt_state, moe), metrics

    return jax.jit(
        step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def _expert_layer(path: str | None) -> tuple[int, str] | None:
    """``"blocks/3/mlp/wi"`` -> ``(3, "wi")``; None for anything else."""
    if path is None:
        return None
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "mlp":
        if parts[3] in EXPERT_WEIGHTS:
            return int(parts[1]), parts[3]
    return None


def _check_permutable(opt_state: Any, params: Any) -> None:
    """Re-sharding permutes parameter-shaped buffers only, so every other non-scalar
    optimizer buffer (FRUGAL's subspace pools and indices, adafactor's factored moments...),
    which may index or mix expert rows, is an error rather than a silent corruption."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    owners = treedef.flatten_up_to(state_param_paths(opt_state, params))
    for (path, leaf), owner in zip(leaves, owners, strict=True):
        if owner is None and len(getattr(leaf, "shape", ())) > 0:
            names = "/".join(map(str, path_names(path)))
            raise ValueError(
                f"optimizer state leaf {names!r} (shape {tuple(leaf.shape)}) is not shaped like "
                "a parameter, so re-sharding cannot tell whether it indexes experts; use "
                "reshard_every=0 with this optimizer"
            )


def make_moe_reshard(
    model: Any, tx: optax.GradientTransformation, shardings: MoeTrainState
) -> Callable[[MoeTrainState], MoeTrainState]:
    """A jitted ``reshard(state) -> state`` (donating) applying Algorithm 2 to every MoE layer.

    Each layer's new owner order comes from its load window
    (:func:`parallel.moe.balanced_order`); the expert rows of ``wi``, ``wo`` and every
    optimizer-state buffer of them move with one permutation, and ``moe[...].order`` records
    it. The maths of the model is unchanged (the router stays canonical).

    Raises:
      ValueError: a non-scalar optimizer buffer that is not shaped like a parameter.
    """
    strategy = _strategy(model)
    params = model.abstract_params
    opt_abstract = jax.eval_shape(tx.init, params)
    _check_permutable(opt_abstract, params)
    owners = state_param_paths(opt_abstract, params)

    def reshard(state: MoeTrainState) -> MoeTrainState:
        index, moe = {}, {"blocks": {}}
        for i, layer in state.moe["blocks"].items():
            current = layer["mlp"]
            loads = jnp.mean(current.loads, axis=0)
            order = balanced_order(loads, strategy.num_devices, strategy.hot_experts)
            index[i] = reorder_index(current.order, order)
            moe["blocks"][i] = {"mlp": current._replace(order=order)}

        def move(path, x):
            owner = _expert_layer("/".join(map(str, path_names(path))))
            return x if owner is None else jnp.take(x, index[owner[0]], axis=0)

        new_params = jax.tree_util.tree_map_with_path(move, state.params)

        def move_state(x, owner):
            layer = _expert_layer(owner)
            return x if layer is None else jnp.take(x, index[layer[0]], axis=0)

        leaves, treedef = jax.tree.flatten(state.opt_state)
        owner_list = treedef.flatten_up_to(owners)
        moved = [move_state(x, o) for x, o in zip(leaves, owner_list, strict=True)]
        opt_state = treedef.unflatten(moved)
        return MoeTrainState(state.step, new_params, opt_state, moe)

    return jax.jit(reshard, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)


def canonical_expert_layouts(moe_state: dict) -> list[PermuteAxis]:
    """Checkpoint layouts that restore expert weights (and their optimizer buffers) in canonical
    expert order, from a restored ``state.moe`` (as saved): pass them to
    ``Checkpointer.restore(target, layouts=...)``, e.g. to restore into the dense reference."""
    layouts = []
    for i, layer in moe_state["blocks"].items():
        order = np.asarray(jax.device_get(layer["mlp"].order))
        perm = tuple(int(j) for j in np.argsort(order, kind="stable"))
        pattern = f"*blocks/{i}/mlp/w[io]"
        layouts.append(PermuteAxis(pattern, perm, record=f"moe/blocks/{i}/mlp/order"))
    return layouts
