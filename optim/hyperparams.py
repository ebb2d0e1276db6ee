"""Validation of optimizer hyperparameters at factory time.

Hyperparameters are checked only when they are concrete Python or NumPy numbers: a traced value
(``optax.inject_hyperparams``) or a schedule passes through untouched, as optax does.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def is_concrete_number(value: Any) -> bool:
    """True for Python/NumPy numbers and concrete (non-traced) 0-d arrays."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Number | np.number):
        return True
    if isinstance(value, np.ndarray | jax.Array) and getattr(value, "ndim", 1) == 0:
        return not isinstance(value, jax.core.Tracer)
    return False


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ``ValueError`` naming ``name`` when a concrete ``value`` is outside the range.

    NaN is always out of range. Schedules (callables) and traced values are not checked.

    Raises:
      TypeError: ``value`` is a string (``"abc"`` from a command line is never a number).
    """
    if isinstance(value, str):
        raise TypeError(f"`{name}` must be a number, got {name}={value!r}")
    if not is_concrete_number(value):
        return
    v = float(value)
    ok = not np.isnan(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"`{name}` must be in {left}{lo}, {hi}{right}, got {name}={value!r}")


def check_learning_rate(learning_rate: Any) -> None:
    """A learning rate is a non-negative number or a schedule."""
    if callable(learning_rate):
        return
    check_range("learning_rate", learning_rate, 0.0)


def static_int(name: str, value: Any, low: int) -> int:
    """A hyperparameter that shapes arrays or control flow: a concrete int >= ``low``.

    Raises:
      TypeError: a traced value (pass it in ``static_args`` of ``optax.inject_hyperparams``).
      ValueError: not an integer, or below ``low``.
    """
    return int(static_number(name, value, low, integer=True))


def static_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    """A concrete number (not traced) in range; see :func:`static_int`."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a concrete number, it fixes array shapes; with "
            f"optax.inject_hyperparams pass static_args=({name!r}, ...), got a traced value"
        )
    if not is_concrete_number(value):
        raise TypeError(f"`{name}` must be a number, got {name}={value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"`{name}` must be an integer, got {name}={value!r}")
    check_range(name, value, low, high, low_open=low_open)
    return float(value)
