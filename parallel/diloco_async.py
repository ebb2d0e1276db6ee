"""Streaming DiLoCo with each exchange in its own program, dispatched before the inner steps
that it overlaps.

:func:`parallel.diloco.make_diloco_step` is one program for every step: the delayed apply
(``overlap = tau``) reproduces the *optimization* of Streaming DiLoCo, but a step that syncs
still runs its exchange inside the step, so nothing of it is hidden on a backend that runs a
program's collectives in order (XLA:CPU does). :class:`AsyncStreamingDiloco` computes the same
updates (tested: bit for bit with ``overlap > 0``; to float32 round-off with ``overlap = 0``,
where the one-program step fuses the exchange with the apply) with three kinds of programs, so
that the runtime may run the exchange *while* the next inner steps run:

1. the inner step (donating the state; no byte crosses the replicas);
2. at a sync step, the fragment's outer gradients are copied out of the state (a local program)
   and the exchange (:func:`parallel.diloco.make_exchange`, the only program whose collectives
   cross the replicas) is dispatched on them; JAX's dispatch is asynchronous, so Python
   returns at once and dispatches the next ``tau`` inner steps, which do not depend on it;
3. ``tau`` steps later, the outer step and merge (:func:`parallel.diloco.apply_outer_step`)
   consume the exchanged mean.

Whether the exchange then runs concurrently with the inner steps is the runtime's choice; how
much of it is hidden is measured by ``benchmarks/streaming_overlap.py``: on XLA:CPU across 2
processes, nothing (the runtime does not run the exchange program beside the next inner step,
and the core is busy anyway); a GPU/TPU runtime, with collectives on their own engine, is where
it can pay off. The
in-flight mean lives in this object, not in the state: save checkpoints of this driver's state
when :attr:`in_flight` is None (or use the one-program step, whose state holds it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from parallel.diloco import (
    DilocoConfig,
    DilocoState,
    apply_outer_step,
    make_exchange,
    outer_gradients,
    replica_steps,
)
from parallel.fragments import Fragment


class AsyncStreamingDiloco:
    """A driver: ``state, metrics = driver.step(state, batch)``, the same updates as
    :func:`parallel.diloco.make_diloco_step` with the exchange in a program of its own.

    Args: those of :func:`parallel.diloco.make_diloco_step` (``config.sync`` must be
    ``"diloco"``).
    """

    def __init__(
        self,
        loss_fn: Callable,
        inner_tx: Any,
        outer_tx: Any,
        config: DilocoConfig,
        fragments: Sequence[Fragment],
        shardings: DilocoState,
        batch_sharding: NamedSharding,
    ):
        if config.sync != "diloco":
            raise ValueError(f"AsyncStreamingDiloco needs sync='diloco', got {config.sync=}")
        self.config, self.fragments = config, tuple(fragments)
        mesh = batch_sharding.mesh
        grads_fn, update_fn = replica_steps(loss_fn, inner_tx, config.replica_axis)
        replicated = NamedSharding(mesh, PartitionSpec())
        param_specs = [PartitionSpec(*s.spec[1:]) for s in jax.tree.leaves(shardings.params)]

        def inner(state: DilocoState, batch):
            loss, extra, grads = grads_fn(state.params, batch)
            params, opt_state = update_fn(grads, state.opt_state, state.params)
            metrics = {"loss": jnp.mean(loss), "replica_loss": loss}
            metrics.update({k: jnp.mean(v) for k, v in extra.items()})
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

        self._inner = jax.jit(
            inner,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        self._copy_out, self._exchange, self._apply = [], [], []
        for f in self.fragments:
            specs = [param_specs[p.leaf] for p in f.pieces]
            stacked_sh = [
                NamedSharding(mesh, PartitionSpec(config.replica_axis, *s)) for s in specs
            ]
            self._copy_out.append(
                jax.jit(
                    functools.partial(self._outer_gradients, f),
                    in_shardings=(shardings,),
                    out_shardings=stacked_sh,
                )
            )
            self._exchange.append(jax.jit(make_exchange(config, mesh, specs)))
            self._apply.append(
                jax.jit(
                    functools.partial(self._apply_fragment, outer_tx, config.alpha, f),
                    in_shardings=(shardings, [NamedSharding(mesh, s) for s in specs], replicated),
                    out_shardings=shardings,
                    donate_argnums=0,
                )
            )
        self._t: int | None = None  # the host's copy of state.step (no device wait)
        self.in_flight: tuple[int, Any, Any, int] | None = None
        """``(fragment, mean outer gradients, finite, step to apply at)`` of the exchange in
        flight, or None."""

    def reset(self) -> None:
        """Forgets the step counter and any exchange in flight (before stepping another state)."""
        self._t, self.in_flight = None, None

    @staticmethod
    def _outer_gradients(f, state):
        return outer_gradients(
            f, jax.tree.leaves(state.global_params), jax.tree.leaves(state.params)
        )

    @staticmethod
    def _apply_fragment(outer_tx, alpha, f, state, mean, finite):
        g_def = jax.tree.structure(state.global_params)
        l_def = jax.tree.structure(state.params)
        g, local, outer, skipped = apply_outer_step(
            outer_tx,
            alpha,
            f,
            jax.tree.leaves(state.global_params),
            jax.tree.leaves(state.params),
            state.outer_opt_state,
            mean,
            finite,
            state.skipped_syncs,
        )
        return state.replace(
            global_params=g_def.unflatten(g),
            params=l_def.unflatten(local),
            outer_opt_state=outer,
            skipped_syncs=skipped,
        )

    def step(self, state: DilocoState, batch) -> tuple[DilocoState, dict]:
        """One inner step, then (when due) dispatch a fragment's exchange or apply the one in
        flight. Never blocks on the exchange before it is due."""
        if self._t is None:
            self._t = int(state.step)
        state, metrics = self._inner(state, batch)
        c, t = self.config, self._t + 1
        self._t = t
        metrics["synced_fragment"] = metrics["applied_fragment"] = -1
        if t % c.period == 0:
            p = (t // c.period - 1) % c.fragments
            mean, divergence, finite = self._exchange[p](self._copy_out[p](state))
            self.in_flight = (p, mean, finite, t + c.overlap)
            metrics["synced_fragment"], metrics["divergence"] = p, divergence
        if self.in_flight is not None and self.in_flight[3] == t:
            p, mean, finite, _ = self.in_flight
            state = self._apply[p](state, mean, finite)
            self.in_flight = None
            metrics["applied_fragment"] = p
        return state, metrics
