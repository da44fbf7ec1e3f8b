"""The linear response of the tokens to a perturbation of Q, K or V, and the worst-case
(LoRA) direction.

- `linear_response`: `δx(t) = ∂x(t)/∂ε` at `ε = 0` for `W ← W + ε ΔW` (a JVP).
- `ResponseOperator`: the linear map `J_T : ΔW ↦ δx(T)` as JVPs and VJPs, for several
  output times at once; `worst_case` / `worst_case_direction` find its top singular pair
  by LOBPCG (JAX's) or power iteration, and the best rank-r direction by truncated power
  iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._base import Array, ArrayLike, Float, PRNGKeyArray, check_choice
from .._model import TARGETS, AbstractField, LoRA
from .._simulate import simulate
from .gradients import check_status, solve_options


def perturbed(field: AbstractField, target: str, dW: Float[ArrayLike, "d d"]) -> AbstractField:
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

    ts: Float[np.ndarray, " T"]
    xs: Float[np.ndarray, "T n d"]
    dxs: Float[np.ndarray, "T n d"]


def linear_response(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    direction: Float[ArrayLike, "d d"] | LoRA,
    target: str = "V",
    **solve,
) -> LinearResponse:
    """First-order change of the whole trajectory under `W_target ← W_target + ε·direction`.

    `direction` is a `d×d` matrix `ΔW` or a `LoRA` (its `ΔW = (α/r) B A`). One forward-mode
    solve (`jax.jvp` through diffrax `ForwardMode`) gives `δx(t)` on the whole output grid:
    the solution of the tangent dynamics `δx' = ∂F/∂x δx + ∂F/∂W ΔW`, `δx(0) = 0`.
    `x(ε) = x + ε δx + O(ε²)`.
    """
    dW = _unit_direction(direction, field.d, field.V.dtype)
    kw = solve_options(solve, "forward", None).replace(ts=solve.get("ts"))
    x0 = jnp.asarray(x0, field.V.dtype)

    def F(eps):
        sol = simulate(perturbed(field, target, eps * dW), x0, t1, options=kw)
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
        x0: Float[ArrayLike, "n d"],
        t1: float,
        times: Sequence[float] | None = None,
        target: str = "V",
        **solve,
    ) -> None:
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

    def set_x0(self, x0: Float[ArrayLike, "n d"]) -> None:
        self.x0 = jnp.asarray(x0, self.dtype)

    def base(self) -> Float[np.ndarray, "k n d"]:
        """Unperturbed tokens at the times, `(k, n, d)`."""
        return np.asarray(self._all(self.x0, jnp.zeros((self._k, self.d, self.d), self.dtype))[0])

    def matvec(self, V: Float[ArrayLike, "k d d"]) -> Float[np.ndarray, "k n d"]:
        """`J_k V[k]` for each time k: `(k, d, d) -> (k, n, d)`."""
        tang = np.asarray(self._all(self.x0, jnp.asarray(V, self.dtype))[1])
        return tang[np.arange(self._k), np.arange(self._k)]

    def rmatvec(self, U: Float[ArrayLike, "k n d"]) -> Float[np.ndarray, "k d d"]:
        """`J_kᵀ U[k]`: `(k, n, d) -> (k, d, d)`."""
        return np.asarray(self._rmatvec(self.x0, jnp.asarray(U, self.dtype)))

    def apply_all(self, V: Float[ArrayLike, "j d d"]) -> Float[np.ndarray, "j k n d"]:
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

    def normal(self, V: Float[ArrayLike, "k d d"]) -> Float[np.ndarray, "k d d"]:
        """`J_kᵀ J_k V[k]`."""
        return self.rmatvec(self.matvec(V))

    def top_eigenpairs(
        self, V0: Float[ArrayLike, "k d d"], iters: int = 30
    ) -> tuple[Float[np.ndarray, " k"], Float[np.ndarray, "k d d"], int]:
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
      directions, or over rank ≤ `rank` ones), signed so that its largest-magnitude entry
      is positive (a singular vector is defined up to its sign).
    - `sigma (k,)`: `|J_k ΔW|_F` at that direction (the top singular value when
      `rank` is None).
    - `response (k, n, d)`: `δx(T_k) = J_k ΔW`.
    """

    times: Float[np.ndarray, " k"]
    directions: Float[np.ndarray, "k d d"]
    sigma: Float[np.ndarray, " k"]
    response: Float[np.ndarray, "k n d"]
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
    # A singular vector is defined up to its sign: fix it (largest-magnitude entry
    # positive), so the direction does not depend on the solver or its start.
    flat = v.reshape(v.shape[0], -1)
    v = v * np.sign(flat[np.arange(flat.shape[0]), np.argmax(np.abs(flat), axis=1)])[:, None, None]
    resp = op.matvec(v)
    sigma = np.sqrt(np.sum(resp * resp, axis=(-2, -1)))
    return WorstCase(op.times, v, sigma, resp, rank, it)


def worst_case_direction(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
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


def random_directions(
    key: PRNGKeyArray, num: int, d: int, rank: int | None = None
) -> Float[np.ndarray, "num d d"]:
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
