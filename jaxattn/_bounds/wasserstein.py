"""Stability of the mean-field flow in W₂ under a change of weights (derivation in
`docs/mean_field.md`).

Two flows of measures, `μ_t` driven by the field X of `(Q, K, V, β)` and `μ̃_t` by X̃ of
`(Q̃, K̃, Ṽ, β)`. Transport a coupling π₀ of `(μ₀, μ̃₀)` along both characteristic flows
and let `D(t)² = E_{π₀}|x(t) − x̃(t)|²`, so that `W₂(μ_t, μ̃_t) ≤ D(t)`. Splitting

    X[μ](x) − X̃[μ̃](x̃) = (X[μ](x) − X[μ](x̃)) + (X[μ](x̃) − X[μ̃](x̃)) + (X[μ̃] − X̃[μ̃])(x̃)

with a Lipschitz constant `L_x` in the point, `L_μ` in the measure (for W₁ ≤ W₂) and a
field gap δ gives `D' ≤ (L_x + L_μ) D + δ` (a Dobrushin-type estimate), integrated on the
output grid by the same exact recursion as the token-level bound (`gronwall.gronwall`).
With `R` the radius and `Dm` the diameter of the union of both supports on an interval,
`a` the norm of the logit matrix and `κ = β a R Dm` (R = 1 on the sphere):

    plain      L = ‖V‖(β a Dm²/4 + (1 + κ) e^κ)        δ = ‖ΔV‖ R  + ‖V‖ β ‖ΔA‖ R Dm²/4
    rescaled   L = ‖V‖(1 + β a Dm²/4 + (1 + κ) e^κ)    δ = ‖ΔV‖ Dm + ‖V‖ β ‖ΔA_t‖ R Dm²/4
    sphere     L = ‖V‖(2 + β a Dm²/4 + (1 + κ) e^κ)    δ = ‖ΔV‖    + ‖V‖ β ‖ΔA‖ Dm²/4

(`A_t = e^{tVᵀ} A e^{tV}` for the rescaled dynamics.) The factor `e^κ` is the price of a
W₁ estimate: moving a small mass far can change the softmax average by that factor more
than its transport cost. A second, label-level estimate has no such factor: with the
coupling given by an optimal assignment at t = 0, `W₂(μ_t, μ̃_t) ≤ max_i |x_i − x̃_σ(i)|`,
which the token-level Grönwall bound (`bound_a_posteriori`) controls. The returned bound
is the smaller of the two at each time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .._base import ArrayLike, Float
from .._model import AbstractField
from .gronwall import (
    as_grid,
    bound_a_posteriori,
    check_field_pair,
    field_weights,
    gronwall,
    interval_growth,
    interval_sup,
    opnorm,
    rescaled_interval_norms,
)


class WassersteinBound(NamedTuple):
    """`ts (T,)`; `bound (T,)` = min of `dobrushin` and `coupling` (both `(T,)`);
    `w0` = `W₂(μ₀, μ̃₀)`; the interval constants `lipschitz` and `gap` `(T−1,)`."""

    ts: Float[np.ndarray, " T"]
    bound: Float[np.ndarray, " T"]
    dobrushin: Float[np.ndarray, " T"]
    coupling: Float[np.ndarray, " T"]
    w0: float
    lipschitz: Float[np.ndarray, " T-1"]
    gap: Float[np.ndarray, " T-1"]


def _union_extent(xs, xs_p):
    """Radius and diameter of the union of both clouds at each time, `(T,)` each."""
    from scipy.spatial.distance import pdist

    both = np.concatenate([xs, xs_p], axis=-2)
    R = np.max(np.linalg.norm(both, axis=-1), axis=-1)
    D = np.empty(both.shape[0])
    for k, pts in enumerate(both):
        if pts.shape[-1] <= 3 and pts.shape[0] > 64:
            from scipy.spatial import ConvexHull, QhullError

            try:  # the diameter is attained at hull vertices
                pts = pts[ConvexHull(pts).vertices] if pts.shape[-1] > 1 else pts
            except (QhullError, ValueError):
                pass
        D[k] = pdist(pts).max() if pts.shape[0] > 1 else 0.0
    return R, D


def _interval_extent(field, field_p, ts, R, D):
    """Sup of radius and diameter on each interval from the grid values, using how fast
    the points can move (docs/mean_field.md)."""
    Vn = max(opnorm(np.asarray(field.weight("V"))), opnorm(np.asarray(field_p.weight("V"))))
    h = np.diff(ts)
    with np.errstate(over="ignore", invalid="ignore"):
        if field.on_sphere:  # sphere (USA is refused before)
            R_sup = np.ones_like(h)
            D_sup = np.minimum(2.0, 0.5 * (D[:-1] + D[1:]) + Vn * h)
        elif field.frame == "z":  # rescaled: every point moves at ≤ max‖V‖·Dm
            g = interval_growth(field, field_p, ts)
            R_sup = interval_sup(R, g)
            D_sup = np.minimum(interval_sup(D, g), 2.0 * R_sup)
        else:  # plain: every point moves at ≤ max‖V‖·R
            g = interval_growth(field, field_p, ts)
            R_sup = interval_sup(R, g)
            D_sup = np.minimum(2.0 * R_sup, 0.5 * (D[:-1] + D[1:]) + Vn * R_sup * h)
    return R_sup, D_sup


def _w_constants(field, field_p, ts, R, Dm):
    V, A, beta = field_weights(field)
    Vp, Ap, _ = field_weights(field_p)
    nV, ndV = opnorm(V), opnorm(V - Vp)
    rescaled = field.frame == "z"
    with np.errstate(over="ignore", invalid="ignore"):
        if rescaled:
            a, _, dA = rescaled_interval_norms(V, A, Vp, Ap, ts)
        else:
            a, dA = opnorm(A), opnorm(A - Ap)
        kappa = beta * a * R * Dm
        L = nV * (beta * a * Dm**2 / 4.0 + (1.0 + kappa) * np.exp(kappa))
        if rescaled:
            L = L + nV
            delta = ndV * Dm + nV * beta * dA * R * Dm**2 / 4.0
        elif not field.on_sphere:  # plain
            delta = ndV * R + nV * beta * dA * R * Dm**2 / 4.0
        else:  # sphere
            L = L + 2.0 * nV
            delta = ndV + nV * beta * dA * Dm**2 / 4.0
    L = np.where(np.isnan(L), np.inf, L)
    delta = np.where(np.isnan(delta), np.inf, delta)
    return L, delta


def wasserstein_bound(
    field: AbstractField,
    field_p: AbstractField,
    ts: Float[ArrayLike, " T"] | Sequence[float],
    xs: Float[ArrayLike, "T n d"],
    xs_p: Float[ArrayLike, "T n d"],
) -> WassersteinBound:
    """Upper bound on `W₂(μ_t, μ̃_t)` between two computed runs, a posteriori.

    **Arguments:**

    - `field`, `field_p`: the original and the perturbed dynamics (plain, rescaled or
      sphere; same β; single fields, not stacked batches).
    - `ts`: increasing output times `(T,)`.
    - `xs`, `xs_p`: the two runs' tokens `(T, n, d)` (the same n: two empirical
      measures with uniform weights; their initial clouds may differ).

    **Returns:** a `WassersteinBound`; `bound[k] ≥ W₂(μ_{t_k}, μ̃_{t_k})` for the
    measures of the two runs (`inf` once vacuous). The radii and diameters are read off
    the runs and inflated to cover each interval; `W₂(μ₀, μ̃₀)` is computed exactly.
    """
    from scipy.optimize import linear_sum_assignment

    check_field_pair(field, field_p)
    if not field.normalised:
        raise ValueError(
            "no Wasserstein bound for USA dynamics (its weights are not a "
            "softmax); use plain, rescaled or sphere"
        )
    ts = as_grid(ts)
    xs = np.asarray(xs, np.float64)
    xs_p = np.asarray(xs_p, np.float64)
    if xs.ndim != 3 or xs.shape != xs_p.shape or xs.shape[0] != ts.shape[0]:
        raise ValueError(
            f"runs {xs.shape} and {xs_p.shape} must both be (T, n, d) with "
            f"T = {ts.shape[0]} output times"
        )
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(xs_p))):
        raise ValueError("runs contain NaN or inf; no bound can be read off them")
    C = np.sum((xs[0][:, None, :] - xs_p[0][None, :, :]) ** 2, axis=-1)
    _, sigma = linear_sum_assignment(C)
    w0 = float(np.sqrt(np.mean(C[np.arange(C.shape[0]), sigma])))
    R, D = _union_extent(xs, xs_p)
    R_sup, D_sup = _interval_extent(field, field_p, ts, R, D)
    L, delta = _w_constants(field, field_p, ts, R_sup, D_sup)
    dob = gronwall(ts, w0, L, delta)
    coup = bound_a_posteriori(field, field_p, ts, xs, xs_p[:, sigma]).bound
    return WassersteinBound(ts, np.minimum(dob, coup), dob, coup, w0, L, delta)
