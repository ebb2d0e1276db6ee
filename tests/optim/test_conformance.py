"""What an optax user expects of every optimizer here, beyond the battery: optax's argument names
and mask forms, any pytree structure, a state type that does not depend on hyperparameters,
composition with ``optax.masked``, and state that a non-finite *output* does not poison."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim

PARAMS = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}, "proj": jnp.ones((6, 5))}

# (name, factory of (mu_dtype) -> transform, path of a first moment of `dense.kernel` in state)
MU_DTYPE_CASES = [
    ("spam", lambda **kw: optim.scale_by_spam(**kw), lambda s: s.mu["dense"]["kernel"]),
    ("diffgrad", lambda **kw: optim.scale_by_diffgrad(**kw), lambda s: s.mu["dense"]["kernel"]),
    (
        "adam_coordinate_clipped",
        lambda **kw: optim.scale_by_adam_coordinate_clipped(0.1, **kw),
        lambda s: s.mu["dense"]["kernel"],
    ),
    (
        "frugal",
        lambda **kw: optim.scale_by_frugal(density=0.5, **kw),
        lambda s: s.active_mu[0],
    ),
]


@pytest.mark.parametrize(("name", "factory", "first_moment"), MU_DTYPE_CASES)
def test_mu_dtype_sets_the_first_moment_as_in_optax(name, factory, first_moment):
    tx = factory(mu_dtype=jnp.bfloat16)
    state = tx.init(PARAMS)
    assert first_moment(state).dtype == jnp.bfloat16, name
    other = [x for x in jax.tree.leaves(state) if x.dtype == jnp.float32]
    assert other, f"{name}: the second moment keeps the params' dtype"
    updates, new_state = jax.jit(tx.update)(PARAMS, state, PARAMS)
    assert first_moment(new_state).dtype == jnp.bfloat16
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "factory",
    [
        lambda mask: optim.spam(1e-1, weight_decay=0.5, mask=mask),
        lambda mask: optim.diffgrad(1e-1, weight_decay=0.5, mask=mask),
        lambda mask: optim.adam_coordinate_clipped(1e-1, 0.1, weight_decay=0.5, mask=mask),
        lambda mask: optim.frugal(1e-1, weight_decay=0.5, mask=mask),
    ],
    ids=["spam", "diffgrad", "adam_coordinate_clipped", "frugal"],
)
def test_a_prefix_weight_decay_mask_equals_the_full_mask(factory):
    prefix = {"dense": False, "proj": True}
    full = {"dense": {"kernel": False, "bias": False}, "proj": True}
    grads = jax.tree.map(lambda p: 0.1 * p, PARAMS)
    a, b = factory(prefix), factory(full)
    ua, _ = a.update(grads, a.init(PARAMS), PARAMS)
    ub, _ = b.update(grads, b.init(PARAMS), PARAMS)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    none = factory(lambda p: jax.tree.map(lambda _: False, p))
    un, _ = none.update(grads, none.init(PARAMS), PARAMS)
    assert not np.array_equal(ua["proj"], un["proj"]), "the mask selects decay"
    np.testing.assert_array_equal(ua["dense"]["kernel"], un["dense"]["kernel"])


def test_clip_spikes_keeps_tuple_params_as_tuples():
    params = (jnp.ones(3), (jnp.ones((2, 2)), jnp.ones(1)))
    tx = optim.clip_spikes(reset_interval=10, no_clip_steps=0)
    updates, state = tx.update(params, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert jax.tree.structure(state.nu) == jax.tree.structure(params)


def test_spam_state_type_does_not_depend_on_density():
    dense = jax.eval_shape(optim.scale_by_spam(density=1.0).init, PARAMS)
    sparse = jax.eval_shape(optim.scale_by_spam(density=0.5).init, PARAMS)
    assert type(dense.key) is type(sparse.key)
    assert jax.dtypes.issubdtype(dense.key.dtype, jax.dtypes.prng_key)


def test_sparse_spam_inside_optax_masked():
    mask = {"dense": {"kernel": True, "bias": False}, "proj": True}
    tx = optax.masked(optim.spam(1e-2, density=0.5, reset_interval=4, no_clip_steps=1), mask)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for _ in range(6):  # through a mask redraw and a reset
        updates, state = update(PARAMS, state, PARAMS)
    kernel = np.asarray(updates["dense"]["kernel"]).reshape(-1)
    assert np.count_nonzero(kernel) == 16, "half the kernel's entries have momentum"
    np.testing.assert_array_equal(updates["dense"]["bias"], PARAMS["dense"]["bias"])


def test_a_nan_direction_does_not_poison_diffgrads_previous_gradient():
    # eps = 0 and a zero gradient: the direction is 0/0 = NaN, from finite inputs; the stored
    # previous gradient must still be the (finite) gradient, not NaN via the ordering trick.
    tx = optim.scale_by_diffgrad(eps=0.0)
    params = {"w": jnp.ones(3)}
    updates, state = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    assert np.all(np.isnan(updates["w"]))
    np.testing.assert_array_equal(state.prev_grad["w"], np.zeros(3))


@pytest.mark.parametrize(
    "tx",
    [
        optim.spam(1e-3),
        optim.diffgrad(1e-3),
        optim.adam_coordinate_clipped(1e-3, 0.1),
        optim.sgd_coordinate_clipped(1e-3, 0.1),
        optim.frugal(1e-3),
        optim.clip_spikes(),
    ],
    ids=["spam", "diffgrad", "adam_coordinate_clipped", "sgd_coordinate_clipped", "frugal", "clip"],
)
def test_complex_params_are_refused_at_init_naming_the_leaf(tx):
    params = {"real": jnp.ones((4, 4)), "z": jnp.ones((4, 4), jnp.complex64)}
    with pytest.raises(TypeError, match=r"\['z'\] of dtype complex64"):
        tx.init(params)


def test_donated_steps_hold_no_extra_params_sized_buffer():
    """Peak memory of the donated jitted step, from the compiled program (deterministic): SPAM
    needs what AdamW needs (p, g, m, v), diffGrad one buffer more (its previous gradient). An
    extra copy of a state buffer (XLA keeping the old value of a buffer updated in place, which
    `optim.moments.after` and the direction's form avoid) would add a params-sized buffer."""
    from jaxlib_ext import costs

    params = {"a": jnp.zeros((512, 1024)), "b": jnp.zeros((512, 512))}
    size = sum(x.nbytes for x in jax.tree.leaves(params))

    def peak(tx):
        def step(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        with jax.numpy_dtype_promotion("standard"):  # optax's adamw
            report = costs.analyze(
                jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), params
            )
        return report.memory.peak_bytes

    adamw = peak(optax.adamw(1e-3))
    assert adamw <= 4 * size + (1 << 16)
    assert peak(optim.spam(1e-3)) <= adamw + (1 << 16)
    assert peak(optim.diffgrad(1e-3)) <= adamw + size + (1 << 16)
