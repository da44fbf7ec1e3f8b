"""`simulate`: one jitted, vmapped `diffrax.diffeqsolve` over batches of tokens and LoRAs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import DTypeLike

from .._base import (
    Array,
    ArrayLike,
    Float,
    Int,
    PyTree,
    ScalarLike,
    Shaped,
    as_float_array,
    check_choice,
    check_dtype,
    check_finite,
    check_int,
    check_memory,
    check_positive,
    check_tokens,
    is_number,
    register_cache,
)
from .._model import AbstractField, LoRA, exact_row_max, expm, unit_rows, use_blockwise
from .solvers import ADAPTIVE, RK4, get_solver

STATUS_OK = 0
STATUS_MAX_STEPS = 1
STATUS_SOLVER_FAILED = 2
STATUS_NONFINITE = 3
STATUS_MESSAGES = {
    STATUS_OK: "ok",
    STATUS_MAX_STEPS: "maximum number of steps reached (raise max_steps)",
    STATUS_SOLVER_FAILED: "the solver failed (step size underflow or internal error)",
    STATUS_NONFINITE: "the trajectory became NaN or inf",
}
ADJOINTS = ("checkpoint", "backsolve", "forward")


class Solution(eqx.Module):
    """Output of `simulate`.

    - `ts`: output times, shape `(T,)`.
    - `xs`: tokens, shape `(*batch, T, n, d)`; `batch` is the LoRA batch shape followed
      by the initial-condition batch shape (either may be empty).
    - `status`: per member, `(*batch)` ints: 0 ok, 1 max steps, 2 solver failure,
      3 non-finite values (`STATUS_MESSAGES`). A failed member never crashes the batch.
    - `num_steps`: accepted solver steps per member.
    - `norm_drift`: for sphere dynamics, `max_{t,i} | |x_i(t)| − 1 |` per member, else None.
    - `frame`: the variable `xs` holds (the field's `frame` trait). `"z"` for rescaled
      dynamics: `xs` is `z(t) = e^{−tV} x(t)` (the rescaled variable, in which clusters
      stay put; see docs/theory.md, 'Rescaled dynamics'); `"x"` for the others (the
      tokens themselves). `to_x(field)` returns `x(t)` in either case.
    """

    ts: Float[Array, " T"]
    # the tokens, or `summary`'s values (any pytree, leaves `(*batch, T, …)`)
    xs: Float[Array, "*batch T n d"] | PyTree[Shaped[Array, "*_"]]
    status: Int[Array, "*batch"]
    num_steps: Int[Array, "*batch"]
    norm_drift: Float[Array, "*batch"] | None
    dynamics: str = eqx.field(static=True)
    frame: str = eqx.field(static=True, default="x")

    @property
    def ok(self) -> bool:
        return bool(jnp.all(self.status == STATUS_OK))

    def messages(self) -> list[str]:
        """Distinct failure messages in the batch (empty when all members are ok)."""
        codes = sorted({int(c) for c in np.asarray(self.status).ravel()} - {STATUS_OK})
        return [STATUS_MESSAGES[c] for c in codes]

    @property
    def final(self) -> Float[Array, "*batch n d"]:
        return self.xs[..., -1, :, :]

    def to_x(self, field: AbstractField) -> Float[Array, "*batch T n d"]:
        """The tokens `x(t)` at the output times: `xs` itself in frame `"x"`, and
        `x(t) = e^{tV} z(t)` in frame `"z"` (`field`: the field that was solved, whose `V`,
        LoRAs included, defines the frame; a stacked LoRA gives one `V` per member).
        `x(t)` grows like `e^{t·max Re λ(V)}`; for large t it may overflow where `z`
        does not."""
        if field.dynamics != self.dynamics:
            raise ValueError(
                f"this solution is of {self.dynamics} dynamics, the field is {field.dynamics}"
            )
        if self.frame == "x":
            return self.xs
        return rescaled_to_x(field, self.ts, self.xs)


def rescaled_to_x(
    field: AbstractField, ts: Float[Array, " T"], zs: Float[Array, "*batch T n d"]
) -> Float[Array, "*batch T n d"]:
    """`x(t) = e^{tV} z(t)` for a trajectory `zs` of the rescaled variable saved at `ts`
    (`V = field.weight("V")`; with a stacked LoRA, `zs` has the LoRA batch axes first, as
    `simulate` returns them)."""
    V = field.weight("V")
    zs = jnp.asarray(zs, V.dtype)
    ts = jnp.asarray(ts, V.dtype)
    lead = V.shape[:-2]
    if zs.ndim < 3 + len(lead) or zs.shape[-3] != ts.shape[0] or zs.shape[-1] != field.d:
        raise ValueError(
            f"tokens of shape {tuple(zs.shape)} do not match {ts.shape[0]} "
            f"times and d = {field.d} (a summary is not a trajectory)"
        )
    flat = V.reshape((-1,) + V.shape[-2:])
    E = jax.vmap(lambda v: jax.vmap(lambda t: expm(t * v))(ts))(flat)  # (m, T, d, d)
    E = E.reshape(lead + (1,) * (zs.ndim - 3 - len(lead)) + E.shape[1:])
    return zs @ jnp.swapaxes(E, -1, -2)


class _Projected(diffrax.AbstractWrappedSolver):
    """Wrap a solver so that each accepted step is renormalised onto the sphere.

    The FSAL state of Tsit5/Dopri (the field at the unprojected end point) is kept as is:
    it differs from the field at the projected point by O(norm drift of one step).
    """

    solver: diffrax.AbstractSolver

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, err, dense, state, result = self.solver.step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )
        y1 = y1 / jnp.linalg.norm(y1, axis=-1, keepdims=True)
        return y1, err, dense, state, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


# Diffrax's adaptive `_Projected` needs the adaptive marker when the inner solver is.
class _ProjectedAdaptive(_Projected, diffrax.AbstractAdaptiveSolver):
    pass


def fixed_step_grid(t0: float, t1: float, dt: float) -> np.ndarray:
    """`t0, t0+dt, …, t1` in float64; a last short step when `(t1−t0)/dt` is fractional."""
    span = t1 - t0
    k = math.floor(span / dt + 1e-9)
    grid = t0 + dt * np.arange(k + 1, dtype=np.float64)
    if span - k * dt > 1e-9 * max(1.0, abs(span)):
        grid = np.append(grid, t1)
    else:
        grid[-1] = t1
    if grid.size == 1:  # t1 == t0
        grid = np.array([t0, t1])
    return grid


# Per-call constants of `simulate` (step grids, output times, t0/t1) as device arrays,
# cached by value: building them with `jnp.asarray` costs a dispatch each (~40 µs), which
# for short solves of small systems was a large part of a call. Arrays are immutable, so
# sharing them is safe; values computed under a trace are never cached.
_CONST_CACHE: dict = register_cache({})
_CONST_CACHE_MAX = 256


def _const(values, dtype) -> Array:
    """`jnp.asarray(values, dtype)` (same rounding: numpy's round-to-nearest cast), cached."""
    a = np.asarray(values, dtype=np.dtype(dtype))
    key = ("a", a.dtype.str, a.shape, a.tobytes())
    hit = _CONST_CACHE.get(key)
    if hit is not None:
        return hit
    arr = jnp.asarray(a)
    if not isinstance(arr, Tracer):
        if len(_CONST_CACHE) >= _CONST_CACHE_MAX:
            _CONST_CACHE.clear()
        _CONST_CACHE[key] = arr
    return arr


def _step_to(grid: np.ndarray, dtype) -> diffrax.StepTo:
    """`diffrax.StepTo` on `grid` cast to `dtype` (cached like `_const`)."""
    arr = _const(grid, dtype)
    key = ("StepTo", id(arr))
    hit = _CONST_CACHE.get(key)
    if hit is not None and hit.ts is arr:
        return hit
    ctrl = diffrax.StepTo(ts=arr)
    if not isinstance(arr, Tracer) and ctrl.ts is arr:
        _CONST_CACHE[key] = ctrl
    return ctrl


class SolveConfig(eqx.Module):
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    saveat_steps: bool
    max_steps: int
    adjoint: diffrax.AbstractAdjoint
    progress: bool
    sphere: bool
    renormalise: bool
    n_field_batch: int
    n_x_batch: int
    # Optional `fn(t, y, args) -> pytree` saved instead of the state (diffrax
    # `SaveAt(fn=...)`): summaries keep memory flat in long sweeps. With `renormalise`
    # it sees the renormalised state.
    save_fn: Callable[..., PyTree] | None = None
    # Fixed steps: the whole batch is one solve of the stacked state (`Members`), not a
    # vmap of solves (see `_solve_batch`).
    stacked: bool = False


def _vmap_members(fn, axes, n_field_batch: int, n_x_batch: int):
    """`fn(field, args, y)` of one member, mapped over `n_x_batch` axes of `y` (inner)
    and `n_field_batch` stacked-LoRA axes of `field` (`axes`: its in_axes), `args` and
    `y` (outer): the layout `(*field_batch, *x_batch, …)` of `Solution.xs`."""
    for _ in range(n_x_batch):
        fn = jax.vmap(fn, in_axes=(None, None, 0))
    for _ in range(n_field_batch):
        fn = eqx.filter_vmap(fn, in_axes=(axes, 0, 0))
    return fn


class Members(eqx.Module):
    """A batch of solves with fixed steps as one vector field on the stacked state
    `(*field_batch, *x_batch, n, d)`: the field is vmapped inside each evaluation.

    Members share the step grid, so nothing is lost against a vmap of solves, and what
    depends on the time alone (the rescaled field's `e^{t(V − cI)}` and `SᵀAS`) is
    computed once per stage for all initial conditions instead of once per member; the
    per-solve constants (`solve_args`) once per field member. Each member's arithmetic is
    that of its own solve (`tests/test_speed_paths.py` compares with single solves).
    """

    field: eqx.Module
    axes: object = eqx.field(static=True)
    n_field_batch: int = eqx.field(static=True)
    n_x_batch: int = eqx.field(static=True)

    def solve_args(self):
        fn = lambda f, a, y: f.solve_args()
        return _vmap_members(fn, self.axes, self.n_field_batch, 0)(self.field, None, None)

    def __call__(self, t, y, args=None):
        fn = lambda f, a, yy: f(t, yy, a)
        return _vmap_members(fn, self.axes, self.n_field_batch, self.n_x_batch)(self.field, args, y)


def solve_one(field, y0, t0, t1, dt0, ts, cfg: SolveConfig, members: int = 0):
    """One diffeqsolve; `members` leading axes of `y0` are a batch of independent
    members (`Members`): outputs then carry them in front, statuses per member."""
    term = diffrax.ODETerm(field)
    fn_kw = {}
    if cfg.save_fn is not None:
        user_fn = cfg.save_fn
        if members:
            one_fn = user_fn
            user_fn = lambda t, y, args: _map_leading(lambda yy: one_fn(t, yy, None), members)(y)
        if cfg.renormalise:
            fn_kw["fn"] = lambda t, y, args: user_fn(
                t, y / jnp.linalg.norm(y, axis=-1, keepdims=True), args
            )
        else:
            fn_kw["fn"] = user_fn
    if cfg.saveat_steps:
        saveat = diffrax.SaveAt(t0=True, steps=True, **fn_kw)
    else:
        saveat = diffrax.SaveAt(ts=ts, **fn_kw)
    meter = diffrax.TqdmProgressMeter() if cfg.progress else diffrax.NoProgressMeter()
    sol = diffrax.diffeqsolve(
        term,
        cfg.solver,
        t0,
        t1,
        dt0,
        y0,
        args=field.solve_args(),
        saveat=saveat,
        stepsize_controller=cfg.controller,
        max_steps=cfg.max_steps,
        adjoint=cfg.adjoint,
        throw=False,
        progress_meter=meter,
    )
    ys = sol.ys
    assert ys is not None  # every solve saves something (SaveAt ts, steps or fn)
    if members:  # (T, *batch, …) → (*batch, T, …)
        ys = jax.tree.map(lambda a: jnp.moveaxis(a, 0, members), ys)
    if cfg.renormalise and cfg.save_fn is None:
        # Steps are projected by `_Projected`; dense-output points between steps too.
        ys = ys / jnp.linalg.norm(ys, axis=-1, keepdims=True)
    batch = y0.shape[:members]
    res = sol.result
    status = jnp.where(
        res == diffrax.RESULTS.successful,
        STATUS_OK,
        jnp.where(res == diffrax.RESULTS.max_steps_reached, STATUS_MAX_STEPS, STATUS_SOLVER_FAILED),
    )
    finite = jnp.all(
        jnp.stack([_all_but(jnp.isfinite(leaf), members) for leaf in jax.tree.leaves(ys)]), axis=0
    )
    status = jnp.where((status == STATUS_OK) & ~finite, STATUS_NONFINITE, status)
    if cfg.sphere and cfg.save_fn is None:
        drift = _all_but(jnp.abs(jnp.linalg.norm(ys, axis=-1) - 1.0), members, jnp.max)
    else:
        drift = jnp.zeros(batch, y0.dtype)
    steps = jnp.broadcast_to(sol.stats["num_accepted_steps"], batch)
    return ys, status, steps, drift


def _all_but(a, lead: int, reduce=jnp.all):
    """`reduce` over every axis of `a` but the `lead` leading ones."""
    return reduce(a, axis=tuple(range(lead, a.ndim)))


def _map_leading(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


@eqx.filter_jit
def _solve_batch(field, x0, t0, t1, dt0, ts, cfg: SolveConfig):
    nf, nx = cfg.n_field_batch, cfg.n_x_batch
    if nf + nx:
        # A vmapped blockwise kernel runs both sides of its per-block `cond`: trace the
        # batch with the running row maximum only.
        with exact_row_max():
            return _solve_members(field, x0, t0, t1, dt0, ts, cfg)
    return solve_one(field, x0, t0, t1, dt0, ts, cfg)


def _solve_members(field, x0, t0, t1, dt0, ts, cfg: SolveConfig):
    nf, nx = cfg.n_field_batch, cfg.n_x_batch
    if cfg.stacked:
        # Fixed steps: one solve of the stacked state; adaptive steps: one solve per
        # member (a vmap of solves), so each member keeps its own step control.
        y0 = jnp.broadcast_to(x0, field.batch_shape + x0.shape)
        members = Members(field, _lora_axes(field) if nf else None, nf, nx)
        return solve_one(members, y0, t0, t1, dt0, ts, cfg, members=nf + nx)
    fn = lambda f, y: solve_one(f, y, t0, t1, dt0, ts, cfg)
    for _ in range(cfg.n_x_batch):
        fn = jax.vmap(fn, in_axes=(None, 0))
    for _ in range(cfg.n_field_batch):
        axes = _lora_axes(field)
        fn = eqx.filter_vmap(fn, in_axes=(axes, None))
    return fn(field, x0)


def _lora_axes(field: AbstractField):
    axes = jax.tree.map(lambda _: None, field)
    if not field.loras:
        return axes
    where = lambda f: [leaf for lo in f.loras for leaf in (lo.A, lo.B)]
    return eqx.tree_at(where, axes, [0] * (2 * len(field.loras)), is_leaf=lambda x: x is None)


def _cast_field(field: AbstractField, dtype) -> AbstractField:
    def cast(x):
        if eqx.is_inexact_array(x) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, field)


_DEFAULT_ADJOINTS: dict = register_cache({})


def get_adjoint(adjoint, checkpoints):
    if adjoint is None or adjoint == "checkpoint":
        if not (checkpoints is None or type(checkpoints) is int):
            return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
        if checkpoints not in _DEFAULT_ADJOINTS:  # immutable modules: one per value
            _DEFAULT_ADJOINTS[checkpoints] = diffrax.RecursiveCheckpointAdjoint(
                checkpoints=checkpoints
            )
        return _DEFAULT_ADJOINTS[checkpoints]
    if isinstance(adjoint, diffrax.AbstractAdjoint):
        return adjoint
    name = check_choice(adjoint, "adjoint", ADJOINTS)
    if name == "backsolve":
        return diffrax.BacksolveAdjoint()
    return diffrax.ForwardMode()


def stepping(solver, dt, rtol, atol, max_steps, project: bool, t0, t1, dtype):
    """Solver, step controller, step budget, fixed grid and fixed step (both None when
    adaptive), as `simulate` documents its options; the sweep engine resolves its solves
    here too."""
    solver_obj = get_solver(solver) if isinstance(solver, str) else solver
    solver_name = solver.lower() if isinstance(solver, str) else type(solver).__name__
    adaptive_ok = isinstance(solver_obj, diffrax.AbstractAdaptiveSolver) and (
        solver_name in ADAPTIVE if isinstance(solver, str) else not isinstance(solver, RK4)
    )
    if dt is not None and (rtol is not None or atol is not None):
        raise ValueError("give either dt (fixed step) or rtol/atol (adaptive), not both")
    if dt is None and rtol is None and atol is None:
        if adaptive_ok:
            rtol, atol = 1e-6, 1e-9
        else:
            dt = 0.1
    if project:
        wrap = _ProjectedAdaptive if adaptive_ok else _Projected
        solver_obj = wrap(solver_obj)
    if dt is not None:
        dt = check_positive(dt, "dt")
        if max_steps is not None:
            raise ValueError(
                "max_steps applies to adaptive steps (rtol/atol); with a fixed "
                "dt the number of steps is (t1 − t0)/dt"
            )
        n_steps = (t1 - t0) / dt
        if not math.isfinite(n_steps) or n_steps > 2**62:
            raise ValueError(f"t1 − t0 = {t1 - t0:g} with dt = {dt:g} is too many steps")
        check_memory(8.0 * (n_steps + 2), f"a grid of {n_steps:.3g} fixed steps")
        grid = fixed_step_grid(t0, t1, dt)
        return solver_obj, _step_to(grid, dtype), grid.size - 1, grid, dt
    if not adaptive_ok:
        raise ValueError(
            f"solver {solver_name!r} has no error estimate: give dt for "
            "fixed steps, or use heun, tsit5, dopri5 or dopri8"
        )
    rtol = check_positive(1e-6 if rtol is None else rtol, "rtol")
    atol = check_positive(1e-9 if atol is None else atol, "atol")
    max_steps = 100_000 if max_steps is None else check_int(max_steps, "max_steps", 1)
    return solver_obj, diffrax.PIDController(rtol=rtol, atol=atol), max_steps, None, None


class Float32PrecisionWarning(UserWarning):
    """A float32 solve whose attention logits cannot resolve what the dynamics need."""


# ln(1/ε) for float32: terms of the logits smaller than e^{−16.6} times the largest are
# rounded away.
_F32_LOG_RESOLUTION = float(-np.log(np.finfo(np.float32).eps))


_SPREADS: dict = register_cache({})


def _eigen_spread(Vs) -> float:
    """Largest spread of the eigenvalues' real parts over the stacked matrices `Vs`;
    remembered for the last few V (a small solve in a loop pays no eigvals per call)."""
    key = (Vs.shape, Vs.tobytes()) if Vs.size <= 4096 else None
    if key is not None and key in _SPREADS:
        return _SPREADS[key]
    re = np.linalg.eigvals(Vs).real
    spread = float(np.max(re.max(axis=-1) - re.min(axis=-1)))
    if key is not None:
        if len(_SPREADS) >= 32:
            _SPREADS.clear()
        _SPREADS[key] = spread
    return spread


def _warn_float32_resolution(field, t0, t1) -> None:
    """Warn when float32 cannot carry the attention logits to `t1`.

    With `x = e^{tV} z`, the logits `⟨Q x_i, K x_j⟩` mix modes of V that grow at the rates
    `Re λ_k`: the slowest mode's part is `e^{−2(Re λ_max − Re λ_min)t}` times the fastest
    one's. Once that ratio is below float32's unit roundoff (`t·2·spread > 16.6`), the
    logits no longer see the slow directions, and a non-normal V then drifts from the
    float64 solution far beyond rounding (measured: V = [[1, .5], [0, .5]], 32 tokens:
    3e-4 at t = 20, where float64 with half the step moves 1e-6). A warning, not an error:
    a normal V often stays close (diag(1, .5): 8e-7 at t = 100).
    """
    V = field.weight("V")
    if isinstance(V, Tracer) or isinstance(t1, Tracer):
        return
    spread = _eigen_spread(np.asarray(V, np.float64).reshape((-1,) + V.shape[-2:]))
    t_res = _F32_LOG_RESOLUTION / (2 * spread) if spread > 0 else math.inf
    if float(t1) - float(t0) > t_res:
        warnings.warn(
            f"float32 cannot resolve the attention logits beyond t ≈ {t_res:.3g} for this V "
            f"(eigenvalue real parts spread {spread:.3g}); results up to t1 = {float(t1):g} "
            "may differ from float64 beyond rounding: check with dtype float64",
            Float32PrecisionWarning,
            stacklevel=3,
        )


def _check_usa_overflow(field, x0, dtype) -> None:
    """USA's weights `exp(β⟨Qx_i, Kx_j⟩)` are not normalised: above `log(max float)`
    (709.8 in float64, 88.7 in float32) they are inf, and the solve fails at its first
    step. Say so before solving, with the numbers (concrete inputs of moderate size)."""
    if isinstance(x0, Tracer) or isinstance(field.beta, Tracer):
        return
    members = math.prod(field.batch_shape) * math.prod(x0.shape[:-2])
    if members * x0.shape[-2] ** 2 > 10**8:
        return
    A = jnp.broadcast_to(field.A, field.batch_shape + field.A.shape[-2:])
    A = A.reshape(field.batch_shape + (1,) * (x0.ndim - 2) + A.shape[-2:])
    top = float(jnp.max(field.beta * jnp.einsum("...id,...de,...je->...ij", x0, A, x0)))
    limit = float(np.log(np.finfo(np.dtype(dtype)).max))
    if top > limit:
        f64 = ", use float64" if np.dtype(dtype) == np.float32 else ""
        raise ValueError(
            f"USA weights exp(β⟨Qx_i, Kx_j⟩) overflow {np.dtype(dtype).name} at "
            f"t = 0 (largest β·logit {top:.4g} > {limit:.4g}): lower beta{f64} "
            "or use sphere (softmax) dynamics"
        )


def _check_solve_memory(field, x0, n_out: int, save_tokens: bool, dtype) -> None:
    """Refuse, before compiling, a solve whose saved trajectory or dense attention
    matrices would not fit (`JAXATTN_MAX_MEMORY`)."""
    members = math.prod(field.batch_shape) * math.prod(x0.shape[:-2])
    n, d = int(x0.shape[-2]), int(x0.shape[-1])
    item = jnp.dtype(dtype).itemsize
    traj = float(members) * n_out * n * d * item if save_tokens else 0.0
    # Dense attention: logits and weights of every member and stage live at once.
    attn = 4.0 * members * n * n * item if not use_blockwise(field.kernel, n, n) else 0.0
    check_memory(
        traj + attn,
        f"a solve of {members} member(s) × {n} tokens in d = {d} saved at {n_out} times",
    )


def simulate(
    field: AbstractField,
    x0: Float[ArrayLike, "*batch n d"] | Sequence[Any],
    t1: ScalarLike,
    *,
    solver: str | diffrax.AbstractSolver = "rk4",
    dt: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    ts: Float[ArrayLike, " T"] | Sequence[float] | None = None,
    t0: ScalarLike = 0.0,
    dtype: DTypeLike | None = None,
    max_steps: int | None = None,
    renormalise: bool = False,
    adjoint: str | diffrax.AbstractAdjoint | None = None,
    checkpoints: int | None = None,
    progress: bool = False,
    summary: Callable[[Array, Array], PyTree] | None = None,
) -> Solution:
    """Integrate `x' = field(t, x)` from `t0` to `t1` for one or many initial conditions.

    **Arguments:**

    - `field`: a `PlainField`, `RescaledField`, `SphereField` or `USAField`. Its LoRA may
      be stacked (batch of perturbations): the solve is vmapped over it.
    - `x0`: tokens `(n, d)` or a batch `(*batch, n, d)`; all are solved in one jitted
      call. For rescaled dynamics `x0` is `z(t0) = e^{−t0·V} x(t0)` (`= x(0)` when
      `t0 = 0`) and the solution stays in that frame (`Solution.frame`,
      `Solution.to_x`). With a stacked LoRA too, the result is the outer product
      `(*lora_batch, *x0_batch, T, n, d)`.
    - `t1`: final time (≥ t0).
    - `solver`: `euler | heun | rk4 | tsit5 | dopri5 | dopri8` or a diffrax solver.
    - `dt`: fixed step (exactly `ceil((t1−t0)/dt)` steps on the grid `t0 + k·dt`, the last
      possibly shorter); or `rtol`/`atol`: adaptive steps (PID controller). With neither,
      non-adaptive solvers use `dt = 0.1` and adaptive ones `rtol = 1e-6, atol = 1e-9`.
    - `ts`: output times in `[t0, t1]` (interpolated by the solver's dense output).
      Default: every step for fixed steps, 101 equally spaced times for adaptive ones.
    - `dtype`: `float32 | float64` (default: that of `x0`, else JAX's default float).
    - `max_steps`: cap for adaptive solves (default 100 000).
    - `renormalise`: sphere dynamics only: project back onto the sphere after each step.
    - `adjoint`: `"checkpoint"` (default, reverse mode with `checkpoints`), `"backsolve"`
      or `"forward"` (forward-mode AD), or any `diffrax.AbstractAdjoint`.
    - `progress`: show a tqdm progress bar.
    - `summary`: `fn(t, x) -> array or pytree`, saved at the output times instead of the
      tokens (diffrax `SaveAt(fn=...)`): `Solution.xs` then holds its values with the
      leading axes `(*batch, T)`, and memory stays O(T × summary size) however many
      tokens there are. `norm_drift` is not computed then.

    **Returns:** a `Solution` (its `xs` in the frame `Solution.frame`: the rescaled
    variable `z` for rescaled dynamics, `x` otherwise). Members whose solve fails get a
    non-zero `status`; the batch still returns.
    """
    if not isinstance(field, AbstractField):
        raise TypeError(f"field must be a jaxattn field, got {type(field).__name__}")
    if dtype is None:
        x0_dtype = getattr(x0, "dtype", None)
        if x0_dtype is not None and jnp.issubdtype(x0_dtype, jnp.floating):
            dtype = x0_dtype
        else:
            dtype = jnp.result_type(float)
    dtype = check_dtype(dtype)
    x0 = jnp.asarray(as_float_array(x0, "x0", dtype))
    check_tokens(x0, "x0")
    if x0.shape[-1] != field.d:
        raise ValueError(
            f"x0 has d = {x0.shape[-1]} but the field's weights are {field.d}×{field.d}"
        )
    field = _cast_field(field, dtype)
    sphere = field.on_sphere
    if sphere:
        if not isinstance(x0, Tracer) and bool(jnp.any(jnp.all(x0 == 0, axis=-1))):
            raise ValueError("x0 has a zero token, which cannot be put on the sphere")
        x0 = unit_rows(x0)
    elif renormalise:
        raise ValueError("renormalise applies to sphere dynamics (sphere, usa) only")

    if not isinstance(t0, Tracer):
        if not is_number(t0) or not math.isfinite(float(t0)):
            raise ValueError(f"t0 must be a finite number, got {t0!r}")
        t0 = float(t0)
    if isinstance(t1, Tracer):
        raise TypeError("t1 must be a concrete number (it fixes the number of steps)")
    if not is_number(t1) or not math.isfinite(float(t1)) or float(t1) < 0:
        raise ValueError(f"t1 must be a finite number ≥ 0, got {t1!r}")
    t1 = float(t1)
    if t1 < t0:
        raise ValueError(f"t1 = {t1} is before t0 = {t0}")

    solver_obj, controller, max_steps, grid, dt = stepping(
        solver, dt, rtol, atol, max_steps, bool(renormalise and sphere), t0, t1, dtype
    )
    fixed = grid is not None
    dt0 = None

    if ts is not None:
        ts = np.asarray(as_float_array(ts, "ts"), dtype=np.float64).ravel()
        if ts.size == 0:
            raise ValueError("ts is empty")
        check_finite(ts, "ts")
        if np.any(np.diff(ts) < 0):
            raise ValueError("ts must be non-decreasing")
        if ts[0] < t0 - 1e-12 or ts[-1] > t1 + 1e-12:
            raise ValueError(f"ts must lie in [t0, t1] = [{t0}, {t1}]")
        ts = np.clip(ts, t0, t1)
        saveat_steps = False
    elif fixed:
        saveat_steps = True
    else:
        ts = np.linspace(t0, t1, 101)
        saveat_steps = False

    backsolve = adjoint == "backsolve" or isinstance(adjoint, diffrax.BacksolveAdjoint)
    if backsolve and renormalise and sphere:
        raise ValueError(
            "renormalise is not available with the backsolve adjoint (the "
            "projection acts on forward steps, which backsolve does not "
            "retrace); use adjoint checkpoint or forward"
        )
    if not field.normalised:
        _check_usa_overflow(field, x0, dtype)
    if jnp.dtype(dtype) == jnp.float32 and not field.on_sphere:
        _warn_float32_resolution(field, t0, t1)
    if backsolve:
        # diffrax's BacksolveAdjoint rejects SaveAt(steps=True): save at the grid times
        # instead (the same outputs), and it fails on an empty tuple of LoRAs among the
        # differentiated leaves: give such a field an exactly-zero rank-1 LoRA on V (the
        # same vector field, the same gradients).
        if saveat_steps:
            ts, saveat_steps = grid, False
        if not field.loras:
            z = jnp.zeros((1, field.d), field.V.dtype)
            field = eqx.tree_at(lambda f: f.loras, field, (LoRA(z, z.T, 1.0, "V"),))
        if adjoint == "backsolve" and fixed:
            assert dt is not None  # a fixed grid comes from dt
            # The forward StepTo grid cannot be walked backwards: the adjoint ODE takes
            # constant steps −dt from t1 (the same step size; the same grid unless
            # (t1 − t0)/dt is fractional).
            adjoint = diffrax.BacksolveAdjoint(
                stepsize_controller=diffrax.ConstantStepSize(), dt0=-dt
            )
    n_out = grid.size if grid is not None and saveat_steps else len(ts) if ts is not None else 1
    _check_solve_memory(field, x0, n_out, summary is None, dtype)
    if t1 == t0:
        # Nothing to integrate: diffrax rejects a zero-length interval.
        out_ts = jnp.asarray(ts if ts is not None else [t0], dtype)
        batch = field.batch_shape + tuple(x0.shape[:-2])
        xs = jnp.broadcast_to(x0, field.batch_shape + x0.shape)
        xs = jnp.broadcast_to(xs[..., None, :, :], batch + (out_ts.shape[0],) + x0.shape[-2:])
        zeros = jnp.zeros(batch, jnp.int32)
        if summary is not None:
            T = out_ts.shape[0]
            flat = xs.reshape((-1,) + x0.shape[-2:])
            vals = jax.vmap(summary)(jnp.tile(out_ts, flat.shape[0] // T), flat)
            xs = jax.tree.map(lambda a: a.reshape(batch + (T,) + a.shape[1:]), vals)
        return Solution(
            out_ts,
            xs,
            zeros,
            zeros,
            jnp.zeros(batch, dtype) if sphere and summary is None else None,
            field.dynamics,
            field.frame,
        )

    cfg = SolveConfig(
        solver=solver_obj,
        controller=controller,
        saveat_steps=saveat_steps,
        max_steps=max_steps,
        adjoint=get_adjoint(adjoint, checkpoints),
        progress=bool(progress),
        sphere=sphere,
        renormalise=bool(renormalise and sphere),
        n_field_batch=len(field.batch_shape),
        n_x_batch=x0.ndim - 2,
        save_fn=None if summary is None else _SummaryFn(summary),
        stacked=fixed,
    )
    ts_arr = None if ts is None else _const(ts, dtype)
    if summary is not None and not callable(summary):
        raise TypeError(f"summary must be a function fn(t, x), got {type(summary).__name__}")
    ys, status, steps, drift = _solve_batch(
        field,
        x0,
        jnp.asarray(t0, dtype) if isinstance(t0, Tracer) else _const(t0, dtype),
        _const(t1, dtype),
        dt0,
        ts_arr,
        cfg,
    )
    out_ts = _const(grid, dtype) if grid is not None and saveat_steps else ts_arr
    assert out_ts is not None  # saveat_steps without a grid, or neither ts nor grid: impossible
    keep_drift = sphere and summary is None
    return Solution(
        out_ts, ys, status, steps, drift if keep_drift else None, field.dynamics, field.frame
    )


class _SummaryFn(eqx.Module):
    """`fn(t, x)` as diffrax's `fn(t, y, args)`; static (hashable by identity) for jit."""

    fn: Callable[..., PyTree] = eqx.field(static=True)

    def __call__(self, t, y, args):
        return self.fn(t, y)
