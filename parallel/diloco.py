"""DiLoCo and Streaming DiLoCo: replicas that train alone and synchronize fragments in turn.

Douillard et al., *DiLoCo: Distributed Low-Communication Training of Language Models*, arXiv
2311.08105 (2023); Douillard et al., *Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch*, arXiv 2501.18512 (2025).

``M`` replicas each hold a copy of the model (and may themselves be data x FSDP parallel over their
own devices) and train it with any optax *inner* optimizer on their own data. The parameters are
split into ``P`` fragments (:mod:`parallel.fragments`); every ``H / P`` inner steps one fragment
``p`` (in turn) is synchronized, so every fragment is synchronized once per ``H`` steps:

* at step ``t`` (``t`` inner steps done, ``t % (H/P) == 0``, ``p = (t / (H/P) - 1) mod P``)
  each replica's *outer gradient* of the fragment, ``Delta_m = theta_global_p - theta_m_p``, is
  averaged over the replicas through the replica mesh axis, quantized to ``exchange_dtype`` on
  the wire (:func:`parallel.exchange.replica_mean`), ``Delta = mean_m Delta_m``;
* ``tau`` inner steps later (``overlap``; the replicas keep training meanwhile) the fragment's
  outer optimizer (any optax transform; by default SGD with Nesterov momentum) updates the
  global copy, ``theta_global_p <- OuterOpt(theta_global_p, Delta)``, and every replica merges
  it: ``theta_m_p <- alpha * theta_m_p + (1 - alpha) * theta_global_p``.

``P = 1, tau = 0, alpha = 0`` is DiLoCo. Each fragment has its own outer optimizer state (its
own momentum and counters). Inner optimizer states are never reset. The global copy and the outer
gradients are kept in ``promote_types(param dtype, float32)``.

**One program.** Replicas are a leading ``[M, ...]`` axis of the parameters and inner optimizer
state, sharded over the ``replica_axis`` of the mesh (the rest of each leaf keeps the sharding its
rules give it inside a replica). The whole step (``M`` inner steps as one ``vmap``, then the sync
due at that step chosen with ``lax.switch`` by the step counter) is one compiled program for
every ``t``. Only the sync branches move bytes across the replica axis, and only the fragment's
quantized outer gradient (an explicit ``shard_map`` collective); see
:func:`parallel.exchange.exchange_wire_bytes` for the exact figures. The price of one program:
the state the switch may change (replicas, global copy, outer states, outer gradients in flight)
passes through it on every step, and XLA:CPU copies what its untaken branches pass through
(x1.09-1.12 step time measured at 3.3 M parameters on 2 devices, ``benchmarks/RESULTS.md``);
:mod:`parallel.diloco_async` runs the same updates as separate programs without that cost.

**Non-finite outer gradients** are a documented skip, never a corrupted global copy: when the
averaged outer gradient of a fragment has a NaN or Inf (some replica diverged), the global copy
and the fragment's outer state stay as they were, every replica's fragment is reset to the
global copy, and ``skipped_syncs`` counts it. (Compose the inner optimizer with
``optax.apply_if_finite`` to keep NaN out of the inner states too.)

**Data parallelism** across replicas (``sync="ddp"``, the baseline) uses the same state and
exchange: the replicas' gradients are averaged (in ``exchange_dtype``) every step and the inner
optimizer applies the mean, so the replicas stay identical.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.exchange import compute_dtype, replica_mean
from parallel.fragments import Fragment
from parallel.quantize import FORMATS
from parallel.rules import derive_state_shardings

SYNC_MODES = ("ddp", "diloco")


@dataclasses.dataclass(frozen=True)
class DilocoConfig:
    """Static configuration of (Streaming) DiLoCo.

    Attributes:
      replicas: ``M >= 1``, the size of the mesh's ``replica_axis``.
      sync_every: ``H``, inner steps between two synchronizations of the same fragment.
      fragments: ``P``, fragments synchronized in turn; ``H`` must be divisible by ``P``.
      overlap: ``tau``, inner steps between sending a fragment's outer gradient and applying it,
        ``0 <= tau < H / P``.
      alpha: merge factor, ``0 <= alpha <= 1`` (0 overwrites the replica's fragment with the
        global copy; the paper uses 0.5 with ``tau > 0``).
      exchange_dtype: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"e3m0"`` (4-bit: sign and 3
        exponent bits, a float32 scale per ``block_size`` elements, two values per byte).
      block_size: elements per quantization scale.
      replica_axis: the mesh axis the replicas are laid on.
      sync: ``"diloco"`` (the above) or ``"ddp"`` (average the gradients every step).
    """

    replicas: int = 2
    sync_every: int = 100
    fragments: int = 1
    overlap: int = 0
    alpha: float = 0.0
    exchange_dtype: str = "fp32"
    block_size: int = 256
    replica_axis: str = "replica"
    sync: str = "diloco"

    def __post_init__(self):
        for name in ("replicas", "sync_every", "fragments", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {name}={value!r}")
        if self.sync_every % self.fragments:
            raise ValueError(
                f"`sync_every` must be divisible by `fragments`, got sync_every="
                f"{self.sync_every}, fragments={self.fragments}"
            )
        period = self.sync_every // self.fragments
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < period:
            raise ValueError(
                f"`overlap` must be an int in [0, sync_every / fragments = {period}), got "
                f"overlap={self.overlap!r}"
            )
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got alpha={self.alpha!r}")
        if self.exchange_dtype not in FORMATS:
            raise ValueError(
                f"`exchange_dtype` must be one of {FORMATS}, got "
                f"exchange_dtype={self.exchange_dtype!r}"
            )
        if self.sync not in SYNC_MODES:
            raise ValueError(f"`sync` must be one of {SYNC_MODES}, got sync={self.sync!r}")

    @property
    def period(self) -> int:
        """``H / P``: inner steps between two synchronizations (of consecutive fragments)."""
        return self.sync_every // self.fragments


def outer_optimizer(
    learning_rate: optax.ScalarOrSchedule = 0.7, momentum: float = 0.9
) -> optax.GradientTransformation:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum (``optax.sgd``).

    The DiLoCo paper uses ``learning_rate=0.7, momentum=0.9``; Streaming DiLoCo uses 0.4. With
    ``momentum=0`` it is plain SGD, and ``learning_rate=1`` then sets the global copy to the
    replicas' mean.
    """
    if not momentum:
        return optax.sgd(learning_rate)
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


class DilocoState(struct.PyTreeNode):
    """The state of every replica and of the global copy, as one pytree.

    Attributes:
      step: inner steps done (int32 scalar).
      params: the replicas' parameters, every leaf ``[M, ...]``.
      opt_state: the replicas' inner optimizer states, every leaf ``[M, ...]``.
      global_params: the global copy (one model, ``promote_types(dtype, float32)``); None for
        ``sync="ddp"``.
      outer_opt_state: one outer optimizer state per fragment (over that fragment's arrays).
      pending: with ``overlap > 0``, per fragment ``(averaged outer gradients, finite)`` of
        the exchange in flight (sent, not applied yet); ``()`` otherwise.
      skipped_syncs: synchronizations skipped for a non-finite outer gradient (int32).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    global_params: Any
    outer_opt_state: tuple
    pending: tuple
    skipped_syncs: jax.Array


def _compute_dtype(x: Any) -> jnp.dtype:
    return compute_dtype(x.dtype)


def stack_sharding(sharding: NamedSharding, axis: str) -> NamedSharding:
    """``sharding`` with a new leading dimension split over mesh axis ``axis``."""
    return NamedSharding(sharding.mesh, PartitionSpec(axis, *sharding.spec))


def init_diloco_state(
    params: Any,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation | None,
    config: DilocoConfig,
    fragments: Sequence[Fragment],
) -> DilocoState:
    """A fresh state: ``M`` identical replicas of ``params`` (and of the inner state), the
    global copy, one outer state per fragment. Pure: jit it with ``out_shardings``
    (:func:`diloco_state_shardings`) to create it sharded."""
    m = config.replicas
    stack = lambda x: jnp.broadcast_to(x, (m, *x.shape))
    inner = inner_tx.init(params)
    zero = jnp.zeros((), jnp.int32)
    if config.sync == "ddp":
        return DilocoState(
            zero, jax.tree.map(stack, params), jax.tree.map(stack, inner), None, (), (), zero
        )
    global_params = jax.tree.map(lambda x: x.astype(_compute_dtype(x)), params)
    leaves = jax.tree.leaves(global_params)
    outer = tuple(outer_tx.init(f.take(leaves)) for f in fragments)
    pending = ()
    if config.overlap:
        pending = tuple(
            ([jnp.zeros_like(x) for x in f.take(leaves)], jnp.ones((), jnp.bool_))
            for f in fragments
        )
    return DilocoState(
        zero,
        jax.tree.map(stack, params),
        jax.tree.map(stack, inner),
        global_params,
        outer,
        pending,
        zero,
    )


def diloco_state_shardings(
    params: Any,
    param_shardings: Any,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation | None,
    config: DilocoConfig,
    fragments: Sequence[Fragment],
    mesh: Mesh,
) -> DilocoState:
    """The sharding of every leaf of the state.

    Args:
      params: one model's parameters (``ShapeDtypeStruct``s suffice).
      param_shardings: their shardings on ``mesh`` inside a replica (from the rules; they must
        not use ``config.replica_axis``).

    Returns:
      A :class:`DilocoState` of ``NamedSharding``s: replica-stacked leaves split over
      ``replica_axis`` first, then as their parameter; the global copy, outer states and
      pending outer gradients as the parameters (replicated over the replicas); counters
      replicated.
    """
    axis = config.replica_axis
    if axis not in mesh.axis_names or mesh.shape[axis] != config.replicas:
        raise ValueError(
            f"the mesh needs an axis {axis!r} of size replicas={config.replicas}, got "
            f"{dict(mesh.shape)}"
        )
    for sharding in jax.tree.leaves(param_shardings):
        if axis in jax.tree.leaves(tuple(sharding.spec)):
            raise ValueError(f"parameter shardings must not use the replica axis {axis!r}")
    inner_abstract = jax.eval_shape(inner_tx.init, params)
    inner = derive_state_shardings(inner_abstract, params, param_shardings, mesh)
    stacked = lambda tree: jax.tree.map(lambda s: stack_sharding(s, axis), tree)
    scalar = NamedSharding(mesh, PartitionSpec())
    if config.sync == "ddp":
        return DilocoState(scalar, stacked(param_shardings), stacked(inner), None, (), (), scalar)
    leaves, sh_leaves = jax.tree.leaves(params), jax.tree.leaves(param_shardings)
    outer = []
    for f in fragments:
        for p in f.pieces:
            if p.rows is not None and sh_leaves[p.leaf].spec and sh_leaves[p.leaf].spec[0]:
                raise ValueError(
                    f"the layer axis of the scanned parameter {p.path} is sharded "
                    f"({sh_leaves[p.leaf].spec}); fragments take its rows, keep it replicated"
                )
        pieces = [
            jax.ShapeDtypeStruct(p.shape(leaves[p.leaf].shape), _compute_dtype(leaves[p.leaf]))
            for p in f.pieces
        ]
        piece_sh = [sh_leaves[p.leaf] for p in f.pieces]
        abstract = jax.eval_shape(outer_tx.init, pieces)
        outer.append(derive_state_shardings(abstract, pieces, piece_sh, mesh))
    pending = ()
    if config.overlap:
        pending = tuple(([sh_leaves[p.leaf] for p in f.pieces], scalar) for f in fragments)
    return DilocoState(
        scalar,
        stacked(param_shardings),
        stacked(inner),
        param_shardings,
        tuple(outer),
        pending,
        scalar,
    )


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    out: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        out += [entry] if isinstance(entry, str) else list(entry)
    return tuple(out)


def outer_gradients(f: Fragment, global_leaves: list, local_leaves: list) -> list[jax.Array]:
    """Every replica's outer gradient of fragment ``f``: ``theta_global - theta_m``, stacked
    ``[M, ...]`` in the global copy's dtype (local: no communication)."""
    return [
        g[None] - x.astype(g.dtype)
        for g, x in zip(f.take(global_leaves), f.take(local_leaves, axis=1), strict=True)
    ]


def make_exchange(config: DilocoConfig, mesh: Mesh, specs: list[PartitionSpec]):
    """``outer gradients [M, ...] -> (their mean over replicas, divergence [M], finite)`` for
    arrays sharded as ``specs`` inside a replica, as a ``shard_map`` over every mesh axis.

    The mean is :func:`parallel.exchange.replica_mean` in ``config.exchange_dtype``: the only
    bytes that cross the replica axis. The divergence (each replica's ``||Delta_m||``) and the
    finiteness flag of the mean are reduced over the axes inside a replica."""
    axis = config.replica_axis
    local_specs = [PartitionSpec(axis, *s) for s in specs]

    def body(stacked):
        deltas = [x[0] for x in stacked]
        mean = replica_mean(
            deltas,
            axis_name=axis,
            num_replicas=config.replicas,
            fmt=config.exchange_dtype,
            block_size=config.block_size,
        )
        # one psum per set of sharded axes (a value is summed over the axes it varies on)
        squares, bad = {}, {}
        for d, x, spec in zip(deltas, mean, specs, strict=True):
            axes = _spec_axes(spec)
            sq = jnp.sum(jnp.square(d.astype(jnp.float32)))
            squares[axes] = squares.get(axes, 0.0) + sq
            bad[axes] = bad.get(axes, 0) + jnp.sum(~jnp.isfinite(x)).astype(jnp.int32)
        reduce = lambda v, axes: jax.lax.psum(v, axes) if axes else v
        squares = sum(reduce(v, axes) for axes, v in squares.items())
        bad = sum(reduce(v, axes) for axes, v in bad.items())
        return mean, jnp.sqrt(squares)[None], bad == 0

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(local_specs,),
        out_specs=(specs, PartitionSpec(axis), PartitionSpec()),
    )


def apply_outer_step(
    outer_tx: optax.GradientTransformation,
    alpha: float,
    f: Fragment,
    global_leaves: list,
    local_leaves: list,
    outer_states: tuple,
    mean: list,
    finite: jax.Array,
    skipped: jax.Array,
):
    """The second half of a fragment's sync: the outer step on the global copy and the merge
    ``theta_m <- alpha theta_m + (1 - alpha) theta_global`` into every replica; when ``mean`` is
    not ``finite``, the global copy and outer state are kept, the replicas reset to the global
    copy and ``skipped`` counts it. Returns ``(global_leaves, local_leaves, outer_states,
    skipped)``."""
    g = f.take(global_leaves)
    local = f.take(local_leaves, axis=1)
    with jax.numpy_dtype_promotion("standard"):
        updates, new_outer = outer_tx.update(mean, outer_states[f.index], g)
    new_g = optax.apply_updates(g, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_g = jax.tree.map(keep, new_g, g)
    new_outer = jax.tree.map(keep, new_outer, outer_states[f.index])
    merged = []
    for x, ng in zip(local, new_g, strict=True):
        a = jnp.asarray(alpha, ng.dtype)
        mix = a * x.astype(ng.dtype) + (1 - a) * ng[None]
        merged.append(jnp.where(finite, mix, ng[None]).astype(x.dtype))
    outer_states = (*outer_states[: f.index], new_outer, *outer_states[f.index + 1 :])
    skipped = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
    return f.put(global_leaves, new_g), f.put(local_leaves, merged, axis=1), outer_states, skipped


def replica_steps(loss_fn, inner_tx, axis: str):
    """``(grads_fn, update_fn)``: every replica's loss and gradients, and its inner optimizer
    update, as ``vmap``s over the leading replica axis (laid on mesh axis ``axis``)."""

    def one(params, batch):
        (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return loss, extra, grads

    def update(grads, opt_state, params):
        # optax's transforms mix Python floats with int32 counters, which strict promotion
        # rejects; the user's transform runs under standard promotion, as in jaxlib_ext.train.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = inner_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads_fn = jax.vmap(one, spmd_axis_name=axis)
    update_fn = jax.vmap(update, spmd_axis_name=axis)
    return grads_fn, update_fn


def make_diloco_step(
    loss_fn: Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]],
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation | None,
    config: DilocoConfig,
    fragments: Sequence[Fragment],
    shardings: DilocoState,
    batch_sharding: NamedSharding,
) -> Callable[[DilocoState, jax.Array], tuple[DilocoState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` that donates ``state``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (loss, metrics)`` for ONE replica.
      inner_tx: the replicas' optimizer (any optax transform).
      outer_tx: the outer optimizer (e.g. :func:`outer_optimizer`); ignored for ``"ddp"``.
      config: the :class:`DilocoConfig`.
      fragments: from :func:`parallel.fragments.make_fragments` with ``config.fragments``.
      shardings: :func:`diloco_state_shardings`.
      batch_sharding: of the batch ``[M, per-replica batch, ...]`` (replica axis first,
        :func:`stack_sharding` of a replica's batch sharding).

    Returns:
      The step. ``metrics``: ``loss`` (mean over replicas), ``replica_loss`` ``[M]``, the
      loss function's metrics (mean over replicas), ``synced_fragment`` (the fragment whose
      outer gradient was exchanged at this step, -1 if none), ``applied_fragment`` (the fragment
      applied, -1 if none), ``divergence`` ``[M]`` (each replica's ``||theta_global_p -
      theta_m_p||`` of the exchanged fragment, zeros if none) and ``skipped_syncs``. One
      compilation serves every step.

    Example:
      >>> from parallel.fragments import make_fragments
      >>> from parallel.mesh import make_mesh
      >>> mesh = make_mesh({"replica": 2, "fsdp": 4})
      >>> params = {"blocks": {i: {"w": jnp.ones(8)} for i in range(2)}}
      >>> loss = lambda p, b: (sum(jnp.sum((x - b) ** 2) for x in jax.tree.leaves(p)), {})
      >>> config = DilocoConfig(replicas=2, sync_every=2, fragments=2)
      >>> frags = make_fragments(params, 2)
      >>> p_sh = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec("fsdp")), params)
      >>> inner, outer = optax.sgd(0.1), outer_optimizer()
      >>> sh = diloco_state_shardings(params, p_sh, inner, outer, config, frags, mesh)
      >>> init = lambda p: init_diloco_state(p, inner, outer, config, frags)
      >>> state = jax.jit(init, out_shardings=sh)(params)
      >>> batch_sh = NamedSharding(mesh, PartitionSpec("replica"))  # one scalar per replica
      >>> step = make_diloco_step(loss, inner, outer, config, frags, sh, batch_sh)
      >>> state, metrics = step(state, jax.device_put(jnp.array([0.0, 1.0]), batch_sh))
      >>> # replicas 0.8 and 1.0, outer gradient 1 - 0.9 = 0.1, Nesterov: 1 - 0.7 * 0.19
      >>> int(metrics["synced_fragment"]), round(state.global_params["blocks"][0]["w"][0].item(), 6)
      (0, 0.867)
    """
    if len(fragments) != config.fragments and config.sync == "diloco":
        raise ValueError(
            f"got {len(fragments)} fragments for a config with fragments={config.fragments}"
        )
    mesh = batch_sharding.mesh
    axis, m = config.replica_axis, config.replicas
    grads_fn, update_fn = replica_steps(loss_fn, inner_tx, axis)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_specs = [PartitionSpec(*s.spec[1:]) for s in jax.tree.leaves(shardings.params)]

    def jit_step(step):  # donating; the state keeps its shardings, the metrics are replicated
        return jax.jit(
            step,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )

    def metrics_of(state, loss, extra):
        return {
            "loss": jnp.mean(loss),
            "replica_loss": loss,
            **{k: jnp.mean(v) for k, v in extra.items()},
            "skipped_syncs": state.skipped_syncs,
        }

    if config.sync == "ddp":
        exchange = _grad_exchange_fn(config, mesh, param_specs)

        def ddp_step(state: DilocoState, batch: jax.Array):
            loss, extra, grads = grads_fn(state.params, batch)
            leaves, treedef = jax.tree.flatten(grads)
            mean = exchange(leaves)
            grads = treedef.unflatten(
                [g.astype(x.dtype) for g, x in zip(mean, leaves, strict=True)]
            )
            params, opt_state = update_fn(grads, state.opt_state, state.params)
            state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            out = metrics_of(state, loss, extra)
            out.update(
                synced_fragment=jnp.int32(0), applied_fragment=jnp.int32(0), divergence=jnp.zeros(m)
            )
            return state, out

        return jit_step(ddp_step)

    period, tau, alpha = config.period, config.overlap, config.alpha
    exchanges = [
        make_exchange(config, mesh, [param_specs[p.leaf] for p in f.pieces]) for f in fragments
    ]
    apply_fragment = functools.partial(apply_outer_step, outer_tx, alpha)

    def which(t, offset):
        """1 + the fragment due at inner step count ``t - offset``, else 0."""
        s = t - offset
        due = (s % period == 0) & (s >= period)
        return jnp.where(due, (s // period - 1) % config.fragments + 1, 0)

    def diloco_step(state: DilocoState, batch: jax.Array):
        loss, extra, grads = grads_fn(state.params, batch)
        params, opt_state = update_fn(grads, state.opt_state, state.params)
        t = state.step + 1
        l_leaves, l_def = jax.tree.flatten(params)
        g_leaves, g_def = jax.tree.flatten(state.global_params)
        no_div = jnp.zeros((m,), jnp.float32)
        # Each switch returns only what its branches may change: XLA copies whatever an untaken
        # branch passes through, so read-only operands stay out of the outputs.
        changed = (g_leaves, l_leaves, state.outer_opt_state, state.skipped_syncs)

        def exchange(f: Fragment, g_leaves, l_leaves):
            return exchanges[f.index](outer_gradients(f, g_leaves, l_leaves))

        def sync_now(f: Fragment):  # tau = 0: exchange and apply in the same step
            def branch(changed):
                deltas, div, finite = exchange(f, changed[0], changed[1])
                return apply_fragment(f, *changed[:3], deltas, finite, changed[3]), div

            return branch

        def send(f: Fragment):  # tau > 0: exchange now, keep the mean for later
            def branch(g_leaves, l_leaves, pending):
                deltas, div, finite = exchange(f, g_leaves, l_leaves)
                return (*pending[: f.index], (deltas, finite), *pending[f.index + 1 :]), div

            return branch

        def apply_pending(f: Fragment):
            def branch(changed, pending):
                return apply_fragment(f, *changed[:3], *pending[f.index], changed[3])

            return branch

        sent = which(t, 0)
        pending = state.pending
        if tau == 0:
            idle = lambda changed: (changed, no_div)
            changed, div = jax.lax.switch(sent, [idle, *map(sync_now, fragments)], changed)
            applied = sent
        else:
            idle = lambda g_leaves, l_leaves, pending: (pending, no_div)
            pending, div = jax.lax.switch(
                sent, [idle, *map(send, fragments)], g_leaves, l_leaves, pending
            )
            applied = which(t, tau)
            keep = lambda changed, pending: changed
            changed = jax.lax.switch(
                applied, [keep, *map(apply_pending, fragments)], changed, pending
            )
        g_leaves, l_leaves, outer, skipped = changed
        new_state = DilocoState(
            t,
            l_def.unflatten(l_leaves),
            opt_state,
            g_def.unflatten(g_leaves),
            outer,
            pending,
            skipped,
        )
        out = metrics_of(new_state, loss, extra)
        out.update(synced_fragment=sent - 1, applied_fragment=applied - 1, divergence=div)
        return new_state, out

    return jit_step(diloco_step)


def _grad_exchange_fn(config: DilocoConfig, mesh: Mesh, specs: list[PartitionSpec]):
    """``grads [M, ...] -> mean over replicas [M, ...]`` (identical rows), in shard_map."""
    axis = config.replica_axis
    local_specs = [PartitionSpec(axis, *s) for s in specs]

    def body(leaves):
        mean = replica_mean(
            [x[0] for x in leaves],
            axis_name=axis,
            num_replicas=config.replicas,
            fmt=config.exchange_dtype,
            block_size=config.block_size,
        )
        return [x[None] for x in mean]

    return jax.shard_map(body, mesh=mesh, in_specs=(local_specs,), out_specs=local_specs)
