"""Logical-axis rules: parameter, batch, activation and optimizer-state shardings."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parallel import rules as R
from parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh({"data": 2, "fsdp": 4}, devices=devices)


PARAMS = {
    "embed": jnp.zeros((256, 16)),
    "dense": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros((32,))},
    "stack": {"kernel": jnp.zeros((3, 16, 32))},
}
AXES = {
    "embed": ("vocab", "embed"),
    "dense": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "stack": {"kernel": ("layers", "embed", "mlp")},
}


def test_logical_to_spec_maps_and_drops_missing_axes(mesh):
    assert R.logical_to_spec(("batch", None), R.DEFAULT_RULES, mesh) == P(("data", "fsdp"), None)
    assert R.logical_to_spec(("vocab", "embed"), R.DEFAULT_RULES, mesh) == P(None, "fsdp")
    fsdp_only = make_mesh({"fsdp": 8})
    assert R.logical_to_spec(("batch", "embed"), R.DEFAULT_RULES, fsdp_only) == P("fsdp", None)
    assert R.logical_to_spec(("unknown",), R.DEFAULT_RULES, mesh) == P(None)


def test_a_mesh_axis_is_used_once_per_array(mesh):
    rules = (("a", "fsdp"), ("b", "fsdp"))
    assert R.logical_to_spec(("a", "b"), rules, mesh) == P("fsdp", None)


def test_rules_must_be_pairs():
    with pytest.raises(TypeError, match="pair"):
        R.logical_to_spec(("a",), ("a",))


def test_non_divisible_dimension_names_the_array(mesh):
    with pytest.raises(ValueError, match=r"parameter \['dense'\]\['bias'\].*not divisible"):
        R.tree_shardings(
            {"dense": {"bias": jnp.zeros((6,))}},
            {"dense": {"bias": ("embed",)}},
            mesh,
            R.DEFAULT_RULES,
        )
    with pytest.raises(ValueError, match="do not match its shape"):
        R.logical_sharding((4, 4), ("embed",), mesh, R.DEFAULT_RULES)


def test_tree_shardings_and_shard_tree(mesh):
    shardings = R.tree_shardings(PARAMS, AXES, mesh, R.DEFAULT_RULES)
    assert shardings["embed"].spec == P(None, "fsdp")
    assert shardings["dense"]["kernel"].spec == P("fsdp", None)
    assert shardings["dense"]["bias"].spec == P(None)
    assert shardings["stack"]["kernel"].spec == P(None, "fsdp", None)
    placed = R.shard_tree(PARAMS, shardings)
    assert placed["dense"]["kernel"].addressable_shards[0].data.shape == (4, 32)


CHAINS = {
    "adamw": optax.adamw(1e-3),
    "clip+adamw": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "masked": optax.masked(optax.adam(1e-3), {"embed": False, "dense": True, "stack": True}),
    "multisteps": optax.MultiSteps(optax.sgd(1e-2, momentum=0.9), every_k_schedule=2),
    "inject": optax.inject_hyperparams(optax.lion)(learning_rate=1e-4),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_optimizer_state_follows_its_parameters(mesh, name):
    tx = CHAINS[name]
    param_sh = R.tree_shardings(PARAMS, AXES, mesh, R.DEFAULT_RULES)
    abstract = jax.eval_shape(tx.init, PARAMS)
    state_sh = R.derive_state_shardings(abstract, PARAMS, param_sh, mesh)
    owners = R.state_param_paths(abstract, PARAMS)
    flat_sh = jax.tree.leaves(state_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
    flat_owner = jax.tree_util.tree_flatten(owners, is_leaf=lambda x: x is None)[0]
    flat_abstract = jax.tree.leaves(abstract)
    assert len(flat_sh) == len(flat_abstract) == len(flat_owner)
    by_path = {
        "dense/kernel": P("fsdp", None),
        "embed": P(None, "fsdp"),
        "stack/kernel": P(None, "fsdp", None),
        "dense/bias": P(None),
    }
    matched = 0
    for sh, owner, leaf in zip(flat_sh, flat_owner, flat_abstract, strict=True):
        if owner is None:
            assert sh.spec == P(), f"unmatched leaf {leaf} must be replicated"
        else:
            matched += 1
            assert sh.spec == by_path[owner]
    assert matched >= 3
    # the derived shardings are a valid jit target: init lands directly in them
    state = jax.jit(tx.init, out_shardings=state_sh)(R.shard_tree(PARAMS, param_sh))
    for leaf, sh in zip(jax.tree.leaves(state), flat_sh, strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_state_param_paths_names_the_moments(mesh):
    abstract = jax.eval_shape(optax.adam(1e-3).init, PARAMS)
    owners = R.state_param_paths(abstract, PARAMS)
    assert owners[0].mu["dense"]["kernel"] == "dense/kernel"
    assert owners[0].nu["embed"] == "embed"
    assert owners[0].count is None


def test_with_shardings_builds_a_target(mesh):
    param_sh = R.tree_shardings(PARAMS, AXES, mesh, R.DEFAULT_RULES)
    target = R.with_shardings(PARAMS, param_sh)
    assert target["dense"]["kernel"].sharding == param_sh["dense"]["kernel"]
    assert target["dense"]["kernel"].shape == (16, 32)


def test_activation_constraint_pins_the_batch_axis(mesh):
    constrain = R.activation_constraint(mesh)
    out = jax.jit(lambda x: constrain(x * 2, ("batch", None, "embed")))(jnp.ones((8, 4, 16)))
    # 'embed' would take 'fsdp', but the batch dimension already uses it
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
    with pytest.raises(ValueError, match="an activation"):
        jax.jit(lambda x: constrain(x, ("batch", None)))(jnp.ones((6, 4)))
