"""Test-wide setup: 8 simulated CPU devices and strict dtype promotion for every test.

The device count must be set before JAX creates its CPU backend, so it happens at import time of
this conftest, before any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def devices():
    found = jax.devices()
    assert len(found) == 8, f"tests expect 8 simulated CPU devices, found {len(found)}"
    return found
