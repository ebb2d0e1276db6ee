"""make_mesh: any device count and axis layout; clear errors for impossible layouts."""

import pytest
from jax.sharding import AxisType

from parallel.mesh import make_mesh


def test_one_device(devices):
    mesh = make_mesh({"data": 1, "fsdp": 1}, devices=devices[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert mesh.devices.size == 1


def test_eight_devices_one_axis(devices):
    mesh = make_mesh({"fsdp": 8})
    assert dict(mesh.shape) == {"fsdp": 8}
    assert set(mesh.devices.flat) == set(devices)


def test_two_by_four_with_a_free_axis(devices):
    mesh = make_mesh([("data", 2), ("fsdp", -1)], devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_subset_of_devices(devices):
    mesh = make_mesh({"data": -1}, devices=devices[:4])
    assert dict(mesh.shape) == {"data": 4}


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"data": 3}, "needs 3 devices, but 8 are given"),
        ({"data": 3, "fsdp": -1}, "not divisible"),
        ({"data": -1, "fsdp": -1}, "one may be -1"),
        ({"data": 0}, "must be >= 1"),
        ({}, "at least one mesh axis"),
        ([("data", 2), ("data", 4)], "distinct"),
    ],
)
def test_impossible_layouts_raise(devices, axes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(axes, devices=devices)
