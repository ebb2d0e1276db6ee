"""Running a reference test in float32 and in float64.

The float64 run is under ``jax_enable_x64`` and compares with the float64 NumPy reference at
``1e-12``: the optimizers compute in ``promote_types(param dtype, float32)``, so nothing may
round to float32 on the way. The float32 run keeps each test's own float32 tolerances.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import pytest

DTYPES = pytest.mark.parametrize("dtype", ["float32", "float64"])
"""``@precision.DTYPES`` parametrizes a test over ``dtype`` in ("float32", "float64")."""

FLOAT64_TOLERANCE = 1e-12


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[jnp.dtype]:
    """Enables x64 for ``"float64"``; yields the JAX dtype."""
    with jax.enable_x64(dtype == "float64"):
        yield jnp.dtype(dtype)


def tolerance(dtype: str, rtol: float, atol: float) -> dict[str, float]:
    """``assert_allclose`` tolerances: the test's own for float32, ``1e-12`` for float64."""
    if dtype == "float64":
        return dict(rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
    return dict(rtol=rtol, atol=atol)


def cast(tree: dict, dtype: jnp.dtype) -> dict:
    """A flat dict of NumPy arrays as JAX arrays of ``dtype``."""
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}
