"""Multi-process behaviour: 2 local processes x 4 CPU devices joined by jax.distributed (gloo)."""

import numpy as np
import pytest

from tests.multiprocess import run_in_processes

pytestmark = pytest.mark.multiprocess


def cross_process_sum(process_id: int, num_processes: int) -> None:
    """A global array spread over both processes, reduced across them by a jitted program."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from parallel.mesh import make_mesh

    assert jax.process_count() == num_processes and jax.process_index() == process_id
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    full = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    x = jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])
    assert len(x.addressable_shards) == 4  # this process holds half of the rows
    total = jax.jit(lambda x: jnp.sum(x * 2.0, axis=0), out_shardings=NamedSharding(mesh, P()))(x)
    np.testing.assert_array_equal(np.asarray(total), (full * 2).sum(axis=0))

    def ring(x):
        return jax.lax.ppermute(x, "fsdp", [(i, (i + 1) % 4) for i in range(4)])

    shifted = jax.jit(
        jax.shard_map(ring, mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")))
    )(x)
    gathered = jax.jit(lambda y: y, out_shardings=NamedSharding(mesh, P()))(shifted)
    expected = np.concatenate([np.roll(block, 1, axis=0) for block in np.split(full, 2)])
    np.testing.assert_array_equal(np.asarray(gathered), expected)


def failing_body(process_id: int, num_processes: int) -> None:
    del num_processes
    if process_id == 1:
        raise RuntimeError("deliberate failure in process 1")


def test_sharded_computation_spans_two_processes():
    outputs = run_in_processes("tests.parallel.test_multiprocess:cross_process_sum")
    assert all("done" in out for out in outputs)


def test_a_failing_process_is_reported_with_its_output():
    with pytest.raises(AssertionError, match="deliberate failure in process 1"):
        run_in_processes("tests.parallel.test_multiprocess:failing_body", timeout=120)
