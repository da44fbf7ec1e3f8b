"""Solve options as one typed object, validated once (`SolveOptions`), and their resolved
form for the traced core (`Stepping` → `SolveConfig`).

Every rule about the options lives here: dt against rtol/atol, the defaults of each
solver, max_steps, ts, renormalise, the adjoint and its checkpoints. `simulate`, the spec
parser, the sweep and the sensitivity tools all build a `SolveOptions` (from keyword
arguments, a spec's `[solve]` table or an edit of another one) and resolve it here, as
diffrax passes solver and controller objects and ott-jax layers `solve(**kwargs)` over
them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .._base import (
    ArrayLike,
    Float,
    PyTree,
    as_float_array,
    check_choice,
    check_finite,
    check_int,
    check_memory,
    check_positive,
    coerce,
    plain_hints,
    register_cache,
)
from .solvers import SOLVERS, get_solver

ADJOINTS = ("checkpoint", "backsolve", "forward")
#: fixed step of the solvers without an error estimate (euler, rk4) when none is given
DEFAULT_DT = 0.1
#: tolerances of the adaptive solvers when none are given
DEFAULT_RTOL, DEFAULT_ATOL = 1e-6, 1e-9
#: step budget of adaptive solves
DEFAULT_MAX_STEPS = 100_000
#: output times of an adaptive solve when `ts` is not given
DEFAULT_SAVE_POINTS = 101


def is_adaptive(solver: str | diffrax.AbstractSolver) -> bool:
    """Whether a solver (name or object) has an error estimate for adaptive steps."""
    if isinstance(solver, str):  # a name: looked up, not built (simulate asks per call)
        return check_choice(solver, "solver", SOLVERS) in _ADAPTIVE_NAMES
    return isinstance(solver, diffrax.AbstractAdaptiveSolver)


_ADAPTIVE_NAMES = frozenset(
    name for name in SOLVERS if isinstance(get_solver(name), diffrax.AbstractAdaptiveSolver)
)


def _unknown_options(names) -> str | None:
    """The one-line message for option names `SolveOptions` does not have (None if all
    are known)."""
    unknown = sorted(set(names) - set(_FIELDS))
    if not unknown:
        return None
    return (
        f"unknown solve option{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(unknown)} (options: {', '.join(_FIELDS)})"
    )


@dataclasses.dataclass(frozen=True)
class SolveOptions(Mapping[str, Any]):
    """How to integrate: every option of `simulate` besides the field, the tokens and the
    time span, checked when the object is made (one-line `ValueError`/`TypeError`).

    - `solver`: `euler | heun | rk4 | tsit5 | dopri5 | dopri8` or a diffrax solver.
    - `dt`: fixed step; or `rtol`/`atol`: adaptive steps (PID controller). With neither,
      solvers without an error estimate use `dt = 0.1`, adaptive ones
      `rtol = 1e-6, atol = 1e-9`.
    - `ts`: output times (default: every step for fixed steps, 101 equally spaced times
      for adaptive ones).
    - `max_steps`: step budget of adaptive solves (default 100 000).
    - `renormalise`: project onto the sphere after each step (sphere dynamics only).
    - `adjoint`: `"checkpoint"` (default) with `checkpoints`, `"backsolve"`, `"forward"`,
      or a `diffrax.AbstractAdjoint`.
    - `progress`: a tqdm progress bar (into a file or a pipe, a line every 10 %).

    It is a read-only mapping of the options that differ from their defaults, so
    `simulate(field, x0, t1, **options)` runs with it and `replace(adjoint="forward")`
    gives an edited copy (checked again). Rules that need the time span or the field
    (`ts` inside `[t0, t1]`, `renormalise` on the sphere) are checked by `check` and
    `resolve`.
    """

    solver: str | diffrax.AbstractSolver = "rk4"
    dt: float | None = None
    rtol: float | None = None
    atol: float | None = None
    ts: tuple[float, ...] | Float[ArrayLike, " T"] | Sequence[float] | None = None
    max_steps: int | None = None
    renormalise: bool = False
    adjoint: str | diffrax.AbstractAdjoint | None = None
    checkpoints: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if isinstance(self.solver, str):
            set_("solver", check_choice(self.solver, "solver", SOLVERS))
        elif not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                f"solver must be a name ({', '.join(SOLVERS)}) or a diffrax solver, "
                f"got {type(self.solver).__name__}"
            )
        if self.dt is not None and (self.rtol is not None or self.atol is not None):
            raise ValueError("give either dt (fixed step) or rtol/atol (adaptive), not both")
        if self.dt is not None and not isinstance(self.dt, Tracer):
            set_("dt", check_positive(self.dt, "dt"))
        for name in ("rtol", "atol"):
            if getattr(self, name) is not None:
                set_(name, check_positive(getattr(self, name), name))
        if (self.rtol is not None or self.atol is not None) and not is_adaptive(self.solver):
            raise ValueError(
                f"solver {self.solver_name!r} has no error estimate: give dt for fixed "
                "steps, or use heun, tsit5, dopri5 or dopri8"
            )
        if self.max_steps is not None:
            set_("max_steps", check_int(self.max_steps, "max_steps", 1))
            if self.fixed:
                raise ValueError(
                    "max_steps applies to adaptive steps (rtol/atol); with a fixed "
                    "dt the number of steps is (t1 − t0)/dt"
                )
        if self.ts is not None:
            ts = np.asarray(as_float_array(self.ts, "ts"), dtype=np.float64)
            if ts.ndim > 1:  # was flattened silently
                raise ValueError(f"ts must be a 1-D sequence of times, got shape {ts.shape}")
            ts = ts.ravel()
            if ts.size == 0:
                raise ValueError("ts is empty")
            check_finite(ts, "ts")
            if np.any(np.diff(ts) < 0):
                raise ValueError("ts must be non-decreasing")
            set_("ts", tuple(float(t) for t in ts))
        if not isinstance(self.renormalise, (bool, np.bool_)):
            raise TypeError(f"renormalise must be true or false, got {self.renormalise!r}")
        set_("renormalise", bool(self.renormalise))
        if isinstance(self.adjoint, str):
            set_("adjoint", check_choice(self.adjoint, "adjoint", ADJOINTS))
        elif not (self.adjoint is None or isinstance(self.adjoint, diffrax.AbstractAdjoint)):
            raise ValueError(
                f"unknown adjoint {self.adjoint!r}; choose one of {', '.join(ADJOINTS)} "
                "or a diffrax adjoint"
            )
        if self.checkpoints is not None:
            if (
                isinstance(self.checkpoints, bool)
                or not isinstance(self.checkpoints, (int, np.integer))
                or self.checkpoints < 1
            ):
                raise ValueError(
                    f"checkpoints must be a positive integer, got {self.checkpoints!r}"
                )
            if self.adjoint not in (None, "checkpoint"):
                raise ValueError("checkpoints applies to adjoint checkpoint only")
            set_("checkpoints", int(self.checkpoints))
        if self.backsolve and self.renormalise:
            raise ValueError(
                "renormalise is not available with the backsolve adjoint (the "
                "projection acts on forward steps, which backsolve does not "
                "retrace); use adjoint checkpoint or forward"
            )
        set_("progress", bool(self.progress))

    # ------------------------------------------------------------------ derived facts
    @property
    def solver_name(self) -> str:
        return self.solver if isinstance(self.solver, str) else type(self.solver).__name__

    @property
    def fixed(self) -> bool:
        """Fixed steps: `dt` given, or no tolerances and a solver without an error
        estimate (which then steps with `DEFAULT_DT`)."""
        if self.dt is not None:
            return True
        return self.rtol is None and self.atol is None and not is_adaptive(self.solver)

    @property
    def step(self) -> float:
        """The fixed step: `dt`, or `DEFAULT_DT` for a solver without an error estimate
        (meaningful when `fixed`)."""
        return DEFAULT_DT if self.dt is None else self.dt

    @property
    def times(self) -> tuple[float, ...] | None:
        """`ts` as the tuple of floats it is after construction."""
        return typing.cast("tuple[float, ...] | None", self.ts)

    @property
    def backsolve(self) -> bool:
        return self.adjoint == "backsolve" or isinstance(self.adjoint, diffrax.BacksolveAdjoint)

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Each option's default (what a keyword left out means)."""
        return dict(_FIELDS)

    # ------------------------------------------------------------------ edits, mapping
    def replace(self, **changes: Any) -> SolveOptions:
        """A copy with some options changed (checked again as a whole)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SolveOptions:
        """Options from plain data (a spec file's `[solve]` table without `t1`): each
        value is checked against its field's plain type by the configs' `coerce` (a
        number, a string, a boolean, a list of numbers), then as a whole."""
        message = _unknown_options(table)
        if message:
            raise ValueError(message)
        hints = plain_hints(cls)
        return cls(**{k: coerce(v, hints[k], k) for k, v in table.items()})

    @classmethod
    def of(cls, options: SolveOptions | Mapping[str, Any] | None = None, **changes: Any):
        """`options` (a `SolveOptions`, a mapping of option names or None) with `changes`
        applied, as one checked `SolveOptions`."""
        if isinstance(options, SolveOptions):
            return options.replace(**changes) if changes else options
        kw = dict(options or {})
        message = _unknown_options(kw)
        if message:
            raise TypeError(message)
        return cls(**{**kw, **changes})

    def __getitem__(self, key: str) -> Any:
        if key not in self._given():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._given())

    def __len__(self) -> int:
        return len(self._given())

    def _given(self) -> tuple[str, ...]:
        return tuple(k for k, default in _FIELDS.items() if getattr(self, k) != default)

    def as_record(self) -> dict[str, Any]:
        """The options given, as JSON-ready data (a solver or adjoint object by its class
        name)."""
        out = {}
        for k in self._given():
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v if _plain(v) else type(v).__name__
        return out

    # ------------------------------------------------------------------ the time span
    def check(self, t0: float | Any, t1: float, *, sphere: bool) -> None:
        """The rules that need the time span and the field: `ts` inside `[t0, t1]`,
        `renormalise` only on the sphere, a fixed grid whose steps fit in memory."""
        if self.renormalise and not sphere:
            raise ValueError("renormalise applies to sphere dynamics (sphere, usa) only")
        ts = self.times
        if ts is not None and (ts[0] < t0 - 1e-12 or ts[-1] > t1 + 1e-12):
            raise ValueError(f"ts must lie in [t0, t1] = [{t0}, {t1}]")
        if self.fixed and not isinstance(t0, Tracer):
            dt = self.step
            n_steps = (t1 - t0) / dt
            if not math.isfinite(n_steps) or n_steps > 2**62:
                raise ValueError(f"t1 − t0 = {t1 - t0:g} with dt = {dt:g} is too many steps")
            check_memory(8.0 * (n_steps + 2), f"a grid of {n_steps:.3g} fixed steps")

    def resolve(
        self, t0: float | Any, t1: float, dtype, *, sphere: bool, jumps: Sequence[float] = ()
    ) -> Stepping:
        """The diffrax objects of a solve from `t0` to `t1` (after `check`). `jumps`:
        times where the vector field is discontinuous (a field's layer times): steps end
        exactly there, so no step straddles one."""
        self.check(t0, t1, sphere=sphere)
        inner = _inner_jumps(t0, t1, jumps)
        if inner and self.backsolve:
            raise ValueError(
                "the backsolve adjoint steps backwards over the field's layer times; use "
                "adjoint='checkpoint' for depth-dependent weights"
            )
        solver = get_solver(self.solver) if isinstance(self.solver, str) else self.solver
        if self.renormalise:  # on the sphere: `check` refused it elsewhere
            solver = (_ProjectedAdaptive if is_adaptive(solver) else _Projected)(solver)
        adjoint = get_adjoint(self.adjoint, self.checkpoints)
        ts = None if self.ts is None else np.clip(np.asarray(self.ts, np.float64), t0, t1)
        if self.fixed:
            dt = self.step
            grid = fixed_step_grid(t0, t1, dt)
            if self.adjoint == "backsolve":  # by name; a user's adjoint object is kept
                # The forward StepTo grid cannot be walked backwards: the adjoint ODE takes
                # constant steps −dt from t1 (the same step size; the same grid unless
                # (t1 − t0)/dt is fractional).
                adjoint = diffrax.BacksolveAdjoint(
                    stepsize_controller=diffrax.ConstantStepSize(), dt0=-dt
                )
            if ts is None and self.backsolve:
                # BacksolveAdjoint rejects SaveAt(steps=True): the grid times instead.
                ts = grid
            steps = grid
            if inner:
                # Each layer time b joins the grid, preceded by the last number below it
                # in the solve's dtype: the step ending there evaluates the earlier layer
                # at every stage, a step of one ulp crosses to b (as diffrax does for
                # `jump_ts`), and the next step starts on the later layer. The outputs
                # stay on the grid and the layer times.
                grid = np.union1d(grid, inner)
                below = [float(np.nextafter(np.asarray(b, dtype), -np.inf)) for b in inner]
                steps = np.union1d(grid, [b for b in below if b > t0])
                if ts is None:
                    ts = grid
            return Stepping(
                solver, _step_to(steps, dtype), steps.size - 1, grid, dt, ts, adjoint, sphere, self
            )
        rtol = DEFAULT_RTOL if self.rtol is None else self.rtol
        atol = DEFAULT_ATOL if self.atol is None else self.atol
        max_steps = DEFAULT_MAX_STEPS if self.max_steps is None else self.max_steps
        if ts is None:
            ts = np.linspace(t0, t1, DEFAULT_SAVE_POINTS)
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        if inner:  # steps end on the layer times (diffrax restarts the step after each)
            controller = diffrax.ClipStepSizeController(controller, jump_ts=tuple(inner))
        return Stepping(solver, controller, max_steps, None, None, ts, adjoint, sphere, self)


_FIELDS = {f.name: f.default for f in dataclasses.fields(SolveOptions)}


def _inner_jumps(t0, t1: float, jumps: Sequence[float]) -> list[float]:
    """The discontinuities strictly inside `(t0, t1)` (none for a traced `t0`)."""
    if isinstance(t0, Tracer):
        return []
    return [float(b) for b in jumps if float(t0) < b < t1]


def _plain(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


@dataclasses.dataclass(frozen=True)
class Stepping:
    """A `SolveOptions` resolved for one time span and dtype: the solver (wrapped to
    renormalise onto the sphere when asked), the step-size controller, the step budget,
    the fixed grid and step (None when adaptive), the output times (None: every step of
    the grid) and the adjoint."""

    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    max_steps: int
    grid: np.ndarray | None
    dt: float | None
    ts: np.ndarray | None
    adjoint: diffrax.AbstractAdjoint
    sphere: bool
    options: SolveOptions

    @property
    def fixed(self) -> bool:
        return self.grid is not None

    @property
    def renormalise(self) -> bool:
        return self.options.renormalise  # only on the sphere (`SolveOptions.check`)

    @property
    def out_times(self) -> np.ndarray:
        """The times the solution is saved at."""
        if self.ts is not None:
            return self.ts
        assert self.grid is not None  # ts is None only for fixed steps
        return self.grid


class SolveConfig(eqx.Module):
    """What the traced solve needs to know, all static: solver, controller, saving, step
    budget, adjoint, the sphere's projection and the batch layout."""

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
    # vmap of solves.
    stacked: bool = False


def solve_config(
    stepping: Stepping,
    *,
    n_field_batch: int = 0,
    n_x_batch: int = 0,
    save_fn: Callable[..., PyTree] | None = None,
    saveat_steps: bool | None = None,
    stacked: bool | None = None,
) -> SolveConfig:
    """The static configuration of the traced solve (`solve_one`) for a resolved
    `Stepping`: by default saved at every step when no output times were asked for, and
    one stacked solve of the whole batch with fixed steps."""
    return SolveConfig(
        solver=stepping.solver,
        controller=stepping.controller,
        saveat_steps=stepping.ts is None if saveat_steps is None else saveat_steps,
        max_steps=int(stepping.max_steps),
        adjoint=stepping.adjoint,
        progress=stepping.options.progress,
        sphere=stepping.sphere,
        renormalise=stepping.renormalise,
        n_field_batch=n_field_batch,
        n_x_batch=n_x_batch,
        save_fn=save_fn,
        stacked=stepping.fixed if stacked is None else stacked,
    )


# ---------------------------------------------------------------------- diffrax pieces
class _AbstractProjected(diffrax.AbstractWrappedSolver):
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


class _Projected(_AbstractProjected):
    """A projected solver without an error estimate (fixed steps)."""


class _ProjectedAdaptive(_AbstractProjected, diffrax.AbstractAdaptiveSolver):
    """A projected adaptive solver: diffrax needs the adaptive marker to control steps."""


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


def const(values, dtype) -> jax.Array:
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
    """`diffrax.StepTo` on `grid` cast to `dtype` (cached like `const`)."""
    arr = const(grid, dtype)
    key = ("StepTo", id(arr))
    hit = _CONST_CACHE.get(key)
    if hit is not None and hit.ts is arr:
        return hit
    ctrl = diffrax.StepTo(ts=arr)
    if not isinstance(arr, Tracer) and ctrl.ts is arr:
        _CONST_CACHE[key] = ctrl
    return ctrl


_DEFAULT_ADJOINTS: dict = register_cache({})


def get_adjoint(adjoint, checkpoints) -> diffrax.AbstractAdjoint:
    """The diffrax adjoint of an `adjoint` option (name, object or None) and
    `checkpoints`."""
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
