"""The optax battery itself: optax built-ins pass it, deliberately broken transforms fail it."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

from tests.optim import battery

CASES = [
    # optax's Adam computes `b1 ** count` with an int32 counter: not strict-promotion clean.
    battery.Case(
        name="adamw",
        factory=optax.adamw,
        kwargs=dict(learning_rate=1e-2),
        needs_standard_promotion=True,
    ),
    battery.Case(
        name="sgd_momentum",
        factory=optax.sgd,
        kwargs=dict(learning_rate=1e-2, momentum=0.9),
        convergence_kwargs=dict(learning_rate=5e-2),
    ),
    battery.Case(
        name="lion",
        factory=optax.lion,
        kwargs=dict(learning_rate=3e-3),
        quadratic_steps=1000,
        logistic_steps=1000,
    ),
    # No learning rate: the convergence checks descend with `chain(tx, scale(-0.2))`.
    battery.Case(
        name="clip_by_global_norm",
        factory=optax.clip_by_global_norm,
        kwargs=dict(max_norm=1.0),
        has_learning_rate=False,
        outer_learning_rate=0.2,
    ),
]


@battery.parametrize(CASES)
def test_optax_builtins_pass(case, check):
    check(case)


class _DriftState(NamedTuple):
    momentum: optax.Updates


def _drifting_momentum(learning_rate: float) -> optax.GradientTransformation:
    """Momentum SGD whose float32 momentum buffer silently turns bfloat16 in ``update``."""

    def init(params):
        return _DriftState(momentum=optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        momentum = jax.tree.map(
            lambda m, g: (0.9 * m.astype(g.dtype) + g).astype(jnp.bfloat16),
            state.momentum,
            updates,
        )
        updates = jax.tree.map(lambda m, g: (-learning_rate * m).astype(g.dtype), momentum, updates)
        return updates, _DriftState(momentum=momentum)

    return optax.GradientTransformation(init, update)


def _ascent(learning_rate: float) -> optax.GradientTransformation:
    """Gradient *ascent*: the sign of the step is wrong."""
    return optax.scale(learning_rate)


DRIFTING = battery.Case(
    name="drifting", factory=_drifting_momentum, kwargs=dict(learning_rate=1e-2)
)
ASCENT = battery.Case(name="ascent", factory=_ascent, kwargs=dict(learning_rate=1e-2))


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (battery.check_state_stability, "leaves changed shape or dtype"),
        (battery.check_dtypes, "state dtypes changed"),
        (battery.check_no_recompilation, "compiled 2 times"),
    ],
)
def test_state_dtype_drift_fails(check, message):
    with pytest.raises(AssertionError, match=message):
        check(DRIFTING)


def test_wrong_sign_fails_convergence():
    with pytest.raises(AssertionError, match="quadratic"):
        battery.check_convergence_quadratic(ASCENT)
    with pytest.raises(AssertionError, match="logistic"):
        battery.check_convergence_logistic(ASCENT)


def test_ascent_passes_structural_checks():
    """The structural checks are not convergence checks in disguise: ascent is well-formed."""
    battery.check_init_abstract(ASCENT)
    battery.check_multi_steps(ASCENT)


def test_run_all_stops_at_first_failure():
    with pytest.raises(AssertionError, match=r"\[drifting\]"):
        battery.run_all(DRIFTING)


def test_checks_for_case_without_learning_rate():
    names = set(battery.checks_for(CASES[-1]))
    assert "schedule" not in names
    assert names == set(battery.CHECKS) - {"schedule"}


def test_case_validation():
    with pytest.raises(ValueError, match="learning_rate"):
        battery.Case(name="x", factory=optax.sgd, kwargs=dict(momentum=0.9))
    with pytest.raises(ValueError, match="distinct"):
        battery.params([CASES[0], CASES[0]])
