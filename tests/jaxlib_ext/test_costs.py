"""Cost accounting against programs whose collective bytes are known by hand."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlib_ext import costs
from parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def mesh8(devices):
    return make_mesh({"x": 8}, devices=devices)


@pytest.fixture(scope="module")
def mesh24(devices):
    return make_mesh({"data": 2, "fsdp": 4}, devices=devices)


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def test_all_gather_of_known_size_over_8_devices(mesh8):
    # A [64, 32] f32 array sharded 8 ways, gathered: each device holds 8 KiB of the 8 KiB result
    # and receives the 7 shards it lacks: 7/8 * 64*32*4 = 7168 bytes.
    x = _put(jnp.ones((64, 32), jnp.float32), mesh8, P("x", None))
    f = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh8, P()))
    report = costs.analyze(f, x)
    assert report.wire_bytes()["all-gather"] == 7168
    assert report.counts()["all-gather"] == 1
    assert report.num_devices == 8
    assert sum(v for k, v in report.wire_bytes().items() if k != "all-gather") == 0


def test_psum_inside_a_12_step_scan_counts_trip_count(mesh24):
    # psum of a [16, 32] f32 shard (2048 B) over the 4-device 'fsdp' axis, 12 times:
    # 12 * 2 * 2048 * 3/4 = 36864 bytes per device.
    def body(x):
        def step(carry, _):
            return carry + jax.lax.psum(carry, "fsdp"), None

        out, _ = jax.lax.scan(step, x, None, length=12)
        return out

    f = jax.jit(jax.shard_map(body, mesh=mesh24, in_specs=P("fsdp"), out_specs=P("fsdp")))
    x = _put(jnp.ones((64, 32), jnp.float32), mesh24, P("fsdp"))
    report = costs.analyze(f, x)
    (op,) = [o for o in report.collectives if o.kind == "all-reduce"]
    assert (op.executions, op.group_size, op.result_bytes) == (12, 4, 2048)
    assert report.wire_bytes()["all-reduce"] == 36864
    assert report.counts()["all-reduce"] == 12


def test_collective_inside_one_branch_of_cond(mesh24):
    # all_gather of a [16, 32] f32 shard over 4 devices in the true branch only:
    # 3/4 * 64*32*4 = 6144 bytes in that branch, nothing in the other.
    def body(x, flag):
        return jax.lax.cond(
            flag > 0,
            lambda x: jax.lax.all_gather(x, "fsdp", tiled=True)[: x.shape[0]] + 1,
            lambda x: x,
            x,
        )

    f = jax.jit(jax.shard_map(body, mesh=mesh24, in_specs=(P("fsdp"), P()), out_specs=P("fsdp")))
    x = _put(jnp.ones((64, 32), jnp.float32), mesh24, P("fsdp"))
    report = costs.analyze(f, x, jnp.float32(1))
    per_branch = report.branch_wire_bytes()
    assert len(per_branch) == 1
    ((path, kinds),) = per_branch.items()
    assert path[0][1] == 1  # branch index 1 is lax.cond's true branch
    assert kinds["all-gather"] == 6144
    assert report.wire_bytes("max")["all-gather"] == 6144
    assert report.wire_bytes("sum")["all-gather"] == 6144


def test_worst_branch_is_taken_per_conditional(mesh24):
    # Branch 0 all-gathers 2048*4*3/4 = 6144 B; branch 1 psums: 2*2048*3/4 = 3072 B.
    def body(x, i):
        return jax.lax.switch(
            i,
            [
                lambda x: jax.lax.all_gather(x, "fsdp", tiled=True)[: x.shape[0]],
                lambda x: jax.lax.psum(x, "fsdp") + x,
            ],
            x,
        )

    f = jax.jit(jax.shard_map(body, mesh=mesh24, in_specs=(P("fsdp"), P()), out_specs=P("fsdp")))
    x = _put(jnp.ones((64, 32), jnp.float32), mesh24, P("fsdp"))
    report = costs.analyze(f, x, jnp.int32(0))
    assert report.wire_bytes("max")["all-gather"] == 6144
    assert report.wire_bytes("max")["all-reduce"] == 0
    assert report.wire_bytes("sum") == {**report.wire_bytes("max"), "all-reduce": 3072}


def test_collective_permute(mesh8):
    # A ring shift of a [8, 32] f32 shard: every device sends its 1024 bytes once.
    def body(x):
        return jax.lax.ppermute(x, "x", [(i, (i + 1) % 8) for i in range(8)])

    f = jax.jit(jax.shard_map(body, mesh=mesh8, in_specs=P("x"), out_specs=P("x")))
    report = costs.analyze(f, _put(jnp.ones((64, 32), jnp.float32), mesh8, P("x")))
    assert report.wire_bytes()["collective-permute"] == 1024


def test_reduce_scatter_and_all_to_all(mesh8):
    # psum_scatter of a [64, 32] f32 per-device buffer over 8 devices: result [8, 32] = 1024 B,
    # wire 7 * 1024 = 7168 B. all_to_all of the same [64, 32] buffer: 7/8 * 8192 = 7168 B.
    def body(x):
        scattered = jax.lax.psum_scatter(x, "x", scatter_dimension=0, tiled=True)
        exchanged = jax.lax.all_to_all(x, "x", 0, 0, tiled=True)
        return scattered, exchanged

    f = jax.jit(jax.shard_map(body, mesh=mesh8, in_specs=P(None), out_specs=(P("x"), P("x"))))
    report = costs.analyze(f, _put(jnp.ones((64, 32), jnp.float32), mesh8, P()))
    wire = report.wire_bytes()
    assert wire["reduce-scatter"] == 7168
    assert wire["all-to-all"] == 7168


def test_memory_and_flops_of_a_matmul():
    # [128, 64] @ [64, 32] in f32: 2*128*64*32 FLOPs; arguments 32 KiB + 8 KiB, output 16 KiB.
    a = jnp.ones((128, 64), jnp.float32)
    b = jnp.ones((64, 32), jnp.float32)
    report = costs.analyze(jnp.matmul, a, b)
    assert report.flops == 2 * 128 * 64 * 32
    assert report.memory.argument_bytes == (128 * 64 + 64 * 32) * 4
    assert report.memory.output_bytes == 128 * 32 * 4
    assert report.memory.peak_bytes >= report.memory.output_bytes
    assert report.collectives == ()


def test_bytes_accessed_counts_each_fused_pass_over_memory():
    # One fused elementwise pass: a and b read, the result written (f32, 4 bytes each).
    n = 1 << 16
    a, b = jnp.ones(n, jnp.float32), jnp.ones(n, jnp.float32)
    assert costs.analyze(lambda x, y: 2 * x + y, a, b).bytes_accessed == 3 * 4 * n
    # Two results of one input: one pass if XLA fuses them together, else a read per output
    # (XLA:CPU); either way plus the few bytes of the output tuple.
    both = costs.analyze(lambda x: (x + 1, x * 3), a)
    assert 3 * 4 * n <= both.bytes_accessed <= 4 * 4 * n + 64
    assert both.summary()["bytes_accessed_per_device"] == both.bytes_accessed


def test_group_size_parsing_of_every_replica_group_form():
    assert costs._group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dims", 8) == 4
    assert costs._group_size("replica_groups=[2,4]<=[8], dims", 8) == 4
    assert costs._group_size("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == 2
    mesh_form = (
        "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
        "{'axis_0','axis_2'}, dimensions={0}"
    )
    assert costs._group_size(mesh_form, 8) == 8
    assert costs._group_size("replica_groups={}, to_apply=%add", 8) == 8


def test_format_bytes():
    assert costs.format_bytes(512) == "512 B"
    assert costs.format_bytes(1536) == "1.50 KiB"
    assert costs.format_bytes(3 * 1024**3) == "3.00 GiB"
