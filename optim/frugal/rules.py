"""FRUGAL's two update rules: Adam (the state-full part) and a state-free rule (the rest)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optim.moments import adam_direction, ema

FREE_RULES = ("sign_sgd", "sgd", "none")


def free_direction(rule: str, residual: jax.Array) -> jax.Array:
    """The state-free rule on a residual: ``sign(r)``, ``r`` or 0."""
    if rule == "sign_sgd":
        return jnp.sign(residual)
    if rule == "sgd":
        return residual
    return jnp.zeros_like(residual)


def adam_step(
    d: jax.Array, mu: jax.Array, nu: jax.Array, count: jax.Array, b1: Any, b2: Any, eps: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Adam (inner eps, as ``optax.scale_by_adam``) on ``d``: ``(direction, new mu, new nu)``,
    the direction in ``promote_types(d, float32)``."""
    mu, nu = ema(mu, d, b1), ema(nu, d, b2, order=2)
    return adam_direction(mu, nu, count, b1, b2, eps), mu, nu
