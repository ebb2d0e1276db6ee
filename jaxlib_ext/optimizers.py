"""Optimizers by name: the demo's and benchmarks' ``--optimizer NAME``.

:func:`make_optimizer` builds any of optax's ready-made optimizers (and, as they land, this
library's) from a name, a learning rate or schedule, and keyword hyperparameters.
"""

from __future__ import annotations

from typing import Any

import optax

OPTAX_OPTIMIZERS = (
    "adabelief", "adadelta", "adafactor", "adagrad", "adam", "adamax", "adamaxw", "adamw",
    "adan", "amsgrad", "fromage", "lamb", "lars", "lion", "nadam", "nadamw", "novograd",
    "radam", "rmsprop", "sgd", "sign_sgd", "signum", "sm3", "yogi",
)  # fmt: skip
"""The optax optimizers reachable by name (each takes ``learning_rate`` first)."""


def optimizer_names() -> tuple[str, ...]:
    """Every name :func:`make_optimizer` accepts, sorted."""
    return tuple(sorted(OPTAX_OPTIMIZERS))


def make_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, **hyperparams: Any
) -> optax.GradientTransformation:
    """The optimizer called ``name`` with the given learning rate (a float or a schedule).

    Raises:
      ValueError: an unknown name (the message lists the known ones).
      TypeError: a hyperparameter the optimizer does not take.

    Example:
      >>> tx = make_optimizer("adamw", 1e-3, weight_decay=0.1)
    """
    if name not in OPTAX_OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}"
        )
    return getattr(optax, name)(learning_rate, **hyperparams)
