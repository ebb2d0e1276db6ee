"""Checksums of logical bytes: equal to an independent NumPy reference, and computed in place."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_ext import costs
from jaxlib_ext.checkpoint.checksums import checksum_strings, checksums
from parallel.mesh import make_mesh


def _numpy_checksum(x) -> str:
    """The manifest checksum, computed independently: uint32 words of the row-major bytes, their
    sum and their sum weighted by (position % 65521) + 1, both mod 2**32."""
    flat = np.asarray(x).reshape(-1)
    if flat.dtype == np.bool_:
        words = flat.astype(np.uint64)
    else:
        view = {4: np.uint32, 2: np.uint16, 1: np.uint8}.get(flat.dtype.itemsize, np.uint32)
        words = flat.view(view).astype(np.uint64)
    weights = np.arange(words.size, dtype=np.uint64) % 65521 + 1
    plain, weighted = int(words.sum() % 2**32), int((words * weights % 2**32).sum() % 2**32)
    return f"{plain:08x}{weighted:08x}"


def test_checksums_match_numpy_gather_nothing_and_store_nothing(devices):
    mesh = make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    rng = np.random.default_rng(0)
    sharded = jax.device_put(
        rng.normal(size=(512, 256)).astype(np.float32),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp")),
    )
    leaves = [
        sharded,
        jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.bfloat16),
        jnp.asarray(rng.integers(-9, 9, (7,)), jnp.int8),
        jnp.asarray(rng.random((3, 3)) > 0.5),
        jnp.float32(3.5),
    ]
    assert checksum_strings(leaves) == [_numpy_checksum(x) for x in leaves]
    report = costs.analyze(checksums, [sharded])
    shard_bytes = 512 * 256 * 4 // 8
    assert report.total_wire_bytes() < 1024  # partial sums only: no part of the leaf moves
    assert report.memory.temp_bytes < shard_bytes // 8  # no copy of the leaf's words
