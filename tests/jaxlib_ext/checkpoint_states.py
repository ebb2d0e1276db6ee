"""Small train-state-like pytrees for the checkpoint fault and writer tests."""

import jax
import jax.numpy as jnp
import numpy as np


def small_state(step: int) -> dict:
    """A float32 matrix, a bfloat16 vector, an int32 counter and a PRNG key, from ``step``."""
    rng = np.random.default_rng(step)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal((16, 8), np.float32)),
            "b": jnp.asarray(rng.standard_normal(8, np.float32)).astype(jnp.bfloat16),
        },
        "step": jnp.int32(step),
        "rng": jax.random.key(step),
    }


def abstract(state):
    """The restore target of ``state``: its shapes and dtypes."""
    return jax.eval_shape(lambda: state)
