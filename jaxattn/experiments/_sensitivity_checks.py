"""Checks and comparisons built on the sensitivity tools (`ResponseOperator`, `worst_case`,
`linear_response`, `random_directions`, `perturbed`, `simulate`, `divergence`).

- `response_norms`: `|J_k ΔW_j|_F` for many directions `ΔW_j` at every output time `T_k`.
- `worst_vs_random` (`WorstVsRandom`): the worst unit direction (top singular value of
  `J_T : ΔW ↦ δx(T)`) and the best rank-r one against random unit directions, over
  several initial conditions — the worst-vs-random ratios.
- `full_jacobian`, `check_against_jacobian`, `brute_force_check` (`JacobianCheck`),
  `rank1_grid_search`: the worst case found with JVPs and VJPs against the SVD of the full
  forward-mode Jacobian, and (d = 2) the best rank-1 direction against a grid over all
  unit rank-1 matrices.
- `linear_response_check` (`LinearResponseCheck`): the linear response `ε δx(t)` against
  the measured divergence of the run with `W + ε ΔW` and the a-posteriori Grönwall bound,
  for several ε: the remainder `x(ε) − x − ε δx` and its order in ε.
- `first_order_norm`: the norm along a direction at which the linear response reaches a
  given displacement of the tokens at `t1`.
- `direction_spectrum`: the singular values of directions (their rank structure).

The `worst-case-lora` experiment is these functions in sequence. Norms of `ΔW` are
Frobenius norms; `|δx|` over all tokens is the Frobenius norm of the `(n, d)` array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import divergence
from .._base import ArrayLike, Float, PRNGKeyArray
from .._bounds import bound_a_posteriori
from .._model import AbstractField
from .._sensitivity import (
    LinearResponse,
    ResponseOperator,
    WorstCase,
    linear_response,
    perturbed,
    worst_case,
)
from .._simulate import simulate


def response_norms(
    op: ResponseOperator, directions: Float[ArrayLike, "j d d"]
) -> Float[np.ndarray, "j k"]:
    """`|J_k ΔW_j|_F` (all tokens) for each direction `ΔW_j` and each time `T_k` of `op`.

    **Arguments:**

    - `op`: the response operator (its current initial condition is used).
    - `directions`: `(j, d, d)` directions `ΔW_j` (not normalised here).

    **Returns:** `(j, k)` norms of the responses `δx(T_k)`.
    """
    directions = np.asarray(directions)
    k = len(op.times)
    return np.linalg.norm(op.apply_all(directions).reshape(directions.shape[0], k, -1), axis=-1)


@dataclasses.dataclass
class WorstVsRandom:
    """Result of `worst_vs_random`, over `S` initial conditions and `k` times.

    - `sigma (S, k)`: `|J_k ΔW|` of the worst unit direction (top singular value of `J_k`).
    - `sigma_rank (S, k)`: the same for the best unit direction of rank ≤ `rank` found.
    - `random (S, j, k)`, `random_rank (S, j_r, k)`: `|J_k R|` of the random unit
      directions and of the random rank-`rank` ones.
    - `worst`, `worst_rank`: the worst-case results (directions, responses) at the first
      initial condition; `base (k, n, d)`: the unperturbed tokens there.
    """

    times: Float[np.ndarray, " k"]
    sigma: Float[np.ndarray, "S k"]
    sigma_rank: Float[np.ndarray, "S k"]
    random: Float[np.ndarray, "S j k"]
    random_rank: Float[np.ndarray, "S jr k"]
    worst: WorstCase
    worst_rank: WorstCase
    base: Float[np.ndarray, "k n d"]
    rank: int

    def ratio_to_mean_random(self) -> Float[np.ndarray, "S k"]:
        """Worst over the mean random response, per initial condition and time (≥ 1)."""
        return self.sigma / self.random.mean(axis=1)

    def ratio_to_max_random(self) -> Float[np.ndarray, "S k"]:
        """Worst over the largest random response (≥ 1)."""
        return self.sigma / self.random.max(axis=1)

    def rank_ratio_to_mean_random(self) -> Float[np.ndarray, "S k"]:
        """Best rank-`rank` direction over the mean random rank-`rank` response."""
        return self.sigma_rank / self.random_rank.mean(axis=1)

    def rank_over_full(self) -> Float[np.ndarray, "S k"]:
        """Best rank-`rank` response over the worst response (≤ 1)."""
        return self.sigma_rank / self.sigma


def worst_vs_random(
    op: ResponseOperator,
    x0s: Sequence[Float[ArrayLike, "n d"]],
    random: Float[ArrayLike, "j d d"],
    random_rank: Float[ArrayLike, "jr d d"],
    *,
    rank: int = 1,
    iters: int = 30,
    power_iters: int = 200,
    tol: float = 1e-8,
    keys: Sequence[PRNGKeyArray] | None = None,
) -> WorstVsRandom:
    """The worst unit direction `ΔW` of `op`'s target, and the best one of rank ≤ `rank`,
    against random unit directions, at each initial condition of `x0s`.

    At each initial condition: `worst_case(op, method="lobpcg")` (the top singular value of
    every `J_k`), `worst_case(op, rank=rank)` (truncated power iteration), and
    `response_norms` of the random directions. `op`'s initial condition is restored
    afterwards.

    **Arguments:**

    - `op`: the response operator `J_k : ΔW ↦ δx(T_k)` (target, times, solver).
    - `x0s`: the `S ≥ 1` initial conditions, each `(n, d)`.
    - `random`, `random_rank`: unit random directions to compare with, e.g.
      `random_directions(key, j, d)` and `random_directions(key, j_r, d, rank=rank)`.
    - `rank`: the rank of the structured (LoRA) worst case.
    - `iters`, `power_iters`, `tol`: LOBPCG iterations, and the truncated power iteration's
      iterations and relative tolerance (see `worst_case`).
    - `keys`: the start of the iterations at each initial condition
      (default `jax.random.key(s)` for the s-th).

    **Returns:** a `WorstVsRandom` (its ratios are methods).
    """
    if len(x0s) == 0:
        raise ValueError("x0s must hold at least one initial condition")
    random, random_rank = np.asarray(random), np.asarray(random_rank)
    S, k = len(x0s), len(op.times)
    sigma, sigma_rank = np.zeros((S, k)), np.zeros((S, k))
    rnd = np.zeros((S, random.shape[0], k))
    rnd_r = np.zeros((S, random_rank.shape[0], k))
    first = None
    x0_before = op.x0
    try:
        for s, x0 in enumerate(x0s):
            op.set_x0(x0)
            key = jax.random.key(s) if keys is None else keys[s]
            wc = worst_case(op, method="lobpcg", iters=iters, key=key)
            wr = worst_case(op, rank=rank, iters=iters, power_iters=power_iters, tol=tol, key=key)
            sigma[s], sigma_rank[s] = wc.sigma, wr.sigma
            rnd[s] = response_norms(op, random)
            rnd_r[s] = response_norms(op, random_rank)
            if first is None:
                first = (wc, wr, op.base())
    finally:
        op.set_x0(x0_before)
    assert first is not None
    return WorstVsRandom(op.times, sigma, sigma_rank, rnd, rnd_r, *first, rank=rank)


def full_jacobian(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    times: Sequence[float] | Float[np.ndarray, " k"],
    target: str = "V",
    **solve,
) -> Float[np.ndarray, "k nd dd"]:
    """The full Jacobian of `ΔW ↦ x(T_k)` for `W_target ← W_target + ΔW`, at `ΔW = 0`,
    by forward mode (`jax.jacfwd`: d² JVPs through the solve) — a brute-force reference for
    `ResponseOperator`, for small n and d.

    **Arguments:** `field`, `x0`, `t1`, the output times `times (k,)` in `(0, t1]`, the
    `target` ("Q", "K" or "V") and the solver options `solve` (as for `simulate`).

    **Returns:** `(k, n·d, d·d)`: row-major flattened `δx(T_k)` against row-major `ΔW`.
    """
    d = field.d
    kw = {key: v for key, v in solve.items() if key not in ("ts", "adjoint")}
    x0 = jnp.asarray(x0, field.V.dtype)
    fn = lambda w: (
        simulate(perturbed(field, target, w), x0, t1, ts=times, adjoint="forward", **kw).xs
    )
    J = np.asarray(jax.jacfwd(fn)(jnp.zeros((d, d), field.V.dtype)))  # (k, n, d, d, d)
    return J.reshape(J.shape[0], -1, d * d)


def rank1_grid_search(J: Float[ArrayLike, "k m 4"], steps: int = 180) -> Float[np.ndarray, " k"]:
    """`max |J_k vec(u vᵀ)|` over a grid of unit rank-1 2×2 matrices `u vᵀ` (d = 2 only):
    `u` at `steps + 1` angles in `[0, π]`, `v` at `2·steps + 1` angles in `[0, 2π]`.

    **Arguments:** `J (k, m, 4)` (as from `full_jacobian` with d = 2) and the grid size.

    **Returns:** `(k,)` the best value on the grid (a lower bound on the rank-1 maximum,
    within a relative `O((π/steps)²)` of it).
    """
    J = np.asarray(J)
    a = np.linspace(0.0, np.pi, steps + 1)
    b = np.linspace(0.0, 2 * np.pi, 2 * steps + 1)
    u = np.stack([np.cos(a), np.sin(a)], -1)
    v = np.stack([np.cos(b), np.sin(b)], -1)
    M = np.einsum("ai,bj->abij", u, v).reshape(-1, 4)  # unit rank-1 matrices
    return np.max(np.linalg.norm(np.einsum("knm,gm->kgn", J, M), axis=-1), axis=-1)


@dataclasses.dataclass
class JacobianCheck:
    """Result of `check_against_jacobian` at `k` times.

    - `sigma_svd (k,)`: the top singular value of the full Jacobian (NumPy SVD).
    - `sigma (k,)`: the worst case's `|J_k ΔW|`.
    - `alignment (k,)`: `|⟨top right singular vector, ΔW⟩|` (1 when they agree).
    - `rank1_grid (k,)`, `rank1 (k,)`: for d = 2, the best rank-1 value on a grid
      (`rank1_grid_search`) and the rank-1 worst case's value; else None.
    """

    sigma_svd: Float[np.ndarray, " k"]
    sigma: Float[np.ndarray, " k"]
    alignment: Float[np.ndarray, " k"]
    rank1_grid: Float[np.ndarray, " k"] | None = None
    rank1: Float[np.ndarray, " k"] | None = None

    @property
    def max_rel_sigma_error(self) -> float:
        """`max_k |sigma − sigma_svd| / sigma_svd`."""
        return float(np.max(np.abs(self.sigma_svd - self.sigma) / self.sigma_svd))


def check_against_jacobian(
    J: Float[ArrayLike, "k nd dd"],
    worst: WorstCase,
    worst_rank: WorstCase | None = None,
) -> JacobianCheck:
    """The worst case against the SVD of the full Jacobian `J` (e.g. `full_jacobian`).

    **Arguments:**

    - `J`: `(k, n·d, d·d)` Jacobians at the worst case's `k` times.
    - `worst`: a full-rank worst case (`worst_case(op)`).
    - `worst_rank`: optionally, a rank-1 worst case; for d = 2 it is compared with
      `rank1_grid_search`.

    **Returns:** a `JacobianCheck`.
    """
    J = np.asarray(J)
    d = math.isqrt(J.shape[-1])
    sigma_svd, alignment = [], []
    for k in range(J.shape[0]):
        _, s, Wt = np.linalg.svd(J[k])
        sigma_svd.append(float(s[0]))
        alignment.append(float(abs(Wt[0] @ worst.directions[k].ravel())))
    grid = rank1 = None
    if d == 2:
        grid = rank1_grid_search(J)
        if worst_rank is not None:
            rank1 = np.asarray(worst_rank.sigma)
    return JacobianCheck(
        np.asarray(sigma_svd), np.asarray(worst.sigma), np.asarray(alignment), grid, rank1
    )


def brute_force_check(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    times: Sequence[float] | Float[np.ndarray, " k"],
    target: str,
    worst: WorstCase,
    worst_rank: WorstCase | None = None,
    **solve,
) -> JacobianCheck:
    """`check_against_jacobian(full_jacobian(field, x0, t1, times, target, **solve), worst,
    worst_rank)`: the worst case found at `x0` (same field, times, target and solver)
    against the brute-force Jacobian. Costs d² JVPs of the whole solve.

    **Arguments:** as for `full_jacobian`, plus the `worst` (and optional rank-1
    `worst_rank`) case to check, found by `worst_case` with the same times.

    **Returns:** a `JacobianCheck`.
    """
    J = full_jacobian(field, x0, t1, times, target, **solve)
    return check_against_jacobian(J, worst, worst_rank)


@dataclasses.dataclass
class LinearResponseCheck:
    """Result of `linear_response_check` for `E` values of ε on the `T` output times.

    - `response`: the linear response (`ts`, `xs`, `dxs`).
    - `linear (T,)`: `max_i |δx_i(t)|`.
    - `divergence (E, T)`: measured `max_i |x_i(ε, t) − x_i(t)|`.
    - `bound (E, T)`: the a-posteriori Grönwall bound on it.
    - `remainder (E, T)`: `max_i |x_i(ε, t) − x_i(t) − ε δx_i(t)|` (`O(ε²)`).
    """

    eps: Float[np.ndarray, " E"]
    response: LinearResponse
    linear: Float[np.ndarray, " T"]
    divergence: Float[np.ndarray, "E T"]
    bound: Float[np.ndarray, "E T"]
    remainder: Float[np.ndarray, "E T"]

    def max_remainder(self) -> list[float]:
        """The largest remainder over time, per ε."""
        return [float(r.max()) for r in self.remainder]

    def remainder_order(self) -> list[float]:
        """`log(r_i / r_{i+1}) / log(ε_i / ε_{i+1})` between consecutive ε (≈ 2)."""
        r, e = self.max_remainder(), [float(v) for v in self.eps]
        return [float(np.log(r[i] / r[i + 1]) / np.log(e[i] / e[i + 1])) for i in range(len(e) - 1)]

    def max_divergence_over_eps(self) -> list[float]:
        """`max_t e_ε(t) / ε`, per ε (→ `max_t linear` as ε → 0)."""
        return [float(e.max() / eps) for e, eps in zip(self.divergence, self.eps)]

    def max_measured_minus_bound(self) -> list[float]:
        """`max_t (e_ε(t) − bound_ε(t))`, per ε (≤ 0 where the bound holds)."""
        return [float(np.max(e - b)) for e, b in zip(self.divergence, self.bound)]

    def bound_holds(self, atol: float = 1e-8) -> bool:
        """Whether the measured divergence stays below the bound (to `atol`) for every ε."""
        return bool(all(v <= atol for v in self.max_measured_minus_bound()))


def linear_response_check(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    direction: Float[ArrayLike, "d d"],
    target: str,
    eps: Sequence[float],
    **solve,
) -> LinearResponseCheck:
    """The linear response to `direction` against the runs with `W_target + ε·direction`.

    One `linear_response` solve, then for each ε one `simulate` of the perturbed field,
    its `divergence` from the unperturbed run, the `bound_a_posteriori` on it and the
    remainder of the first-order expansion.

    **Arguments:** `field`, `x0`, `t1`, the `direction` ΔW `(d, d)`, the `target`
    ("Q", "K" or "V"), the values `eps` and the solver options `solve` (as for `simulate`;
    `ts` sets the output grid).

    **Returns:** a `LinearResponseCheck`.
    """
    dW = np.asarray(direction)
    lr = linear_response(field, x0, t1, dW, target, **solve)
    x0 = jnp.asarray(x0, field.V.dtype)
    e_rows, b_rows, r_rows = [], [], []
    for ep in eps:
        fe = perturbed(field, target, jnp.asarray(ep * dW, field.V.dtype))
        xs = np.asarray(simulate(fe, x0, t1, **solve).xs)
        e_rows.append(np.asarray(divergence(jnp.asarray(lr.xs), jnp.asarray(xs))))
        b_rows.append(bound_a_posteriori(field, fe, lr.ts, lr.xs, xs).bound)
        r_rows.append(np.max(np.linalg.norm(xs - lr.xs - ep * lr.dxs, axis=-1), axis=-1))
    return LinearResponseCheck(
        np.asarray(eps, np.float64),
        lr,
        np.max(np.linalg.norm(lr.dxs, axis=-1), axis=-1),
        np.stack(e_rows),
        np.stack(b_rows),
        np.stack(r_rows),
    )


def first_order_norm(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    direction: Float[ArrayLike, "d d"],
    displacement: float,
    target: str = "V",
    **solve,
) -> float:
    """First-order estimate of the norm `ν` along the unit `direction` at which some token
    moves by `displacement` at `t1`: `displacement / max_i |δx_i(t1)|` (one
    `linear_response` solve).

    **Arguments:** `field`, `x0`, `t1`, the unit `direction` ΔW `(d, d)`, the wanted
    `displacement`, the `target` and the solver options `solve`.

    **Returns:** `ν` (a float; huge when the tokens do not respond).
    """
    lr = linear_response(field, x0, t1, direction, target, **solve)
    return float(displacement / max(np.max(np.linalg.norm(lr.dxs[-1], axis=-1)), 1e-300))


def direction_spectrum(directions: Float[ArrayLike, "*k d d"]) -> Float[np.ndarray, "*k d"]:
    """Singular values of each direction `ΔW`, largest first (NumPy SVD): the rank
    structure of a worst-case direction (one nonzero value: rank 1). For unit Frobenius
    directions their squares sum to 1.

    **Arguments:** `directions (*k, d, d)`.

    **Returns:** `(*k, d)` singular values.
    """
    return np.linalg.svd(np.asarray(directions), compute_uv=False)
