"""The shared optax battery: the properties every optimizer of ``optim/`` must have.

An optimizer's test module describes its configurations as :class:`Case` objects and runs every
applicable check on each of them, one pytest test per (case, check)::

    from tests.optim import battery

    CASES = [
        battery.Case(
            name="spam",
            factory=optim.spam,
            kwargs=dict(learning_rate=1e-2),
            static_args=("density", "seed"),
        ),
    ]


    @battery.parametrize(CASES)
    def test_battery(case, check):
        check(case)

The tests are named ``test_battery[spam-dtypes]``, ``test_battery[spam-sharding]``... A single
test can instead call ``battery.run_all(case)``, or any ``check_*`` function on its own. A check
that finds the transform breaking its property raises ``AssertionError`` naming the case.

The checks (each function's docstring states what it guarantees):

=====================  ==========================================================================
``init_abstract``      ``jax.eval_shape(tx.init, params)`` works and matches the real init
``state_stability``    the state keeps its structure, shapes and dtypes; it goes through
                       ``lax.cond`` (one branch updates, the other does not)
``dtypes``             f32 and bf16 params: updates in the params' dtypes, state dtypes fixed
``no_recompilation``   a jitted update called repeatedly compiles once
``sharding``           on an 8-device ``fsdp`` mesh the params' buffers keep the params' shardings
``sharding_explicit``  the same on a mesh with Explicit axes (``jax.make_mesh``'s default): init and
                       update give the same state types, with and without ``jit``
``complex``            complex params work (complex updates and state) or ``init`` raises a
                       ``TypeError`` naming the leaf; never a silent cast to real
``skip_nonfinite``     inside ``optax.apply_if_finite`` a NaN or Inf gradient leaves the state as
                       it was and gives zero updates; the next finite steps equal a run without it
``convergence_bf16``   bfloat16 params with the default state dtype minimize the quadratic (the
                       state's ``1 - decay`` must not round to 0 in bfloat16)
``inject_hyperparams`` ``optax.inject_hyperparams(factory)`` gives the same updates as ``factory``
``schedule``           ``learning_rate=optax.constant_schedule(lr)`` equals ``learning_rate=lr``
                       (only for a case with a learning rate)
``multi_steps``        ``optax.MultiSteps(tx, 2)`` applies the mean gradient every second step
``convergence_*``      a convex quadratic and an L2-regularized logistic regression are minimized
=====================  ==========================================================================

Dtype promotion: the tests run with ``jax_numpy_dtype_promotion="strict"`` and the library's own
optimizers must pass under it. A case flagged ``needs_standard_promotion=True`` (a transform the
library does not own, such as optax's Adam, whose ``b1 ** count`` mixes a Python float with an int32
counter) runs its checks under ``"standard"`` promotion instead. ``optax.MultiSteps`` itself divides
a float accumulator by an int32 counter, so its wrapper always runs under ``"standard"`` while the
wrapped transform is still traced under the case's promotion mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PARAM_SHAPES: Mapping[str, Any] = {"dense": {"kernel": (16, 4), "bias": (4,)}, "proj": (6, 5)}
"""Default parameters of the non-convergence checks: a nested dict with a 2-D leaf whose first
dimension divides by 8 (sharded over ``fsdp`` in the sharding check), a 1-D leaf and a 2-D leaf
that does not divide (replicated)."""

MESH_AXIS = "fsdp"
NUM_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of a transform run through the battery.

    Attributes:
      name: the test id (``test_battery[<name>-<check>]``).
      factory: builds the transform: ``factory(**kwargs)``. With ``has_learning_rate`` its first
        argument is ``learning_rate``.
      kwargs: the factory's keyword arguments. Must hold a numeric ``learning_rate`` when
        ``has_learning_rate``.
      static_args: arguments ``optax.inject_hyperparams`` must not turn into traced arrays (integer
        budgets, seeds, callables that are not schedules).
      has_learning_rate: False for a transform without a learning rate (e.g. pure clipping): the
        schedule check does not apply and the convergence checks descend with
        ``optax.chain(tx, optax.scale(-outer_learning_rate))``.
      needs_standard_promotion: run the checks under ``"standard"`` dtype promotion; only for
        transforms the library does not own (see the module docstring).
      convergence_kwargs: overrides of ``kwargs`` for the convergence checks only (e.g. a larger
        learning rate).
      outer_learning_rate: the descent step of the convergence checks without a learning rate.
      quadratic_steps, quadratic_tol: the quadratic check runs this many jitted steps from zero and
        requires ``max |x - x*| <= quadratic_tol`` (the targets ``x*`` are in ``[-1, 1]``).
      logistic_steps, logistic_tol: the logistic check runs this many steps from zero and requires
        ``loss(x) - loss(x*) <= logistic_tol`` (the initial gap is 0.22).
      bf16_tol: the bfloat16 quadratic check requires ``max |x - x*| <= bf16_tol`` (bfloat16's
        spacing near 1 is 2**-7, and optax.adamw stalls at 0.057 on it: 0.1 passes that and
        fails a divergence).
      rtol, atol: tolerances of the equivalence checks (inject_hyperparams, schedule,
        multi_steps); the compared computations are the same maths, so they are tight.
      param_shapes: a nested dict of shapes replacing :data:`PARAM_SHAPES` for the
        non-convergence checks (e.g. for a transform that needs larger matrices).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    static_args: tuple[str, ...] = ()
    has_learning_rate: bool = True
    needs_standard_promotion: bool = False
    convergence_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    outer_learning_rate: float = 0.1
    quadratic_steps: int = 500
    quadratic_tol: float = 1e-2
    logistic_steps: int = 500
    logistic_tol: float = 1e-4
    bf16_tol: float = 0.1
    rtol: float = 1e-6
    atol: float = 1e-7
    param_shapes: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not self.name:
            raise ValueError(f"`name` must be a non-empty string, got name={self.name!r}")
        if self.has_learning_rate:
            lr = self.kwargs.get("learning_rate")
            if isinstance(lr, bool) or not isinstance(lr, int | float):
                raise ValueError(
                    f"case {self.name!r}: a case with `has_learning_rate=True` needs a numeric "
                    f"kwargs['learning_rate'], got learning_rate={lr!r}"
                )

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        """``factory(**{**kwargs, **overrides})``."""
        return self.factory(**{**self.kwargs, **overrides})


# ----------------------------------------------------------------------------- helpers


def _promotion(case: Case) -> contextlib.AbstractContextManager:
    """``"standard"`` promotion for a flagged case; otherwise the ambient (strict) mode."""
    if case.needs_standard_promotion:
        return jax.numpy_dtype_promotion("standard")
    return contextlib.nullcontext()


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _shapes(case: Case) -> Any:
    return PARAM_SHAPES if case.param_shapes is None else case.param_shapes


def _normal_tree(shapes: Any, seed: int, dtype: Any = jnp.float32) -> Any:
    """Deterministic standard-normal arrays with the given shapes (a fresh tree per ``seed``)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s), dtype), shapes, is_leaf=_is_shape
    )


def _path_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _assert_same_layout(actual: Any, expected: Any, what: str) -> None:
    """Same tree structure, and per leaf the same shape and dtype."""
    s_act, s_exp = jax.tree.structure(actual), jax.tree.structure(expected)
    assert s_act == s_exp, f"{what}: tree structure changed\n  {s_exp}\n->{s_act}"
    bad = [
        f"  {path}: {tuple(e.shape)} {e.dtype} -> {tuple(a.shape)} {a.dtype}"
        for (path, a), (_, e) in zip(_path_leaves(actual), _path_leaves(expected), strict=True)
        if tuple(a.shape) != tuple(e.shape) or a.dtype != e.dtype
    ]
    assert not bad, f"{what}: leaves changed shape or dtype\n" + "\n".join(bad)


def _plain(x: Any) -> np.ndarray:
    """A leaf as a float64 NumPy array (PRNG keys as their raw key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).astype(np.float64)


def _assert_trees_close(actual: Any, expected: Any, case: Case, what: str) -> None:
    s_act, s_exp = jax.tree.structure(actual), jax.tree.structure(expected)
    assert s_act == s_exp, f"{what}: tree structure differs\n  {s_exp}\n  {s_act}"
    for (path, a), (_, e) in zip(_path_leaves(actual), _path_leaves(expected), strict=True):
        np.testing.assert_allclose(
            _plain(a),
            _plain(e),
            rtol=case.rtol,
            atol=case.atol,
            err_msg=f"{what} at {path}",
        )


def _is_zero(tree: Any) -> bool:
    return all(bool(np.all(np.asarray(x) == 0)) for x in jax.tree.leaves(tree))


def _updates_trajectory(
    tx: optax.GradientTransformation, shapes: Any, steps: int, *, fixed_params: bool = False
) -> list[Any]:
    """The updates of ``steps`` jitted calls on fresh gradients, applying them unless fixed."""
    params = _normal_tree(shapes, seed=0)
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    out = []
    for k in range(steps):
        updates, state = update(_normal_tree(shapes, seed=100 + k), state, params)
        out.append(updates)
        if not fixed_params:
            params = optax.apply_updates(params, updates)
    return out


def _is_params_like(params: Any) -> Callable[[Any], bool]:
    """A predicate: does a node have the params' tree structure and leaf shapes?"""
    treedef = jax.tree.structure(params)
    shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]

    def predicate(node: Any) -> bool:
        leaves, node_def = jax.tree.flatten(node)
        return node_def == treedef and [tuple(getattr(x, "shape", ())) for x in leaves] == shapes

    return predicate


def param_buffers(state: Any, params: Any) -> Iterator[tuple[str, Any, Any]]:
    """``(path, state_leaf, param)`` for every leaf of a params-structured subtree of ``state``.

    Those are the per-parameter buffers (``ScaleByAdamState.mu``, ``TraceState.trace``...): a
    subtree with exactly the params' tree structure and shapes; leaf ``i`` belongs to param ``i``.
    """
    like = _is_params_like(params)
    for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=like)[0]:
        if like(node):
            for (sub, leaf), param in zip(_path_leaves(node), jax.tree.leaves(params), strict=True):
                yield jax.tree_util.keystr(path) + sub, leaf, param


def _state_shardings(abstract_state: Any, params: Any, replicated: NamedSharding) -> Any:
    """Each per-parameter buffer gets its parameter's sharding; every other leaf is replicated."""
    like = _is_params_like(params)

    def one(node: Any) -> Any:
        if like(node):
            return jax.tree.map(lambda _, p: p.sharding, node, params)
        return replicated

    return jax.tree.map(one, abstract_state, is_leaf=like)


def _under(tx: optax.GradientTransformation, mode: str) -> optax.GradientTransformation:
    """``tx`` whose init and update are traced under dtype promotion ``mode``."""

    def init(params):
        with jax.numpy_dtype_promotion(mode):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion(mode):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- checks


def check_init_abstract(case: Case) -> None:
    """``init`` accepts ``jax.ShapeDtypeStruct`` leaves.

    Guarantees ``jax.eval_shape(tx.init, params)`` (the restore target of a checkpoint, the input
    of the library's sharding derivation) works without allocating, and that its structure,
    shapes and dtypes are those of the real ``tx.init(params)``, for float32 and bfloat16 params.
    """
    with _promotion(case):
        tx = case.make()
        for dtype in (jnp.float32, jnp.bfloat16):
            params = _normal_tree(_shapes(case), seed=0, dtype=dtype)
            abstract_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
            abstract = jax.eval_shape(tx.init, abstract_params)
            real = tx.init(params)
            _assert_same_layout(
                abstract, real, f"[{case.name}] eval_shape(init) vs init ({jnp.dtype(dtype)})"
            )


def check_state_stability(case: Case) -> None:
    """The state is a fixed type: the same after init and after updates, and ``lax.cond``-able.

    Guarantees that ``jax.tree.structure``, shapes and dtypes of the state after init equal those
    after one and three updates, and that ``lax.cond(flag, update, keep, state)`` compiles (its
    branches must return identical types, weak types included) and gives the updated state when
    ``flag`` is True and the untouched state when it is False.
    """
    with _promotion(case):
        tx = case.make()
        shapes = _shapes(case)
        params = _normal_tree(shapes, seed=0)
        update = jax.jit(tx.update)
        state0 = jax.jit(tx.init)(params)
        state = state0
        for k in range(3):
            _, state = update(_normal_tree(shapes, seed=100 + k), state, params)
            _assert_same_layout(state, state0, f"[{case.name}] state after update {k + 1} vs init")

        grads = _normal_tree(shapes, seed=100)

        @jax.jit
        def maybe_update(flag, state, grads, params):
            return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

        try:
            updated = maybe_update(True, state0, grads, params)
            kept = maybe_update(False, state0, grads, params)
        except TypeError as e:
            raise AssertionError(
                f"[{case.name}] the state cannot go through lax.cond (its type changes in "
                f"update): {e}"
            ) from e
        _, expected = update(grads, state0, params)
        _assert_trees_close(updated, expected, case, f"[{case.name}] lax.cond update branch")
        _assert_trees_close(kept, state0, case, f"[{case.name}] lax.cond keep branch")


def check_dtypes(case: Case) -> None:
    """Dtypes are preserved for float32 and bfloat16 params.

    Guarantees that every update has its param's dtype, and that every state leaf keeps the dtype
    it had after init through three jitted updates (a bfloat16 param may have a float32 buffer;
    it must stay float32).
    """
    with _promotion(case):
        tx = case.make()
        shapes = _shapes(case)
        for dtype in (jnp.float32, jnp.bfloat16):
            name = jnp.dtype(dtype).name
            params = _normal_tree(shapes, seed=0, dtype=dtype)
            update = jax.jit(tx.update)
            state0 = jax.jit(tx.init)(params)
            state = state0
            for k in range(3):
                grads = _normal_tree(shapes, seed=100 + k, dtype=dtype)
                updates, state = update(grads, state, params)
                bad = [
                    f"  {path}: {jnp.dtype(u.dtype)}"
                    for (path, u) in _path_leaves(updates)
                    if jnp.dtype(u.dtype) != jnp.dtype(dtype)
                ]
                assert not bad, f"[{case.name}] {name} params got updates of another dtype\n" + (
                    "\n".join(bad)
                )
                params = optax.apply_updates(params, updates)
            changed = [
                f"  {path}: {a.dtype} -> {b.dtype}"
                for (path, a), (_, b) in zip(_path_leaves(state0), _path_leaves(state), strict=True)
                if a.dtype != b.dtype
            ]
            assert not changed, f"[{case.name}] {name} params: state dtypes changed\n" + (
                "\n".join(changed)
            )


def check_no_recompilation(case: Case) -> None:
    """A jitted update compiles once.

    Guarantees that feeding the state returned by ``update`` back into it, with new params and
    gradients of the same shapes, hits the compilation cache: ``update._cache_size() == 1`` after
    four calls (a state whose dtype, weak type or structure drifts would recompile every step).
    """
    with _promotion(case):
        tx = case.make()
        shapes = _shapes(case)
        params = _normal_tree(shapes, seed=0)
        # Fresh functions: jax.jit shares its cache between wrappers of one function (e.g. optax's
        # module-level `init_empty_state`), which would count other tests' compilations.
        init = jax.jit(lambda params: tx.init(params))
        update = jax.jit(lambda updates, state, params: tx.update(updates, state, params))
        state = init(params)
        for k in range(4):
            updates, state = update(_normal_tree(shapes, seed=100 + k), state, params)
            params = optax.apply_updates(params, updates)
        init(params)
        assert init._cache_size() == 1, f"[{case.name}] jitted init compiled {init._cache_size()}x"
        assert update._cache_size() == 1, (
            f"[{case.name}] jitted update compiled {update._cache_size()} times in 4 calls"
        )


def check_sharding(case: Case, axis_type: Any = jax.sharding.AxisType.Auto) -> None:
    """Per-parameter buffers live in their parameter's sharding on an 8-device ``fsdp`` mesh.

    2-D params whose first dimension divides by 8 are sharded ``P("fsdp", None)``, the others
    replicated. The state is created by ``jax.jit(tx.init, out_shardings=...)`` with shardings
    derived from ``jax.eval_shape(tx.init, params)`` as the library does (a params-structured
    subtree gets the params' shardings, other leaves are replicated); then three jitted updates
    (no ``out_shardings``) run. Guarantees that after init and after every update each
    per-parameter buffer (see :func:`param_buffers`) and each update is sharded like its param
    (``is_equivalent_to``), and that the state's shardings after 1 and after 3 updates are
    identical (so a training loop settles on one compiled update).
    """
    mesh = jax.make_mesh((NUM_DEVICES,), (MESH_AXIS,), axis_types=(axis_type,))
    replicated = NamedSharding(mesh, P())

    def param_sharding(p):
        if p.ndim == 2 and p.shape[0] % NUM_DEVICES == 0:
            return NamedSharding(mesh, P(MESH_AXIS, None))
        return replicated

    def assert_like_params(tree_items, what):
        bad = [
            f"  {path}: {leaf.sharding} (param: {param.sharding})"
            for path, leaf, param in tree_items
            if not leaf.sharding.is_equivalent_to(param.sharding, param.ndim)
        ]
        assert not bad, f"[{case.name}] {what}: not sharded like the params\n" + "\n".join(bad)

    with _promotion(case):
        tx = case.make()
        shapes = _shapes(case)
        host_params = _normal_tree(shapes, seed=0)
        shardings = jax.tree.map(param_sharding, host_params)
        params = jax.device_put(host_params, shardings)
        assert any(s != replicated for s in jax.tree.leaves(shardings)), (
            f"[{case.name}] param_shapes has no 2-D leaf whose first dim divides by {NUM_DEVICES}"
        )

        abstract = jax.eval_shape(tx.init, params)
        state = jax.jit(tx.init, out_shardings=_state_shardings(abstract, params, replicated))(
            params
        )
        assert_like_params(param_buffers(state, params), "state after init")

        update = jax.jit(tx.update)
        state_shardings = []
        for k in range(3):
            grads = jax.device_put(_normal_tree(shapes, seed=100 + k), shardings)
            updates, state = update(grads, state, params)
            pairs = zip(_path_leaves(updates), jax.tree.leaves(params), strict=True)
            assert_like_params([(path, u, p) for (path, u), p in pairs], f"updates of step {k + 1}")
            assert_like_params(param_buffers(state, params), f"state after update {k + 1}")
            state_shardings.append(jax.tree.map(lambda x: x.sharding, state))
        changed = [
            f"  {path}: {a} -> {b}"
            for (path, a), (_, b) in zip(
                _path_leaves(state_shardings[0]), _path_leaves(state_shardings[2]), strict=True
            )
            if a != b
        ]
        assert not changed, f"[{case.name}] state shardings changed from update 1 to 3\n" + (
            "\n".join(changed)
        )


def check_sharding_explicit(case: Case) -> None:
    """The sharding check on an Explicit-axes mesh, plus optax's ``sharding_test`` cases.

    With Explicit axes a sharding is part of an array's type, so a state buffer created without
    its param's sharding (``jnp.zeros(p.shape)``) changes type on the first update, and a reshape
    or gather of a sharded gradient must say where its result lives. Guarantees what
    :func:`check_sharding` does on such a mesh, and that an unjitted ``init`` + ``update`` gives
    the same state types (``jax.typeof``, shardings included) as the jitted ones.
    """
    check_sharding(case, jax.sharding.AxisType.Explicit)
    mesh = jax.make_mesh((NUM_DEVICES,), (MESH_AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))
    with _promotion(case), jax.sharding.set_mesh(mesh):
        tx = case.make()
        shapes = _shapes(case)

        def put(tree):
            return jax.tree.map(
                lambda x: jax.device_put(
                    x,
                    NamedSharding(
                        mesh, P(MESH_AXIS, None) if x.ndim == 2 and x.shape[0] % 8 == 0 else P()
                    ),
                ),
                tree,
            )

        params, grads = put(_normal_tree(shapes, seed=0)), put(_normal_tree(shapes, seed=100))
        eager_state = tx.init(params)
        _, eager_next = tx.update(grads, eager_state, params)
        jit_state = jax.jit(tx.init)(params)
        _, jit_next = jax.jit(tx.update)(grads, jit_state, params)
        types = lambda tree: [str(jax.typeof(x)) for x in jax.tree.leaves(tree)]
        for what, a, b in (
            ("init (eager) vs update (eager)", eager_state, eager_next),
            ("init (jit) vs update (jit)", jit_state, jit_next),
            ("init (eager) vs init (jit)", eager_state, jit_state),
        ):
            assert types(a) == types(b), (
                f"[{case.name}] explicit mesh: state types differ, {what}\n  {types(a)}\n  "
                f"{types(b)}"
            )


def check_complex(case: Case) -> None:
    """Complex params are handled, or refused at ``init`` with a ``TypeError``.

    Guarantees that ``init`` on complex64 params either raises ``TypeError`` whose message names
    the complex leaf, or returns a state with which ``update`` gives complex64 updates (nothing
    silently truncated to its real part).
    """
    with _promotion(case):
        tx = case.make()
        params = {"z": jnp.asarray(np.arange(6.0).reshape(2, 3) * (1 + 1j), jnp.complex64)}
        try:
            state = tx.init(params)
        except TypeError as e:
            assert "['z']" in str(e) and "complex" in str(e), (
                f"[{case.name}] complex rejection does not name the leaf: {e}"
            )
            return
        updates, _ = tx.update(jax.tree.map(lambda p: p * (1 - 2j), params), state, params)
        assert updates["z"].dtype == jnp.complex64, f"[{case.name}] complex updates became real"
        assert np.any(np.imag(np.asarray(updates["z"])) != 0), f"[{case.name}] imaginary part lost"


def check_skip_nonfinite(case: Case) -> None:
    """``optax.apply_if_finite(tx)`` skips a non-finite step with nothing corrupted.

    Runs the wrapped transform on ``g1, NaN, Inf, g2, g3`` (one NaN or Inf coordinate in an
    otherwise finite gradient) and the bare transform on ``g1, g2, g3``. Guarantees that the
    non-finite steps return all-zero updates and that every other step's updates and the final
    inner state equal the bare run's (``rtol``/``atol``). The wrapper runs under ``"standard"``
    promotion (optax's counters); the transform keeps the case's mode.
    """
    with _promotion(case):
        mode = jax.config.jax_numpy_dtype_promotion
        tx = case.make()
        shapes = _shapes(case)
        params = _normal_tree(shapes, seed=0)
        good = [_normal_tree(shapes, seed=100 + k) for k in range(3)]

        def poisoned(value):
            tree = _normal_tree(shapes, seed=200)
            first, treedef = jax.tree.flatten(tree)
            first[0] = first[0].reshape(-1).at[0].set(value).reshape(first[0].shape)
            return treedef.unflatten(first)

        update = jax.jit(tx.update)
        state = jax.jit(tx.init)(params)
        expected = []
        for g in good:
            updates, state = update(g, state, params)
            expected.append(updates)
        safe = optax.apply_if_finite(_under(tx, mode), max_consecutive_errors=5)
        with jax.numpy_dtype_promotion("standard"):
            safe_update = jax.jit(safe.update)
            safe_state = jax.jit(safe.init)(params)
            got = []
            for g in (good[0], poisoned(jnp.nan), poisoned(jnp.inf), good[1], good[2]):
                updates, safe_state = safe_update(g, safe_state, params)
                got.append(updates)
        for k in (1, 2):
            assert _is_zero(got[k]), f"[{case.name}] a non-finite step changed the params"
        for k, want in ((0, expected[0]), (3, expected[1]), (4, expected[2])):
            _assert_trees_close(got[k], want, case, f"[{case.name}] apply_if_finite step {k + 1}")
        _assert_trees_close(
            safe_state.inner_state, state, case, f"[{case.name}] state after skipped steps"
        )


def check_inject_hyperparams(case: Case) -> None:
    """Numeric hyperparameters may be traced values.

    Guarantees that ``optax.inject_hyperparams(factory, static_args=case.static_args)(**kwargs)``
    gives the same updates as ``factory(**kwargs)`` (``rtol``/``atol``) over four jitted steps:
    the transform works when its hyperparameters are float32 arrays in the state, and treats them
    exactly like the Python numbers.
    """
    with _promotion(case):
        shapes = _shapes(case)
        plain = _updates_trajectory(case.make(), shapes, steps=4)
        wrapped = optax.inject_hyperparams(case.factory, static_args=case.static_args)
        injected = _updates_trajectory(wrapped(**case.kwargs), shapes, steps=4)
        for k, (a, b) in enumerate(zip(injected, plain, strict=True)):
            _assert_trees_close(a, b, case, f"[{case.name}] inject_hyperparams, step {k + 1}")


def check_schedule(case: Case) -> None:
    """A learning rate may be a schedule.

    Guarantees that ``learning_rate=optax.constant_schedule(lr)`` gives the same updates as
    ``learning_rate=lr`` (``rtol``/``atol``) over four jitted steps. Only for a case with a
    learning rate.
    """
    assert case.has_learning_rate, f"[{case.name}] the schedule check needs a learning rate"
    with _promotion(case):
        shapes = _shapes(case)
        lr = case.kwargs["learning_rate"]
        constant = _updates_trajectory(case.make(), shapes, steps=4)
        scheduled = _updates_trajectory(
            case.make(learning_rate=optax.constant_schedule(lr)), shapes, steps=4
        )
        for k, (a, b) in enumerate(zip(scheduled, constant, strict=True)):
            _assert_trees_close(a, b, case, f"[{case.name}] constant schedule, step {k + 1}")


def check_multi_steps(case: Case) -> None:
    """The transform works inside ``optax.MultiSteps(tx, every_k_schedule=2)``.

    Over four jitted calls on gradients ``g1..g4`` (params fixed), guarantees that calls 1 and 3
    return all-zero updates and that calls 2 and 4 return what the bare transform returns for two
    steps on the averaged gradients ``mean(g1, g2)`` and ``mean(g3, g4)`` (``rtol``/``atol``;
    these are not all zero). The MultiSteps wrapper runs under ``"standard"`` promotion (optax
    divides a float by an int32 counter); the transform inside it keeps the case's mode.
    """
    with _promotion(case):
        mode = jax.config.jax_numpy_dtype_promotion
        tx = case.make()
        shapes = _shapes(case)
        params = _normal_tree(shapes, seed=0)
        grads = [_normal_tree(shapes, seed=100 + k) for k in range(4)]
        mean = lambda a, b: jax.tree.map(lambda x, y: x + (y - x) / 2, a, b)  # as MultiSteps

        update = jax.jit(tx.update)
        state = jax.jit(tx.init)(params)
        expected = []
        for a, b in ((grads[0], grads[1]), (grads[2], grads[3])):
            updates, state = update(mean(a, b), state, params)
            expected.append(updates)
        assert not _is_zero(expected[0]), f"[{case.name}] the reference update is all zeros"

        multi = optax.MultiSteps(_under(tx, mode), every_k_schedule=2)
        with jax.numpy_dtype_promotion("standard"):
            multi_update = jax.jit(multi.update)
            multi_state = jax.jit(multi.init)(params)
            got = []
            for g in grads:
                updates, multi_state = multi_update(g, multi_state, params)
                got.append(updates)
        for k in (0, 2):
            assert _is_zero(got[k]), f"[{case.name}] MultiSteps call {k + 1} updated the params"
        for k, want in ((1, expected[0]), (3, expected[1])):
            _assert_trees_close(got[k], want, case, f"[{case.name}] MultiSteps call {k + 1}")


def _convergence_transform(case: Case) -> optax.GradientTransformation:
    tx = case.make(**case.convergence_kwargs)
    if not case.has_learning_rate:
        tx = optax.chain(tx, optax.scale(-case.outer_learning_rate))
    return tx


def _minimize(case: Case, loss: Callable, params: Any, steps: int) -> Any:
    """``steps`` jitted steps of the case's transform on ``loss`` (one compiled loop)."""
    tx = _convergence_transform(case)

    @jax.jit
    def run(params):
        def body(_, carry):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

    return run(params)


def quadratic_problem() -> tuple[Callable, Any, Any]:
    """``(loss, start, solution)``: ``sum a * (x - t)**2`` over ``{"w": (4, 3), "b": (3,)}``.

    Curvatures ``a`` are in ``[0.5, 2]`` (condition number <= 4), targets ``t`` in ``[-1, 1]``,
    the start is zero.
    """
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "b": (3,)}
    curv = {k: rng.uniform(0.5, 2.0, s).astype(np.float32) for k, s in shapes.items()}
    target = {k: rng.uniform(-1.0, 1.0, s).astype(np.float32) for k, s in shapes.items()}

    def loss(params):
        terms = jax.tree.map(lambda x, a, t: jnp.sum(a * jnp.square(x - t)), params, curv, target)
        return sum(jax.tree.leaves(terms))

    start = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    return loss, start, target


def logistic_problem() -> tuple[Callable, Any, float]:
    """``(loss, start, optimal_loss)``: L2-regularized logistic regression.

    The params are ``{"w": (5,), "b": ()}`` (a scalar leaf).

    64 samples with 5 Gaussian features and noisy labels (not separable), regularization
    ``1e-2 / 2 * (|w|^2 + b^2)`` (strongly convex); the optimum is found by Newton's method in
    float64 NumPy.
    """
    rng = np.random.default_rng(1)
    n, d, reg = 64, 5, 1e-2
    x = rng.standard_normal((n, d))
    y = np.where(x @ rng.standard_normal(d) + 0.5 + rng.standard_normal(n) > 0, 1.0, -1.0)

    features = np.concatenate([x, np.ones((n, 1))], axis=1)
    z = np.zeros(d + 1)
    for _ in range(50):
        s = 1.0 / (1.0 + np.exp(y * (features @ z)))  # sigmoid(-margin)
        grad = -features.T @ (y * s) / n + reg * z
        hess = (features.T * (s * (1 - s))) @ features / n + reg * np.eye(d + 1)
        z -= np.linalg.solve(hess, grad)
    optimal = float(np.mean(np.logaddexp(0.0, -y * (features @ z))) + 0.5 * reg * z @ z)

    x32, y32 = x.astype(np.float32), y.astype(np.float32)

    def loss(params):
        margins = y32 * (x32 @ params["w"] + params["b"])
        penalty = jnp.sum(jnp.square(params["w"])) + jnp.square(params["b"])
        return jnp.mean(jax.nn.softplus(-margins)) + 0.5 * reg * penalty

    start = {"w": jnp.zeros((d,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return loss, start, optimal


def check_convergence_quadratic(case: Case) -> None:
    """Minimizes a convex quadratic (see :func:`quadratic_problem`).

    Guarantees ``max |x - x*| <= case.quadratic_tol`` after ``case.quadratic_steps`` jitted steps
    from zero (float32).
    """
    with _promotion(case):
        loss, start, target = quadratic_problem()
        final = _minimize(case, loss, start, case.quadratic_steps)
        err = max(float(np.max(np.abs(final[k] - target[k]))) for k in target)
        assert err <= case.quadratic_tol, (
            f"[{case.name}] quadratic: max |x - x*| = {err:.3g} > {case.quadratic_tol:g} "
            f"after {case.quadratic_steps} steps"
        )


def check_convergence_bf16(case: Case) -> None:
    """Minimizes the quadratic with bfloat16 params and the default (bfloat16) state dtype.

    Guarantees ``max |x - x*| <= case.bf16_tol`` after ``case.quadratic_steps`` jitted steps from
    zero: the moments' ``1 - decay`` must be computed in at least float32 (in bfloat16,
    ``1 - 0.999`` is 0 and the second moment never grows). ``optax.adamw`` passes it.
    """
    with _promotion(case):
        loss32, start, target = quadratic_problem()

        def loss(params):
            return loss32(jax.tree.map(lambda x: x.astype(jnp.float32), params))

        start = jax.tree.map(lambda x: x.astype(jnp.bfloat16), start)
        final = _minimize(case, loss, start, case.quadratic_steps)
        err = max(
            float(np.max(np.abs(np.asarray(final[k], np.float32) - target[k]))) for k in target
        )
        assert np.isfinite(err) and err <= case.bf16_tol, (
            f"[{case.name}] bfloat16 quadratic: max |x - x*| = {err:.3g} > {case.bf16_tol:g} "
            f"after {case.quadratic_steps} steps"
        )


def check_convergence_logistic(case: Case) -> None:
    """Minimizes an L2-regularized logistic regression (see :func:`logistic_problem`).

    Guarantees ``loss(x) - loss(x*) <= case.logistic_tol`` after ``case.logistic_steps`` jitted
    steps from zero (float32).
    """
    with _promotion(case):
        loss, start, optimal = logistic_problem()
        final = _minimize(case, loss, start, case.logistic_steps)
        gap = float(loss(final)) - optimal
        assert gap <= case.logistic_tol, (
            f"[{case.name}] logistic regression: loss gap {gap:.3g} > {case.logistic_tol:g} "
            f"after {case.logistic_steps} steps"
        )


# ----------------------------------------------------------------------------- running

CHECKS: Mapping[str, Callable[[Case], None]] = {
    "init_abstract": check_init_abstract,
    "state_stability": check_state_stability,
    "dtypes": check_dtypes,
    "no_recompilation": check_no_recompilation,
    "sharding": check_sharding,
    "sharding_explicit": check_sharding_explicit,
    "complex": check_complex,
    "skip_nonfinite": check_skip_nonfinite,
    "inject_hyperparams": check_inject_hyperparams,
    "schedule": check_schedule,
    "multi_steps": check_multi_steps,
    "convergence_quadratic": check_convergence_quadratic,
    "convergence_logistic": check_convergence_logistic,
    "convergence_bf16": check_convergence_bf16,
}
"""Every check, by name, in the order :func:`run_all` runs them (structure before maths)."""


def checks_for(case: Case) -> dict[str, Callable[[Case], None]]:
    """The checks that apply to ``case`` (``schedule`` only with a learning rate)."""
    return {
        name: check
        for name, check in CHECKS.items()
        if case.has_learning_rate or check is not check_schedule
    }


def run_all(case: Case) -> None:
    """Runs every applicable check on ``case``; the first failure raises ``AssertionError``."""
    for check in checks_for(case).values():
        check(case)


def params(cases: Sequence[Case]) -> list[Any]:
    """``pytest.param(case, check, id="<case>-<check>")`` for every case and applicable check."""
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be distinct, got {names}")
    return [
        pytest.param(case, check, id=f"{case.name}-{name}")
        for case in cases
        for name, check in checks_for(case).items()
    ]


def parametrize(cases: Sequence[Case]) -> pytest.MarkDecorator:
    """``@battery.parametrize(CASES)`` on ``def test_battery(case, check): check(case)``."""
    return pytest.mark.parametrize(("case", "check"), params(cases))
