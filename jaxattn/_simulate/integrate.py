"""`simulate`: one jitted, vmapped `diffrax.diffeqsolve` over batches of tokens and LoRAs."""

from __future__ import annotations

import math
import sys
import typing
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
    check_dtype,
    check_memory,
    check_tokens,
    is_number,
    register_cache,
)
from .._model import (
    AbstractField,
    AbstractVectorField,
    LoRA,
    TransformerField,
    exact_row_max,
    expm,
    unit_rows,
    use_blockwise,
)
from .options import SolveConfig, SolveOptions, const, solve_config

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
        """Every member of the batch reached `t1` (all statuses 0); `messages()` says
        what went wrong otherwise."""
        return bool(jnp.all(self.status == STATUS_OK))

    def messages(self) -> list[str]:
        """Distinct failure messages in the batch (empty when all members are ok)."""
        codes = sorted({int(c) for c in np.asarray(self.status).ravel()} - {STATUS_OK})
        return [STATUS_MESSAGES[c] for c in codes]

    @property
    def final(self) -> Float[Array, "*batch n d"]:
        """The state at the last output time, `(*batch, n, d)` (in the solution's
        `frame`: `z` for rescaled dynamics; `to_x` gives the tokens)."""
        return self.xs[..., -1, :, :]

    def to_x(self, field: AbstractField | TransformerField) -> Float[Array, "*batch T n d"]:
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
    field: AbstractField | TransformerField,
    ts: Float[Array, " T"],
    zs: Float[Array, "*batch T n d"],
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


def _progress_meter():
    """A tqdm bar on a terminal; into a file or a pipe a few plain lines instead (a bar
    there would be hundreds of carriage-return updates): the percentage every 10 %."""
    if sys.stderr is not None and sys.stderr.isatty():
        return diffrax.TqdmProgressMeter()
    return diffrax.TextProgressMeter(minimum_increase=0.1)


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
    meter = _progress_meter() if cfg.progress else diffrax.NoProgressMeter()
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


def _lora_axes(field: AbstractField | AbstractVectorField):
    axes = jax.tree.map(lambda _: None, field)
    if not field.loras:
        return axes
    where = lambda f: [leaf for lo in f.loras for leaf in (lo.A, lo.B)]
    return eqx.tree_at(where, axes, [0] * (2 * len(field.loras)), is_leaf=lambda x: x is None)


def _cast_field(field: _F, dtype) -> _F:
    def cast(x):
        if eqx.is_inexact_array(x) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, field)


_F = typing.TypeVar("_F", bound=eqx.Module)


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
    heads = getattr(field, "heads", 1)
    attn = 4.0 * heads * members * n * n * item if not use_blockwise(field.kernel, n, n) else 0.0
    check_memory(
        traj + attn,
        f"a solve of {members} member(s) × {n} tokens in d = {d} saved at {n_out} times",
    )


def simulate(
    field: AbstractField | AbstractVectorField,
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
    options: SolveOptions | None = None,
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
    - `dtype`: `float32 | float64`. Default: that of `x0` if it is a float array, else
      JAX's default float; without 64-bit JAX (`setup_jax("float64")`) that default is
      float32, for a float64 NumPy array as for a Python list. An explicit
      `dtype="float64"` without 64-bit JAX is an error.
    - `max_steps`: cap for adaptive solves (default 100 000).
    - `renormalise`: sphere dynamics only: project back onto the sphere after each step.
    - `adjoint`: `"checkpoint"` (default, reverse mode with `checkpoints`), `"backsolve"`
      or `"forward"` (forward-mode AD), or any `diffrax.AbstractAdjoint`.
    - `progress`: a tqdm progress bar on a terminal; into a file or a pipe, a line every 10 %.
      A first call also says that it compiles (the bar starts after). A new program is
      compiled for each new combination of: the field's class and static options (scheme,
      mask, heads, kernel, …), the shapes and dtypes of its weights and of `x0` (batch
      axes included), a stacked or unstacked LoRA, the number of output times, and the
      solve options (solver, step count, adjoint, `summary`); new values of the same
      shapes (other tokens, weights, β given as an array) reuse it.
    - `options`: the step options above as one `SolveOptions` (checked when it was
      made), instead of as keywords; giving both is an error.
    - `summary`: `fn(t, x) -> array or pytree`, saved at the output times instead of the
      tokens (diffrax `SaveAt(fn=...)`): `Solution.xs` then holds its values with the
      leading axes `(*batch, T)`, and memory stays O(T × summary size) however many
      tokens there are. `norm_drift` is not computed then.

    **Returns:** a `Solution` (its `xs` in the frame `Solution.frame`: the rescaled
    variable `z` for rescaled dynamics, `x` otherwise). Members whose solve fails get a
    non-zero `status`; the batch still returns.
    """
    if not isinstance(field, (AbstractField, AbstractVectorField)):
        raise TypeError(
            f"field must be a jaxattn field (or an AbstractVectorField), got {type(field).__name__}"
        )
    # the step options given as keywords (the parameters named like `SolveOptions`'s fields)
    given = {k: v for k, v in locals().items() if k in _OPTION_DEFAULTS}
    if options is None:
        opts = SolveOptions.of(given)
    elif not isinstance(options, SolveOptions):
        raise TypeError(f"options must be a SolveOptions, got {type(options).__name__}")
    else:
        both = [k for k, v in given.items() if not _is_default(k, v)]
        if both:
            raise TypeError(
                f"give the solve options either as keywords or as options=, not both "
                f"({', '.join(both)})"
            )
        opts = options
    if dtype is None:
        x0_dtype = getattr(x0, "dtype", None)
        x64 = jax.config.read("jax_enable_x64")
        if x0_dtype is not None and jnp.issubdtype(x0_dtype, jnp.floating):
            # x0's own precision where JAX has it; a float64 NumPy array without 64-bit
            # JAX runs in float32, as a Python list does (JAX's default float)
            dtype = x0_dtype if x64 or jnp.dtype(x0_dtype).itemsize < 8 else jnp.float32
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

    stepping = opts.resolve(t0, t1, dtype, sphere=sphere, jumps=getattr(field, "jump_times", ()))
    ts = stepping.ts
    if isinstance(field, AbstractField):  # checks of the classic fields' own weights
        if not field.normalised:
            _check_usa_overflow(field, x0, dtype)
        if jnp.dtype(dtype) == jnp.float32 and not field.on_sphere:
            _warn_float32_resolution(field, t0, t1)
    if opts.backsolve and isinstance(field, (AbstractField, TransformerField)) and not field.loras:
        # diffrax's BacksolveAdjoint fails on an empty tuple of LoRAs among the
        # differentiated leaves: give such a field an exactly-zero rank-1 LoRA on V
        # (the same vector field, the same gradients).
        V = field.V
        a, b = jnp.zeros((1, V.shape[-1]), V.dtype), jnp.zeros((V.shape[-2], 1), V.dtype)
        field = eqx.tree_at(lambda f: f.loras, field, (LoRA(a, b, 1.0, "V"),))
    n_out = stepping.out_times.size
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

    cfg = solve_config(
        stepping,
        n_field_batch=len(field.batch_shape),
        n_x_batch=x0.ndim - 2,
        save_fn=None if summary is None else _SummaryFn(summary),
    )
    ts_arr = None if ts is None else const(ts, dtype)
    if summary is not None and not callable(summary):
        raise TypeError(f"summary must be a function fn(t, x), got {type(summary).__name__}")
    if cfg.progress:
        _announce_compile(field, x0, ts_arr, cfg)
    ys, status, steps, drift = _solve_batch(
        field,
        x0,
        jnp.asarray(t0, dtype) if isinstance(t0, Tracer) else const(t0, dtype),
        const(t1, dtype),
        None,
        ts_arr,
        cfg,
    )
    out_ts = const(stepping.out_times, dtype)
    keep_drift = sphere and summary is None
    return Solution(
        out_ts, ys, status, steps, drift if keep_drift else None, field.dynamics, field.frame
    )


_OPTION_DEFAULTS = SolveOptions.defaults()

# What `_solve_batch` was compiled for in this process (cleared with the compile caches).
_COMPILED: dict = register_cache({})


def _announce_compile(field, x0, ts, cfg) -> None:
    """With `progress`, say on stderr that the first call compiles: a new program is made
    for each combination of the field's structure and static options, the shapes and
    dtypes of its arrays and of `x0`, the output times' count and the solve options
    (what `eqx.filter_jit` keys its cache on); its progress bar starts only after."""
    key = jax.tree.map(
        lambda a: (a.shape, str(a.dtype)) if eqx.is_array(a) else a,
        (field, x0, ts, cfg),
        is_leaf=lambda a: eqx.is_array(a),
    )
    try:
        sig = hash((jax.tree.structure(key), tuple(jax.tree.leaves(key))))
    except TypeError:  # an unhashable static part: nothing to say
        return
    if sig in _COMPILED:
        return
    if len(_COMPILED) >= 256:
        _COMPILED.clear()
    _COMPILED[sig] = True
    print(
        "simulate: compiling the solve (first call with these shapes and options; "
        "later calls reuse it) ...",
        file=sys.stderr,
        flush=True,
    )


def _is_default(name: str, value) -> bool:
    default = _OPTION_DEFAULTS[name]
    return value is default or (isinstance(value, (str, bool)) and value == default)


class _SummaryFn(eqx.Module):
    """`fn(t, x)` as diffrax's `fn(t, y, args)`; static (hashable by identity) for jit."""

    fn: Callable[..., PyTree] = eqx.field(static=True)

    def __call__(self, t, y, args):
        return self.fn(t, y)
