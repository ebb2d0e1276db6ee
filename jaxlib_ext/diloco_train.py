"""(Streaming) DiLoCo for a model of this library: meshes, sharded state, batches, bytes, resume.

:mod:`parallel.diloco` is the algorithm over any pytree of parameters; this module composes it
with a model (``abstract_params``, ``logical_axes``, ``init(seed)``), the rules table, the
checkpoints and the cost formulas::

    mesh = make_mesh({"replica": 2, "data": 1, "fsdp": 4})
    config = DilocoConfig(replicas=2, sync_every=32, fragments=2, exchange_dtype="e3m0")
    setup = DilocoSetup.create(model, optax.adamw(1e-3), outer_optimizer(0.4), config, mesh)
    state = setup.init(seed=0)
    step = setup.step(lm_loss(model))
    state, metrics = step(state, setup.shard_batch(tokens))  # tokens [M * b, T + 1]

Checkpoints: ``Checkpointer.save(step, state)`` saves everything (replicas, inner states, global
copy, outer states, the outer gradient in flight); :meth:`DilocoSetup.restore` resumes bit-exactly
with the same number of replicas on any device count, and *elastically* with another number of
replicas: every new replica starts from the global copy, with the saved replicas' inner optimizer
state averaged (floating leaves; integer leaves such as counters and PRNG keys, equal on all
replicas, come from replica 0); the global copy, the outer states and the outer gradient in
flight are kept as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlib_ext.train import batch_sharding, lm_loss
from parallel.diloco import (
    DilocoConfig,
    DilocoState,
    diloco_state_shardings,
    init_diloco_state,
    make_diloco_step,
    stack_sharding,
)
from parallel.exchange import exchange_wire_bytes
from parallel.fragments import Fragment, make_fragments
from parallel.rules import DEFAULT_RULES, Rules, tree_shardings

__all__ = ["DilocoSetup", "local_size"]


def local_size(shape: tuple[int, ...], sharding: NamedSharding) -> int:
    """Elements of one device's shard of an array of ``shape``."""
    ways = 1
    for entry in sharding.spec:
        for axis in () if entry is None else (entry,) if isinstance(entry, str) else entry:
            ways *= sharding.mesh.shape[axis]
    return math.prod(shape) // ways


@dataclasses.dataclass(frozen=True)
class DilocoSetup:
    """Everything static about a DiLoCo run: model, optimizers, config, fragments, shardings."""

    model: Any
    inner_tx: optax.GradientTransformation
    outer_tx: optax.GradientTransformation | None
    config: DilocoConfig
    mesh: Mesh
    fragments: tuple[Fragment, ...]
    param_shardings: Any
    shardings: DilocoState
    rules: Rules

    @classmethod
    def create(
        cls,
        model: Any,
        inner_tx: optax.GradientTransformation,
        outer_tx: optax.GradientTransformation | None,
        config: DilocoConfig,
        mesh: Mesh,
        *,
        rules: Rules = DEFAULT_RULES,
        pattern: str = "strided",
    ) -> DilocoSetup:
        """Fragments from the model's layer stack (``pattern``) and every sharding, from the
        rules inside a replica and ``config.replica_axis`` across replicas.

        Raises:
          ValueError: the mesh lacks the replica axis (or its size is not ``replicas``), or a
            parameter does not divide over the mesh axes its rules name.
        """
        params = model.abstract_params
        param_shardings = tree_shardings(params, model.logical_axes, mesh, rules)
        fragments = make_fragments(params, config.fragments, pattern)
        shardings = diloco_state_shardings(
            params, param_shardings, inner_tx, outer_tx, config, fragments, mesh
        )
        return cls(
            model, inner_tx, outer_tx, config, mesh, fragments, param_shardings, shardings, rules
        )

    # -- state ------------------------------------------------------------------------------

    def init(self, seed: int = 0) -> DilocoState:
        """A fresh state, created in its shardings: ``M`` identical replicas of
        ``model.init(seed)`` and their inner states, the global copy, the outer states."""

        def make():
            params = self.model.init(int(seed))
            return init_diloco_state(
                params, self.inner_tx, self.outer_tx, self.config, self.fragments
            )

        return jax.jit(make, out_shardings=self.shardings)()

    def abstract_state(self) -> DilocoState:
        """Shapes, dtypes and shardings of the state: a checkpoint restore target."""
        abstract = jax.eval_shape(
            lambda: init_diloco_state(
                self.model.init(0), self.inner_tx, self.outer_tx, self.config, self.fragments
            )
        )
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.shardings,
        )

    # -- batches and steps ------------------------------------------------------------------

    def batch_sharding(self, global_batch: int | None = None) -> NamedSharding:
        """Of a batch ``[M, b, T + 1]``: replicas over the replica axis, each replica's rows as
        the rules say (``global_batch`` = ``M * b``, checked for divisibility)."""
        per_replica = None if global_batch is None else global_batch // self.config.replicas
        if global_batch is not None and global_batch % self.config.replicas:
            raise ValueError(
                f"the global batch {global_batch} is not divisible by "
                f"replicas={self.config.replicas}"
            )
        inner = batch_sharding(self.mesh, self.rules, global_batch=per_replica)
        return stack_sharding(inner, self.config.replica_axis)

    def shard_batch(self, batch: np.ndarray) -> jax.Array:
        """``[M * b, T + 1]`` host tokens (every process holds them whole) -> the sharded
        ``[M, b, T + 1]`` batch: replica ``m`` trains on rows ``m * b ... (m + 1) * b - 1``."""
        batch = np.asarray(batch)
        sharding = self.batch_sharding(batch.shape[0])  # checks the split over the replicas
        m = self.config.replicas
        stacked = batch.reshape(m, batch.shape[0] // m, *batch.shape[1:])
        return jax.make_array_from_callback(stacked.shape, sharding, lambda i: stacked[i])

    def step(self, loss_fn=None):
        """The jitted, donating step (:func:`parallel.diloco.make_diloco_step`) for
        ``loss_fn`` (default: :func:`jaxlib_ext.train.lm_loss` of the model)."""
        return make_diloco_step(
            loss_fn or lm_loss(self.model),
            self.inner_tx,
            self.outer_tx,
            self.config,
            self.fragments,
            self.shardings,
            self.batch_sharding(),
        )

    # -- bytes ------------------------------------------------------------------------------

    def fragment_local_sizes(self) -> list[int]:
        """Elements of each fragment on one device (its shard of every piece)."""
        leaves = jax.tree.leaves(self.model.abstract_params)
        shardings = jax.tree.leaves(self.param_shardings)
        return [
            sum(local_size(p.shape(leaves[p.leaf].shape), shardings[p.leaf]) for p in f.pieces)
            for f in self.fragments
        ]

    def sync_wire_bytes(self) -> list[float]:
        """Per device, the bytes that cross the replica axis when each fragment is synchronized
        (for ``"ddp"``: one entry, every step's gradient exchange)."""
        c = self.config
        if c.sync == "ddp":
            sizes = [sum(self.fragment_local_sizes())]
        else:
            sizes = self.fragment_local_sizes()
        return [exchange_wire_bytes(n, c.exchange_dtype, c.replicas, c.block_size) for n in sizes]

    def bytes_at(self, step: int) -> float:
        """Bytes per device crossing the replica axis in the step that completes inner step
        ``step`` (1-based)."""
        c, per_fragment = self.config, self.sync_wire_bytes()
        if c.sync == "ddp":
            return per_fragment[0]
        if step % c.period:
            return 0.0
        return per_fragment[(step // c.period - 1) % c.fragments]

    # -- checkpoints ------------------------------------------------------------------------

    @staticmethod
    def _saved_replicas(ckpt: Any, step: int | None, fallback: bool) -> int | None:
        """The replica count of the step to restore, from its manifest (with ``fallback``, of
        the newest readable one: the restore itself then checks the data)."""
        from jaxlib_ext.checkpoint import CheckpointError, manifest

        candidates = [step] if step is not None else list(reversed(ckpt.steps()))
        for s in candidates if fallback else candidates[:1]:
            try:
                leaves = manifest(ckpt.directory, s)["leaves"]
            except CheckpointError:
                if not fallback:
                    raise
                continue
            return next((v["shape"][0] for k, v in leaves.items() if k.startswith("params/")), None)
        return None

    def restore(self, ckpt: Any, *, step: int | None = None, fallback: bool = False):
        """Restores a DiLoCo checkpoint into this setup: ``(state, extra)``.

        Same number of replicas: every leaf as saved (bit-exact; any device count). Another
        number of replicas: see the module docstring (replicas restart from the global copy).
        """
        target = self.abstract_state()
        saved = self._saved_replicas(ckpt, step, fallback)
        if saved is None or saved == self.config.replicas:
            return ckpt.restore(target, step=step, fallback=fallback)
        unstacked = lambda a: jax.ShapeDtypeStruct(
            (saved, *a.shape[1:]),
            a.dtype,
            sharding=NamedSharding(self.mesh, PartitionSpec(None, *a.sharding.spec[1:])),
        )
        ddp = target.global_params is None
        partial = target.replace(
            params=jax.tree.map(unstacked, target.params) if ddp else None,
            opt_state=jax.tree.map(unstacked, target.opt_state),
        )
        restored, extra = ckpt.restore(partial, step=step, fallback=fallback)
        m = self.config.replicas
        stack = lambda x: jnp.broadcast_to(x, (m, *x.shape))

        def rebuild(state):
            def averaged(x):
                if jnp.issubdtype(x.dtype, jnp.floating):
                    return stack(jnp.mean(x, axis=0).astype(x.dtype))
                return stack(x[0])  # counters and PRNG keys: equal on every replica

            if ddp:  # the replicas are identical: one of them is the model
                params = jax.tree.map(lambda x: stack(x[0]), state.params)
            else:
                params = jax.tree.map(
                    lambda g, a: stack(g.astype(a.dtype)), state.global_params, target.params
                )
            return state.replace(params=params, opt_state=jax.tree.map(averaged, state.opt_state))

        return jax.jit(rebuild, out_shardings=self.shardings)(restored), extra
