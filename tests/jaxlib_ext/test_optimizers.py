"""Optimizers by name: the library's and optax's, in the sharded train step."""

import jax
import numpy as np
import optax
import pytest

from jaxlib_ext import train
from jaxlib_ext.model import LanguageModel, LMConfig
from jaxlib_ext.optimizers import make_optimizer, optimizer_names
from parallel.mesh import make_mesh
from parallel.rules import activation_constraint

LIBRARY = {
    "spam": dict(reset_interval=4, warmup_steps=2, no_clip_steps=1),
    "diffgrad": {},
    "adam_coordinate_clipped": dict(fraction=0.01),
    "sgd_coordinate_clipped": dict(fraction=0.01),
    "frugal": dict(density=0.5, update_gap=3),
}


def test_names_cover_library_and_optax():
    names = optimizer_names()
    assert set(LIBRARY) <= set(names) and {"adamw", "lion", "sgd"} <= set(names)
    assert list(names) == sorted(names)


@pytest.mark.parametrize("name", list(LIBRARY))
def test_library_optimizer_trains_the_sharded_lm(devices, name):
    mesh = make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    lm = LanguageModel(
        LMConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=16),
        activation_sharding=activation_constraint(mesh),
    )
    lr = 0.3 if name.startswith("sgd") else 1e-2
    tx = make_optimizer(name, optax.constant_schedule(lr), **LIBRARY[name])
    shardings = train.train_state_shardings(lm, tx, mesh)
    state = train.init_train_state(lm, tx, shardings, seed=0)
    bsh = train.batch_sharding(mesh, global_batch=8)
    step = train.make_train_step(train.lm_loss(lm), tx, shardings, bsh)
    batch = train.shard_batch(np.random.default_rng(0).integers(0, 256, (8, 17), np.int32), bsh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    # FRUGAL keeps AdamW state only for the regular params (the embedding here); the others
    # keep params-shaped buffers for every weight matrix
    name = ("embed",) if name == "frugal" else ("blocks", 0, "mlp", "wi")
    param = state.params
    for key in name:
        param = param[key]
    buffers = [x for x in jax.tree.leaves(state.opt_state) if x.shape == param.shape]
    assert buffers, f"the optimizer keeps params-shaped buffers for {name}"
    for leaf in buffers:  # ... and they keep the parameter's sharding through the steps
        assert leaf.sharding.is_equivalent_to(param.sharding, 2)


def test_unknown_name_and_missing_fraction():
    with pytest.raises(ValueError, match="unknown optimizer 'spamm'; choose one of: .*spam"):
        make_optimizer("spamm", 1e-3)
    with pytest.raises(TypeError, match="fraction"):
        make_optimizer("adam_coordinate_clipped", 1e-3)
    with pytest.raises(ValueError, match="`b1` must be in"):
        make_optimizer("spam", 1e-3, b1=2.0)
