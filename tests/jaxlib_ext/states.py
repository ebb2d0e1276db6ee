"""Comparing train states leaf by leaf in the checkpoint tests (PRNG keys by their key data)."""

import jax
import numpy as np


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def unwrapped(x):
    """A PRNG key array's key data; any other array as it is."""
    return jax.random.key_data(x) if is_key(x) else x


def assert_same_state(a, b) -> None:
    """Same structure, and every leaf of the same dtype and bit for bit equal."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(unwrapped(x)), np.asarray(unwrapped(y)))
