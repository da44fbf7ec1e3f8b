"""Differentiable sensitivity: gradients through `simulate`, the linear response
to a perturbation of Q, K or V, the worst-case (LoRA) direction, and the smallest LoRA
that changes the cluster structure.

Everything is a JAX transformation of `simulate`; nothing here forms a full Jacobian
except the brute-force checks in the tests.

- `value_and_grad`: a scalar objective of `x(t1)` and its gradient with respect to
  `Q, K, V, β`, the initial tokens and the LoRA factors, by reverse mode
  (`"checkpoint"`: diffrax's `RecursiveCheckpointAdjoint`, exact derivative of the
  discrete solve), forward mode (`"forward"`: one JVP per input entry, for few inputs) or
  `"backsolve"` (`BacksolveAdjoint`: the continuous adjoint ODE solved backwards — O(1)
  memory in the number of steps, but only an approximation, see `docs/sensitivity.md`).
- `linear_response`: `δx(t) = ∂x(t)/∂ε` at `ε = 0` for `W ← W + ε ΔW` (a JVP).
- `ResponseOperator`: the linear map `J_T : ΔW ↦ δx(T)` as JVPs and VJPs, for several
  output times at once; `worst_case_direction` finds its top singular pair by LOBPCG (JAX's) or
  power iteration, and the best rank-r direction by truncated power iteration.
- `smallest_cluster_change`: optax on a smooth surrogate of "the cluster partition at T
  changed", bisection on the LoRA norm, and the norm the Grönwall bound says is needed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array, Float, PRNGKeyArray
from ._fields import AbstractField
from ._lora import LoRA
from ._simulate import ADJOINTS, STATUS_MESSAGES, simulate
from ._validate import TARGETS, check_choice

OBJECTIVES = ("mean_sq", "squared_distance")
#: old objective names still accepted (with a one-line FutureWarning) and what they mean
#: now. "divergence" is `e(t) = max_i |x_i − x̃_i|` everywhere else (`jaxattn.divergence`).
OBJECTIVE_ALIASES = {"divergence": "squared_distance"}
WRT = ("Q", "K", "V", "beta", "x0", "lora")
#: forward mode costs one JVP per input entry; above this many entries it is refused.
MAX_FORWARD_ENTRIES = 2048


# --------------------------------------------------------------------------- objectives
def mean_sq(x: Float[Array, "n d"]) -> Float[Array, ""]:
    """`½ · mean_i |x_i|²`."""
    return 0.5 * jnp.mean(jnp.sum(x * x, axis=-1))


def squared_distance(x: Float[Array, "n d"], x_ref: Float[Array, "n d"]) -> Float[Array, ""]:
    """`½ · Σ_i |x_i − x̃_i|²` (the sensitivity objective; not `e = max_i |x_i − x̃_i|`,
    which is `jaxattn.divergence`)."""
    diff = x - x_ref
    return 0.5 * jnp.sum(diff * diff)


def check_objective(objective: str) -> str:
    """The canonical objective name; an old name (`OBJECTIVE_ALIASES`) is mapped to its new
    one with a one-line `FutureWarning`."""
    if isinstance(objective, str) and objective.lower() in OBJECTIVE_ALIASES:
        new = OBJECTIVE_ALIASES[objective.lower()]
        warnings.warn(
            f"objective {objective!r} is deprecated, use {new!r} (½·Σ_i |Δx_i|²; "
            f"'divergence' means e = max_i |Δx_i| elsewhere)",
            FutureWarning,
            stacklevel=3,
        )
        return new
    return check_choice(objective, "objective", OBJECTIVES)


# --------------------------------------------------------------------------- parameters
def field_params(field: AbstractField, x0) -> dict[str, Array]:
    """The differentiable inputs of a run as a flat dict: `Q, K, V, beta, x0` and, for a
    field with exactly one LoRA, `lora_A`, `lora_B`."""
    p = {
        "Q": field.Q,
        "K": field.K,
        "V": field.V,
        "beta": field.beta,
        "x0": jnp.asarray(x0, field.V.dtype),
    }
    if len(field.loras) == 1:
        p["lora_A"] = field.loras[0].A
        p["lora_B"] = field.loras[0].B
    return p


def with_params(field: AbstractField, p: dict[str, Array]) -> AbstractField:
    """`field` with the weights named in `p` replaced (works on tracers: no checks)."""
    names = [k for k in ("Q", "K", "V", "beta") if k in p]
    if names:
        field = eqx.tree_at(lambda f: [getattr(f, k) for k in names], field, [p[k] for k in names])
    if "lora_A" in p:
        field = eqx.tree_at(
            lambda f: (f.loras[0].A, f.loras[0].B), field, (p["lora_A"], p["lora_B"])
        )
    return field


def _strip_lora(field: AbstractField) -> AbstractField:
    return field.with_lora(None)


def solve_kwargs(solve: dict[str, Any] | None, adjoint, checkpoints) -> dict[str, Any]:
    kw = dict(solve or {})
    kw.pop("ts", None)  # objectives read x(t1) only
    kw.pop("progress", None)
    kw["adjoint"] = adjoint
    if checkpoints is not None:
        if adjoint != "checkpoint":
            raise ValueError("checkpoints applies to adjoint checkpoint only")
        if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
            raise ValueError(f"checkpoints must be a positive integer, got {checkpoints!r}")
        kw["checkpoints"] = checkpoints
    return kw


def final_state(field: AbstractField, x0, t1: float, **solve_kw):
    """`(x(t1), status)` of one run, saving only the final time.

    Saving only `t1` (`SaveAt(ts=[t1])`) keeps reverse-mode memory at the checkpoints
    (not every step). `simulate` itself makes every adjoint, backsolve included, work
    with any field and step option.
    """
    sol = simulate(field, x0, t1, ts=[float(t1)], **solve_kw)
    return sol.xs[..., -1, :, :], sol.status


# --------------------------------------------------------------------------- gradients
@dataclasses.dataclass
class Gradient:
    """Value of the objective and its gradients (`grads[name]` has the input's shape)."""

    value: float
    grads: dict[str, np.ndarray]
    adjoint: str
    objective: str


def _check_wrt(wrt, field: AbstractField) -> tuple[str, ...]:
    if isinstance(wrt, str):
        wrt = (wrt,)
    # The canonical spelling of each name: "q" means Q, "BETA" beta.
    wrt = tuple(dict.fromkeys(check_choice(w, "wrt", WRT) for w in wrt))
    if "lora" in wrt:
        if not field.loras:
            raise ValueError("a LoRA gradient was asked for but the field has no LoRA")
        if len(field.loras) > 1:
            raise ValueError("LoRA gradients need exactly one LoRA on the field")
        if field.batch_shape:
            raise ValueError("gradients take a single field, not a stacked LoRA batch")
    if not wrt:
        raise ValueError("wrt is empty: name at least one of " + ", ".join(WRT))
    return wrt


def objective_fn(
    field: AbstractField,
    t1: float,
    objective: str | Callable = "mean_sq",
    *,
    adjoint: str = "checkpoint",
    checkpoints: int | None = None,
    solve: dict[str, Any] | None = None,
) -> Callable:
    """`f(params) -> (value, status)` for the params of `field_params`.

    `objective`: `"mean_sq"` (`½ mean_i |x_i(t1)|²`), `"squared_distance"`
    (`½ Σ_i |x_i(t1) − x̃_i(t1)|²`, `x̃` the same run without the field's LoRA; both runs
    depend on the parameters; the old name `"divergence"` is mapped to it with a warning)
    or a callable `g(x_t1) -> scalar`.
    """
    if isinstance(objective, str):
        objective = check_objective(objective)
        if objective == "squared_distance" and not field.loras:
            raise ValueError(
                "objective squared_distance compares runs with and without the "
                "LoRA, but the field has no LoRA"
            )
    kw = solve_kwargs(solve, check_choice(adjoint, "adjoint", ADJOINTS), checkpoints)

    def f(p):
        fld = with_params(field, p)
        x, status = final_state(fld, p["x0"], t1, **kw)
        if callable(objective):
            return objective(x), status
        if objective == "mean_sq":
            return mean_sq(x), status
        x_ref, status_ref = final_state(_strip_lora(fld), p["x0"], t1, **kw)
        return squared_distance(x, x_ref), jnp.maximum(status, status_ref)

    return f


def value_and_grad(
    field: AbstractField,
    x0,
    t1: float,
    objective: str | Callable = "mean_sq",
    *,
    adjoint: str = "checkpoint",
    wrt: Sequence[str] | None = None,
    checkpoints: int | None = None,
    max_forward_entries: int = MAX_FORWARD_ENTRIES,
    **solve,
) -> Gradient:
    """Value of a scalar objective of `x(t1)` and its gradient.

    **Arguments:**

    - `field`, `x0 (n, d)`, `t1`: as for `simulate` (single run, no batches).
    - `objective`: `"mean_sq"`, `"squared_distance"` (`½ Σ_i |x_i − x̃_i|²`; old name
      `"divergence"`) or a callable of `x(t1)` (see `objective_fn`).
    - `adjoint`: `"checkpoint"` (reverse mode, diffrax recursive checkpointing with
      `checkpoints` checkpoints; default `log(steps)`), `"forward"` (`jax.jacfwd` with
      diffrax `ForwardMode`: one JVP per input entry; refused above
      `max_forward_entries`), or `"backsolve"` (`BacksolveAdjoint`, approximate).
    - `wrt`: names among `Q, K, V, beta, x0, lora` (default: all; `lora` only when the
      field has one).
    - `solve`: further `simulate` options (`solver`, `dt`, `rtol`, `atol`, `max_steps`,
      `renormalise`).

    **Returns:** a `Gradient` (`grads` keys `Q, K, V, beta, x0, lora_A, lora_B`).

    For sphere dynamics `simulate` normalises `x0`; `grads["x0"]` differentiates through
    that normalisation (it is orthogonal to each `x0_i`).
    """
    if not isinstance(field, AbstractField):
        raise TypeError(f"field must be a jaxattn field, got {type(field).__name__}")
    if field.batch_shape:
        raise ValueError("gradients take a single field, not a stacked LoRA batch")
    x0 = jnp.asarray(x0, field.V.dtype)
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (n, d) for a gradient, got {tuple(x0.shape)}")
    if wrt is None:
        wrt = ("Q", "K", "V", "beta", "x0") + (("lora",) if len(field.loras) == 1 else ())
    wrt = _check_wrt(wrt, field)
    adjoint = check_choice(adjoint, "adjoint", ADJOINTS)
    if isinstance(objective, str):
        objective = check_objective(objective)
    params = field_params(field, x0)
    keys = [k for k in params if k in wrt or (k.startswith("lora_") and "lora" in wrt)]
    diff = {k: params[k] for k in keys}
    rest = {k: v for k, v in params.items() if k not in diff}
    f = objective_fn(field, t1, objective, adjoint=adjoint, checkpoints=checkpoints, solve=solve)
    g = lambda d: f({**rest, **d})
    if adjoint == "forward":
        entries = sum(int(np.prod(v.shape)) for v in diff.values())
        if entries > max_forward_entries:
            raise ValueError(
                f"adjoint forward needs one JVP per input entry and the gradient wrt "
                f"{', '.join(wrt)} has {entries} entries (limit {max_forward_entries}); "
                f"use adjoint checkpoint or backsolve, or fewer wrt"
            )

        def with_aux(d):
            value, status = g(d)
            return value, (value, status)

        grads, (value, status) = jax.jacfwd(with_aux, has_aux=True)(diff)
    else:
        (value, status), grads = jax.value_and_grad(g, has_aux=True)(diff)
    check_status(status)
    return Gradient(
        float(value),
        {k: np.asarray(v) for k, v in grads.items()},
        adjoint,
        objective if isinstance(objective, str) else "custom",
    )


def check_status(status) -> None:
    codes = sorted({int(c) for c in np.asarray(status).ravel()} - {0})
    if codes:
        raise RuntimeError("the solve failed: " + "; ".join(STATUS_MESSAGES[c] for c in codes))


# --------------------------------------------------------------------------- linear response
def perturbed(field: AbstractField, target: str, dW) -> AbstractField:
    """`field` with its base weight `W_target` replaced by `W_target + dW` (LoRAs kept)."""
    target = check_choice(target, "target", TARGETS)
    W = getattr(field, target)
    return eqx.tree_at(lambda f: getattr(f, target), field, W + dW)


def _unit_direction(direction, d: int, dtype) -> Array:
    if isinstance(direction, LoRA):
        direction = direction.delta()
    dW = jnp.asarray(direction, dtype)
    if dW.shape != (d, d):
        raise ValueError(f"direction must be a {d}×{d} matrix (or a LoRA), got {tuple(dW.shape)}")
    return dW


@dataclasses.dataclass
class LinearResponse:
    """`ts (T,)`, the unperturbed trajectory `xs (T, n, d)` and the tangent
    `dxs (T, n, d) = ∂x(t)/∂ε` at ε = 0 for `W ← W + ε ΔW`."""

    ts: np.ndarray
    xs: np.ndarray
    dxs: np.ndarray


def linear_response(
    field: AbstractField, x0, t1: float, direction, target: str = "V", **solve
) -> LinearResponse:
    """First-order change of the whole trajectory under `W_target ← W_target + ε·direction`.

    `direction` is a `d×d` matrix `ΔW` or a `LoRA` (its `ΔW = (α/r) B A`). One forward-mode
    solve (`jax.jvp` through diffrax `ForwardMode`) gives `δx(t)` on the whole output grid:
    the solution of the tangent dynamics `δx' = ∂F/∂x δx + ∂F/∂W ΔW`, `δx(0) = 0`.
    `x(ε) = x + ε δx + O(ε²)`.
    """
    dW = _unit_direction(direction, field.d, field.V.dtype)
    kw = solve_kwargs(solve, "forward", None)
    kw["ts"] = solve.get("ts")
    x0 = jnp.asarray(x0, field.V.dtype)

    def F(eps):
        sol = simulate(perturbed(field, target, eps * dW), x0, t1, **kw)
        return sol.xs, (sol.ts, sol.status)

    eps0 = jnp.zeros((), field.V.dtype)
    xs, dxs, (ts, status) = jax.jvp(F, (eps0,), (jnp.ones_like(eps0),), has_aux=True)
    check_status(status)
    return LinearResponse(np.asarray(ts), np.asarray(xs), np.asarray(dxs))


class ResponseOperator:
    """The linear maps `J_k : ΔW ↦ δx(T_k)` (`d×d → n×d`) at several output times.

    `matvec(V (k, d, d)) -> (k, n, d)` applies `J_k` to `V[k]` (batched JVPs, diffrax
    `ForwardMode`); `rmatvec(U (k, n, d)) -> (k, d, d)` applies `J_kᵀ` (batched VJPs,
    recursive checkpointing). Both differentiate the same discrete solve, so they are exact
    transposes of each other (to rounding). One compilation serves every `T_k` and any
    `x0` of the same shape (`set_x0`).
    """

    def __init__(
        self,
        field: AbstractField,
        x0,
        t1: float,
        times: Sequence[float] | None = None,
        target: str = "V",
        **solve,
    ):
        if field.batch_shape:
            raise ValueError("the response operator takes a single field")
        self.field = field
        self.target = check_choice(target, "target", TARGETS)
        self.dtype = field.V.dtype
        self.d = field.d
        self.t1 = float(t1)
        times = [self.t1] if times is None else [float(t) for t in times]
        if any(t <= 0 or t > self.t1 + 1e-12 for t in times):
            raise ValueError(f"times must lie in (0, t1 = {self.t1}]")
        self.times = np.asarray(times, np.float64)
        # Output grid = the requested times: the solve still uses the solver's own steps.
        self._solve = {k: v for k, v in solve.items() if k not in ("ts", "adjoint", "progress")}
        self._z = jnp.zeros((self.d, self.d), self.dtype)
        self._k = len(times)
        fwd = self._builder("forward")
        rev = self._builder("checkpoint")
        idx = jnp.arange(self._k)

        def all_times(x0, V):  # (x(T_k), J_k V[j] for every k and every direction j)
            def one(v):
                return jax.jvp(lambda w: fwd(w, x0), (self._z,), (v,))

            primal, tang = jax.vmap(one)(V)
            return primal[0], tang

        def rmatvec(x0, U):
            def one(k, u):
                cot = jnp.zeros((self._k,) + u.shape, u.dtype).at[k].set(u)
                return jax.vjp(lambda w: rev(w, x0), self._z)[1](cot)[0]

            return jax.vmap(one)(idx, U)

        def normal_one(x0, k, v):  # J_kᵀ J_k v for one time k and one direction v (d, d)
            tang = jax.jvp(lambda w: fwd(w, x0), (self._z,), (v,))[1]
            cot = jnp.zeros_like(tang).at[k].set(tang[k])
            return jax.vjp(lambda w: rev(w, x0), self._z)[1](cot)[0]

        def top(x0, V0, iters: int):
            from jax.experimental.sparse.linalg import lobpcg_standard

            # LOBPCG (jax.experimental.sparse.linalg) on each J_kᵀJ_k, acting on d²-vectors;
            # it applies the operator to blocks of columns, hence the inner vmap.
            d = self.d

            def one(k, v0):
                def A(X):
                    col = lambda c: normal_one(x0, k, c.reshape(d, d)).reshape(-1)
                    return jax.vmap(col, in_axes=1, out_axes=1)(X)

                theta, U, it = lobpcg_standard(A, v0.reshape(-1, 1), m=iters)
                return theta[0], U[:, 0].reshape(d, d), it

            return jax.vmap(one)(idx, V0)

        # Two compilations in all: batches of exactly k directions (matvec, and random
        # directions in chunks of k) and the batched VJP.
        self._all = jax.jit(all_times)
        self._rmatvec = jax.jit(rmatvec)
        self._top = jax.jit(top, static_argnums=2)  # compiled on first use only
        self.set_x0(x0)

    def _builder(self, adjoint):
        def F(dW, x0):
            field = perturbed(self.field, self.target, dW)
            return simulate(field, x0, self.t1, adjoint=adjoint, ts=self.times, **self._solve).xs

        return F

    def set_x0(self, x0) -> None:
        self.x0 = jnp.asarray(x0, self.dtype)

    def base(self) -> np.ndarray:
        """Unperturbed tokens at the times, `(k, n, d)`."""
        return np.asarray(self._all(self.x0, jnp.zeros((self._k, self.d, self.d), self.dtype))[0])

    def matvec(self, V) -> np.ndarray:
        """`J_k V[k]` for each time k: `(k, d, d) -> (k, n, d)`."""
        tang = np.asarray(self._all(self.x0, jnp.asarray(V, self.dtype))[1])
        return tang[np.arange(self._k), np.arange(self._k)]

    def rmatvec(self, U) -> np.ndarray:
        """`J_kᵀ U[k]`: `(k, n, d) -> (k, d, d)`."""
        return np.asarray(self._rmatvec(self.x0, jnp.asarray(U, self.dtype)))

    def apply_all(self, V) -> np.ndarray:
        """`J_k V[j]` for all times k and all directions j: `(j, k, n, d)`."""
        V = np.asarray(V)
        m = V.shape[0]
        pad = (-m) % self._k
        Vp = np.concatenate([V, np.zeros((pad,) + V.shape[1:])]) if pad else V
        out = [
            np.asarray(self._all(self.x0, jnp.asarray(Vp[i : i + self._k], self.dtype))[1])
            for i in range(0, Vp.shape[0], self._k)
        ]
        return np.concatenate(out)[:m]

    def normal(self, V) -> np.ndarray:
        """`J_kᵀ J_k V[k]`."""
        return self.rmatvec(self.matvec(V))

    def top_eigenpairs(self, V0, iters: int = 30) -> tuple[np.ndarray, np.ndarray, int]:
        """Top eigenpair of each `J_kᵀJ_k` from the start `V0 (k, d, d)`: LOBPCG
        (`jax.experimental.sparse.linalg.lobpcg_standard`, at most `iters` iterations, to
        the dtype's rounding) for every time at once, inside one compiled function. For
        d² ≤ 5, where LOBPCG does not apply (it needs more than 5 unknowns per wanted
        vector), the d² × d² matrices are formed from d² products and solved by `eigh`.

        **Returns:** `(θ (k,), unit vectors (k, d, d), iterations)`.
        """
        d, k = self.d, self._k
        if d * d <= 5:
            basis = np.eye(d * d).reshape(d * d, d, d)
            cols = [self.normal(np.broadcast_to(e, (k, d, d))) for e in basis]
            N = np.stack([c.reshape(k, d * d) for c in cols], axis=-1)
            N = 0.5 * (N + np.swapaxes(N, 1, 2))  # symmetric to rounding already
            ev, evec = np.linalg.eigh(N)
            return ev[:, -1], evec[:, :, -1].reshape(k, d, d), d * d
        theta, U, its = self._top(self.x0, jnp.asarray(V0, self.dtype), int(iters))
        U = np.asarray(U)
        U = U / _frob(U)[:, None, None]
        return np.asarray(theta), U, int(np.max(np.asarray(its)))


def _frob(V: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(V * V, axis=(-2, -1)))


def truncate_rank(V: np.ndarray, rank: int) -> np.ndarray:
    """Best rank-`rank` approximation of each `d×d` matrix in `V (k, d, d)` (SVD)."""
    U, s, Wt = np.linalg.svd(V)
    s = s.copy()
    s[..., rank:] = 0.0
    return (U * s[..., None, :]) @ Wt


def power_top(
    normal, v0: np.ndarray, iters: int, tol: float = 1e-10, project: Callable | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Power iteration `v ← P(N v)/|P(N v)|` for `k` operators at once (P = `project`,
    e.g. rank truncation; identity by default). Stops when every Rayleigh quotient
    changes by less than `tol` (relative). **Returns:** `(θ (k,), vectors, iterations)`."""
    proj = project or (lambda V: V)
    v = proj(v0)
    v = v / _frob(v)[:, None, None]
    theta = np.zeros(v.shape[0])
    it = 0
    for it in range(1, iters + 1):  # noqa: B007 (the count is returned)
        w = normal(v)
        new = np.sum(w * v, axis=(-2, -1))
        w = proj(w)
        v = w / np.maximum(_frob(w), 1e-300)[:, None, None]
        if np.all(np.abs(new - theta) <= tol * np.maximum(np.abs(new), 1e-300)):
            theta = new
            break
        theta = new
    return theta, v, it


@dataclasses.dataclass
class WorstCase:
    """Worst-case directions at the times `times (k,)`.

    - `directions (k, d, d)`: unit Frobenius norm `ΔW` maximising `|J_k ΔW|_F` (over all
      directions, or over rank ≤ `rank` ones).
    - `sigma (k,)`: `|J_k ΔW|_F` at that direction (the top singular value when
      `rank` is None).
    - `response (k, n, d)`: `δx(T_k) = J_k ΔW`.
    """

    times: np.ndarray
    directions: np.ndarray
    sigma: np.ndarray
    response: np.ndarray
    rank: int | None
    iterations: int

    def lora(self, k: int = -1, norm: float = 1.0, target: str = "V") -> LoRA:
        """The direction at time `k` as a LoRA of rank `rank` (or d) with
        `‖ΔW‖_F = norm`."""
        U, s, Wt = np.linalg.svd(self.directions[k])
        r = self.rank or int(np.sum(s > 1e-12 * s[0]))
        B = U[:, :r] * (norm * s[:r])[None, :]
        return LoRA(jnp.asarray(Wt[:r]), jnp.asarray(B), float(r), target)


def worst_case(
    op: ResponseOperator,
    *,
    rank: int | None = None,
    method: str = "lobpcg",
    iters: int = 30,
    power_iters: int = 200,
    tol: float = 1e-10,
    key: PRNGKeyArray | None = None,
) -> WorstCase:
    """Top singular pair of each `J_k` (JVPs and VJPs only, never the full Jacobian).

    `method="lobpcg"` finds the top eigenpair of `J_kᵀJ_k` with JAX's LOBPCG
    (`ResponseOperator.top_eigenpairs`, at most `iters` iterations); `"power"` runs plain
    power iteration. (`"lanczos"`, the name of the earlier hand-written solver, is
    accepted for `"lobpcg"`.) With `rank = r < d`, the result is refined by truncated
    power iteration `ΔW ← P_r(J_kᵀJ_k ΔW)` (P_r: best rank-r approximation; no library
    solver maximises over the rank-r matrices), started from `P_r` of the top singular
    vector — a local maximiser of `|J_k ΔW|` over unit rank-r directions.
    """
    if method == "lanczos":
        method = "lobpcg"
    method = check_choice(method, "method", ("lobpcg", "power"))
    d = op.d
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and rank >= d:
        rank = None
    key = jax.random.key(0) if key is None else key
    v0 = np.asarray(jax.random.normal(key, (op._k, d, d), jnp.float64))
    if method == "lobpcg":
        _, v, it = op.top_eigenpairs(v0, iters)
    else:
        _, v, it = power_top(op.normal, v0, power_iters, tol)
    if rank is not None:
        _, v, it3 = power_top(
            op.normal, v, power_iters, tol, project=lambda V: truncate_rank(V, rank)
        )
        it += it3
    resp = op.matvec(v)
    sigma = np.sqrt(np.sum(resp * resp, axis=(-2, -1)))
    return WorstCase(op.times, v, sigma, resp, rank, it)


def worst_case_direction(
    field: AbstractField,
    x0,
    t1: float,
    target: str = "V",
    *,
    rank: int | None = None,
    method: str = "lobpcg",
    iters: int = 30,
    key: PRNGKeyArray | None = None,
    **solve,
) -> WorstCase:
    """The direction `ΔW` of `W_target` (unit Frobenius norm, rank ≤ `rank`) that moves
    the tokens most at `t1` to first order. See `worst_case`."""
    op = ResponseOperator(field, x0, t1, None, target, **solve)
    return worst_case(op, rank=rank, method=method, iters=iters, key=key)


def random_directions(key, num: int, d: int, rank: int | None = None) -> np.ndarray:
    """`num` random unit-Frobenius `d×d` directions: Gaussian matrices, or products
    `B A` of Gaussian factors of rank `rank` (a random LoRA)."""
    if rank is None or rank >= d:
        V = np.asarray(jax.random.normal(key, (num, d, d), jnp.float64))
    else:
        ka, kb = jax.random.split(key)
        A = np.asarray(jax.random.normal(ka, (num, rank, d), jnp.float64))
        B = np.asarray(jax.random.normal(kb, (num, d, rank), jnp.float64))
        V = B @ A
    return V / _frob(V)[:, None, None]


# --------------------------------------------------------------------------- cluster change
def _pair_distances(x):
    diff = x[:, None, :] - x[None, :, :]
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1) + 1e-30)


def change_margins(
    x: Float[Array, "n d"], labels: np.ndarray, threshold: float
) -> Float[Array, " m"]:
    """Margins whose positivity each *proves* the cluster partition of `x` (connected
    components at `threshold`) differs from `labels`:

    - merge: `threshold − |x_i − x_j|` for `i, j` in different clusters (they connect);
    - split: `min_{j ~ i} |x_i − x_j| − threshold` for `i` in a cluster of ≥ 2 (token
      `i` loses every link to its cluster).
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    dist = _pair_distances(x)
    same = labels[:, None] == labels[None, :]
    iu = np.triu_indices(n, 1)
    diff_pairs = ~same[iu]
    merge = threshold - dist[iu][np.nonzero(diff_pairs)[0]]
    mates = same & ~np.eye(n, dtype=bool)
    has = mates.any(axis=1)
    big = jnp.asarray(1e6, x.dtype)
    nearest = jnp.min(jnp.where(jnp.asarray(mates), dist, big), axis=1)
    split = nearest[np.nonzero(has)[0]] - threshold
    return jnp.concatenate([merge, split])


def change_score(x, labels, threshold, temperature) -> Float[Array, ""]:
    """Smooth maximum (`τ·logsumexp(m/τ)`) of `change_margins`: the differentiable
    surrogate. It is ≥ the largest margin, so the optimiser aims at a positive score and
    every candidate is then checked with the discrete `cluster_labels`."""
    m = change_margins(x, labels, threshold)
    return temperature * jax.nn.logsumexp(m / temperature)


@dataclasses.dataclass
class ClusterChange:
    """Result of `smallest_cluster_change` (norms are Frobenius = operator for rank 1)."""

    norm: float  # smallest norm found that changes the partition (upper estimate)
    direction: np.ndarray  # unit ΔW (d×d)
    labels_before: np.ndarray
    labels_after: np.ndarray
    clusters_before: int
    clusters_after: int
    kind: str  # "merge", "split" or "both"
    needed_displacement: float  # min over pairs of |d_ij − threshold| / 2
    bound_norm: float  # smallest norm along `direction` at which the bound reaches it
    bound_horizon: float  # at `norm`: last t up to which the bound certifies e ≤ needed
    history: dict[str, list]


def _labels(x, threshold, sphere):
    from ._metrics import cluster_labels

    return np.asarray(cluster_labels(jnp.asarray(x), threshold, sphere=sphere))


def _canon(labels):
    _, inv = np.unique(labels, return_inverse=True)
    return inv


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])))


def smallest_cluster_change(
    field: AbstractField,
    x0,
    t1: float,
    target: str = "V",
    *,
    rank: int = 1,
    threshold: float = 0.1,
    temperature: float | None = None,
    steps: int = 40,
    lr: float = 0.05,
    bisections: int = 8,
    grow: float = 1.6,
    max_norm: float = 10.0,
    key=None,
    init_direction=None,
    log: Callable | None = None,
    **solve,
) -> ClusterChange:
    """Smallest LoRA of `W_target` (rank `rank`, by Frobenius norm) whose run has a
    different cluster partition at `t1` than the unperturbed run.

    For a norm `s`, Adam (optax) maximises the surrogate `change_score` of
    `x(t1; W + s·B A/|B A|_F)` over the factors `(A, B)` for `steps` steps (warm-started
    from the previous norm; first from `init_direction`, e.g. the worst-case direction).
    `s` grows by `grow` until the discrete partition changes, then `bisections` bisection
    steps shrink it. The result is an upper estimate of the true minimum (a local search).

    `bound_norm` is the norm along the found direction below which the a-priori Grönwall
    bound (`bound_a_priori`; docs/theory.md, 'Stability bound') certifies `e(t1)`
    smaller than
    `needed_displacement` — the smallest movement that can change the partition (a pair
    distance must cross `threshold`, and each moves by at most `2e`). The bound being
    rigorous, `bound_norm ≤ norm` must hold.
    """
    import optax

    temperature = 0.05 * threshold if temperature is None else float(temperature)
    log = log or (lambda *_: None)
    target = check_choice(target, "target", TARGETS)
    dtype = field.V.dtype
    d = field.d
    sphere = field.on_sphere
    x0 = jnp.asarray(x0, dtype)
    kw = solve_kwargs(solve, "checkpoint", None)
    x_base, status = final_state(field, x0, t1, **kw)
    check_status(status)
    x_base = np.asarray(x_base)
    labels0 = _labels(x_base, threshold, sphere)
    dist0 = np.asarray(_pair_distances(jnp.asarray(x_base)))
    iu = np.triu_indices(x_base.shape[0], 1)
    needed = float(np.min(np.abs(dist0[iu] - threshold)) / 2.0)

    key = jax.random.key(0) if key is None else key
    if init_direction is not None:
        U, sv, Wt = np.linalg.svd(np.asarray(init_direction, np.float64))
        B0 = U[:, :rank] * sv[None, :rank]
        A0 = Wt[:rank]
    else:
        ka, kb = jax.random.split(key)
        A0 = np.asarray(jax.random.normal(ka, (rank, d), jnp.float64))
        B0 = np.asarray(jax.random.normal(kb, (d, rank), jnp.float64))
    theta = {"A": jnp.asarray(A0, dtype), "B": jnp.asarray(B0, dtype)}

    def unit(th):
        M = th["B"] @ th["A"]
        return M / jnp.sqrt(jnp.sum(M * M))

    def final(th, s):
        fld = perturbed(field, target, s * unit(th))
        return final_state(fld, x0, t1, **kw)[0]

    def loss(th, s):
        return -change_score(final(th, s), labels0, threshold, temperature)

    opt = optax.adam(lr)

    @jax.jit
    def step(th, state, s):
        val, g = jax.value_and_grad(loss)(th, s)
        # optax mixes its int32 step count with Python floats (bias correction), which
        # strict dtype promotion rejects; the update itself is float throughout.
        with jax.numpy_dtype_promotion("standard"):
            upd, state = opt.update(g, state, th)
            th = optax.apply_updates(th, upd)
        return th, state, val

    final_jit = jax.jit(final)
    hist = {"norm": [], "score": [], "changed": []}

    def attempt(th, s):
        """Optimise at norm s; return (changed?, best θ, labels)."""
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(th)
        s_arr = jnp.asarray(s, dtype)
        best = None
        for i in range(steps + 1):
            x = np.asarray(final_jit(th, s_arr))
            lab = _labels(x, threshold, sphere)
            if np.all(np.isfinite(x)) and not _same_partition(lab, labels0):
                best = (th, lab)
                break
            if i == steps:
                break
            th, state, _val = step(th, state, s_arr)
        score = float(-loss(th, s_arr))
        hist["norm"].append(float(s))
        hist["score"].append(score)
        hist["changed"].append(best is not None)
        log(
            f"  norm {s:.4g}: surrogate {score:+.3g}, partition "
            f"{'changed' if best is not None else 'unchanged'}"
        )
        return (best is not None), th, (best[1] if best else None)

    # Initial scale: first order, |J u| s ≈ needed displacement (cheap guess, never < 1e-4).
    s = max(1e-4, needed)
    lo, hi, th_hi, lab_hi = 0.0, None, theta, None
    while s <= max_norm:
        ok, theta, lab = attempt(theta, s)
        if ok:
            hi, th_hi, lab_hi = s, theta, lab
            break
        lo = s
        s *= grow
    if hi is None:
        raise RuntimeError(f"no LoRA of norm ≤ {max_norm} changed the clusters at t = {t1}")
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        ok, th, lab = attempt(th_hi, mid)
        if ok:
            hi, th_hi, lab_hi = mid, th, lab
        else:
            lo = mid
    assert lab_hi is not None  # set together with hi
    direction = np.asarray(unit(th_hi))
    x_new = np.asarray(final_jit(th_hi, jnp.asarray(hi, dtype)))
    m = np.asarray(change_margins(jnp.asarray(x_new), labels0, threshold))
    n_merge = int(np.sum(~(labels0[iu[0]] == labels0[iu[1]])))
    kinds = {"merge" if i < n_merge else "split" for i in np.nonzero(m > 0)[0]}
    kind = "both" if len(kinds) == 2 else (kinds.pop() if kinds else "other")

    # Norm the bound needs along this direction (the a-priori bound grows with the norm).
    bound_norm, bound_horizon = bound_needed_norm(
        field, target, direction, x0, t1, needed, hi, solve=solve
    )
    return ClusterChange(
        norm=float(hi),
        direction=direction,
        labels_before=_canon(labels0),
        labels_after=_canon(lab_hi),
        clusters_before=int(np.unique(labels0).size),
        clusters_after=int(np.unique(lab_hi).size),
        kind=kind,
        needed_displacement=needed,
        bound_norm=bound_norm,
        bound_horizon=bound_horizon,
        history=hist,
    )


def bound_needed_norm(
    field: AbstractField,
    target: str,
    direction,
    x0,
    t1: float,
    needed: float,
    s_max: float,
    *,
    solve: dict[str, Any] | None = None,
) -> tuple[float, float]:
    """What the Grönwall stability bound says about `W_target ← W_target + s·direction`.

    **Returns:** `(s_bound, horizon)`. `s_bound`: the smallest `s ≤ s_max` at which the
    a-posteriori Grönwall bound at `t1` reaches `needed` (geometric bisection; below it
    the bound certifies `e(t1) < needed`); `nan` if it stays below up to `s_max`
    (which would contradict a change at `s_max`), `0.0` if it is reached for every
    representable `s > 0` (the bound is vacuous at `t1`). `horizon`: at `s = s_max`, the
    last output time up to which the bound certifies `e ≤ needed`.
    """
    from ._bounds import bound_a_posteriori, certified_horizon

    kw = {k: v for k, v in (solve or {}).items() if k not in ("ts", "adjoint", "progress")}
    direction = np.asarray(direction, np.float64)
    base = simulate(field, x0, t1, **kw)
    ts, xs = np.asarray(base.ts), np.asarray(base.xs)

    def bound(s: float) -> np.ndarray:
        fp = perturbed(field, target, jnp.asarray(s * direction, field.V.dtype))
        xp = np.asarray(simulate(fp, x0, t1, **kw).xs)
        if not np.all(np.isfinite(xp)):
            return np.full(ts.shape, np.inf)
        return bound_a_posteriori(field, fp, ts, xs, xp).bound

    b_max = bound(s_max)
    horizon = float(certified_horizon(ts, b_max, needed))
    reaches = lambda s: bool(bound(s)[-1] >= needed)
    if not b_max[-1] >= needed:
        return float("nan"), horizon
    hi = lo = float(s_max)
    while reaches(lo):
        hi, lo = lo, lo / 10.0
        if lo < 1e-300:
            return 0.0, horizon
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi, horizon
