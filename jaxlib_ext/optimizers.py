"""Optimizers by name: the demo's and benchmarks' ``--optimizer NAME``.

:func:`make_optimizer` builds this library's optimizers (``spam``, ``diffgrad``,
``adam_coordinate_clipped``, ``sgd_coordinate_clipped``, ``frugal``) and optax's ready-made
ones from a name, a learning rate or schedule, and keyword hyperparameters.
"""

from __future__ import annotations

import inspect
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
      TypeError: a hyperparameter the optimizer does not take (the message lists those it
        takes), or a missing required one (the coordinate-clipped optimizers need ``fraction``).

    Example:
      >>> tx = make_optimizer("adamw", 1e-3, weight_decay=0.1)
    """
    library = _library_optimizers()
    if name not in library and name not in OPTAX_OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}"
        )
    factory = library[name] if name in library else getattr(optax, name)
    _check_names(name, factory, hyperparams)
    return factory(learning_rate, **hyperparams)


def _check_names(name: str, factory: Callable[..., Any], hyperparams: dict[str, Any]) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p != "learning_rate"]
    for given in hyperparams:
        if given not in params:
            raise TypeError(
                f"{name} takes no hyperparameter {given!r}; it takes: {', '.join(valid)}"
            )
