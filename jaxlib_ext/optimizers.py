"""Optimizers by name: the demo's and benchmarks' ``--optimizer NAME``.

:func:`make_optimizer` builds this library's optimizers (``spam``, ``diffgrad``,
``adam_coordinate_clipped``, ``sgd_coordinate_clipped``, ``frugal``) and optax's ready-made
ones from a name, a learning rate or schedule, and keyword hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

import optim

OPTAX_OPTIMIZERS = (
    "adabelief", "adadelta", "adafactor", "adagrad", "adam", "adamax", "adamaxw", "adamw",
    "adan", "amsgrad", "fromage", "lamb", "lars", "lion", "nadam", "nadamw", "novograd",
    "radam", "rmsprop", "sgd", "sign_sgd", "signum", "sm3", "yogi",
)  # fmt: skip
"""The optax optimizers reachable by name (each takes ``learning_rate`` first)."""


def _library_optimizers() -> dict[str, Callable[..., optax.GradientTransformation]]:
    return {
        "spam": optim.spam,
        "diffgrad": optim.diffgrad,
        "adam_coordinate_clipped": optim.adam_coordinate_clipped,
        "sgd_coordinate_clipped": optim.sgd_coordinate_clipped,
        "frugal": optim.frugal,
    }


def optimizer_names() -> tuple[str, ...]:
    """Every name :func:`make_optimizer` accepts, sorted."""
    return tuple(sorted((*OPTAX_OPTIMIZERS, *_library_optimizers())))


def make_optimizer(
    name: str, learning_rate: optax.ScalarOrSchedule, **hyperparams: Any
) -> optax.GradientTransformation:
    """The optimizer called ``name`` with the given learning rate (a float or a schedule).

    Raises:
      ValueError: an unknown name (the message lists the known ones), or a hyperparameter out of
        range.
      TypeError: a hyperparameter the optimizer does not take, or a missing required one (the
        coordinate-clipped optimizers need ``fraction``).

    Example:
      >>> tx = make_optimizer("adamw", 1e-3, weight_decay=0.1)
    """
    library = _library_optimizers()
    if name in library:
        return library[name](learning_rate, **hyperparams)
    if name not in OPTAX_OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}"
        )
    return getattr(optax, name)(learning_rate, **hyperparams)
