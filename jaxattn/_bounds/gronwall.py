"""Grönwall stability bounds for a LoRA-perturbed run (see docs/theory.md, 'Stability
bound'; derivation in `docs/bounds.md`).

Given the unperturbed field (Q, K, V, β) and the perturbed one (Q̃, K̃, Ṽ, β), the bound
`b(t) ≥ e(t) = max_i |x_i(t) − x̃_i(t)|` is built on the output grid `t_0 < … < t_K` from
a Lipschitz constant `L_k` and a field gap `δ_k` valid on each whole interval
`[t_k, t_{k+1}]`, through the exact solution of `b' = L_k b + δ_k`:

    b_{k+1} = b_k e^{L_k h_k} + δ_k h_k φ(L_k h_k),   φ(u) = (e^u − 1)/u.

*A priori*: radii from the initial tokens alone. *A posteriori*: radii read off the
computed trajectories at the grid points and inflated to cover each interval. All in
NumPy float64; `inf` means the bound has become vacuous (it never turns into NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .._base import ArrayLike, Float, ScalarLike
from .._model import FIELDS, AbstractField


class Bound(NamedTuple):
    """`ts (T,)`, `bound (*batch, T)`, and the interval constants `lipschitz`, `gap`
    (`(*batch, T−1)`, for interval `[t_k, t_{k+1}]`)."""

    ts: Float[np.ndarray, " T"]
    bound: Float[np.ndarray, "*batch T"]
    lipschitz: Float[np.ndarray, "*batch T-1"]
    gap: Float[np.ndarray, "*batch T-1"]


def _expm(M: np.ndarray) -> np.ndarray:
    """Matrix exponential (scaling and squaring, degree-18 Taylor), float64; overflows to
    inf rather than raising."""
    norm = np.linalg.norm(M, 1)
    s = max(0, int(np.ceil(np.log2(norm / 0.25))) if norm > 0.25 else 0)
    A = M / (2.0**s)
    E = np.eye(M.shape[0])
    term = np.eye(M.shape[0])
    for k in range(1, 19):
        term = term @ A / k
        E = E + term
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(s):
            E = E @ E
    return E


def opnorm(M: np.ndarray) -> float:
    if not np.all(np.isfinite(M)):
        return np.inf
    return float(np.linalg.norm(M, 2))


def field_weights(field: AbstractField):
    V = np.asarray(field.weight("V"), np.float64)
    A = np.asarray(field.A, np.float64)
    return V, A, float(field.beta)


# What a field's velocity is computed from: a subclass that overrides any of these is
# another model.
_DYNAMICS_METHODS = ("__call__", "_queries_keys", "solve_args", "attend", "project", "weight")


def _check_bounded_model(field) -> None:
    """The bounds are derived for the plain, rescaled, sphere and usa dynamics: a field
    must be one of those classes, or a subclass that changes none of their dynamics (a
    renamed one, one with extra data). A subclass with another velocity (more heads, a
    mask, another normalisation) or a family member would get a certificate for a model
    it is not: refused in one line."""
    base = next((c for c in type(field).__mro__ if c in FIELDS.values()), None)
    changed = (
        []
        if base is None
        else [m for m in _DYNAMICS_METHODS if getattr(type(field), m) is not getattr(base, m)]
    )
    if base is None or changed:
        why = f" (it overrides {', '.join(changed)})" if changed else ""
        raise ValueError(
            f"the stability bounds are derived for the plain, rescaled, sphere and usa "
            f"dynamics only; {type(field).__name__} is not one of them{why}"
        )


def check_field_pair(field, field_p):
    for f in (field, field_p):
        _check_bounded_model(f)
    if type(field) is not type(field_p):
        raise ValueError(
            f"both fields must have the same dynamics, got {field.dynamics} and {field_p.dynamics}"
        )
    if field.d != field_p.d:
        raise ValueError(f"fields have different dimensions {field.d} and {field_p.d}")
    if float(field.beta) != float(field_p.beta):
        raise ValueError("the bound assumes the same β for both fields")
    if field.batch_shape or field_p.batch_shape:
        raise ValueError("bounds take single fields, not stacked LoRA batches")


def gronwall(ts, e0, L, delta):
    """Recursion above; L, delta have shape (*batch, T−1)."""
    h = np.diff(ts)
    out = np.empty(L.shape[:-1] + (ts.shape[0],))
    out[..., 0] = e0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        u = L * h
        growth = np.exp(u)
        phi = np.where(u > 1e-8, np.expm1(u) / np.where(u > 0, u, 1.0), 1.0 + 0.5 * u)
        inc = np.where(delta > 0, delta * h * phi, 0.0)
        b = np.asarray(e0, np.float64) * np.ones(L.shape[:-1])
        for k in range(h.shape[0]):
            b = np.where(b > 0, b * growth[..., k], 0.0) + inc[..., k]
            b = np.where(np.isnan(b), np.inf, b)
            out[..., k + 1] = b
    return out


def _radius(xs):
    return np.max(np.linalg.norm(xs, axis=-1), axis=-1)


def _diameter(xs):
    diff = xs[..., :, None, :] - xs[..., None, :, :]
    return np.max(np.linalg.norm(diff, axis=-1), axis=(-1, -2))


def _constants(field, field_p, ts, R, Dm):
    """Interval constants L_k, δ_k. R (and Dm) are sup-radii (diameters) on each interval,
    shape (*batch, T−1)."""
    V, A, beta = field_weights(field)
    Vp, Ap, _ = field_weights(field_p)
    nV, ndV = opnorm(V), opnorm(V - Vp)
    nA, nAp, ndA = opnorm(A), opnorm(Ap), opnorm(A - Ap)
    # Dispatch on the field's traits (class attributes), not on its name.
    with np.errstate(over="ignore", invalid="ignore"):
        if field.on_sphere and field.normalised:  # SA
            L = nV * (2.0 + 2.0 * beta * nA) * np.ones_like(R)
            delta = (ndV + beta * ndA * nV) * np.ones_like(R)
        elif field.on_sphere:  # USA: unnormalised weights, at most e^{β‖A‖}
            eb, ebp = np.exp(beta * nA), np.exp(beta * nAp)
            L = eb * nV * (2.0 + 2.0 * beta * nA) * np.ones_like(R)
            delta = (ebp * ndV + max(eb, ebp) * beta * ndA * nV) * np.ones_like(R)
        elif field.frame == "z":  # rescaled: logits through A_t = e^{tVᵀ} A e^{tV}
            a_sup, _, da_sup = rescaled_interval_norms(V, A, Vp, Ap, ts)
            L = 2.0 * nV + 2.0 * beta * nV * a_sup * R * Dm
            delta = Dm * (ndV + beta * nV * da_sup * R**2)
        else:  # plain
            L = nV * (1.0 + 2.0 * beta * nA * R**2)
            delta = ndV * R + beta * ndA * nV * R**3
    L = np.where(np.isnan(L), np.inf, L)
    delta = np.where(np.isnan(delta), np.inf, delta)
    return L, delta


def _rescaled_logit_norms(V, A, Vp, Ap, ts):
    """‖A_t‖, ‖Ã_t‖, ‖A_t − Ã_t‖ with `A_t = e^{tVᵀ} A e^{tV}` at each grid time."""
    a, ap, da = (np.empty(ts.shape[0]) for _ in range(3))
    with np.errstate(over="ignore", invalid="ignore"):
        for k, t in enumerate(ts):
            E, Ep = _expm(t * V), _expm(t * Vp)
            At, Apt = E.T @ A @ E, Ep.T @ Ap @ Ep
            a[k], ap[k], da[k] = opnorm(At), opnorm(Apt), opnorm(At - Apt)
    return a, ap, da


def rescaled_interval_norms(V, A, Vp, Ap, ts):
    """Sups of ‖A_s‖, ‖Ã_s‖ and ‖A_s − Ã_s‖ over each interval `[t_k, t_{k+1}]`."""
    nV, nVp, ndV = opnorm(V), opnorm(Vp), opnorm(V - Vp)
    h = np.diff(ts)
    a, ap, da = _rescaled_logit_norms(V, A, Vp, Ap, ts)
    with np.errstate(over="ignore", invalid="ignore"):
        grow_a = np.exp(2.0 * nV * h)
        a_sup = a[:-1] * grow_a
        ap_sup = ap[:-1] * np.exp(2.0 * nVp * h)
        # ‖A_s − Ã_s‖ on the interval: Grönwall on f' = Vᵀf + fV + (V−Ṽ)ᵀÃ_s + Ã_s(V−Ṽ).
        da_sup = grow_a * (da[:-1] + 2.0 * h * ndV * ap_sup)
    return a_sup, ap_sup, da_sup


def interval_growth(field, field_p, ts):
    """Factor by which the radius (and diameter) can grow over each interval."""
    V, _, _ = field_weights(field)
    Vp, _, _ = field_weights(field_p)
    v = max(opnorm(V), opnorm(Vp))
    h = np.diff(ts)
    if field.on_sphere:  # R = 1
        return np.ones_like(h)
    return np.exp(_radius_rate(field) * v * h)


def _radius_rate(field) -> float:
    """`c` in the radius growth `R' ≤ c ‖V‖ R` off the sphere: 1 for `x' = Σ P V x`
    (`|x_i'| ≤ ‖V‖ max_j |x_j|`), 2 in the rescaled frame (`|z_i'| ≤ ‖V‖ max_j |z_j − z_i|`)."""
    return 2.0 if field.frame == "z" else 1.0


def interval_sup(r, g):
    """Sup over `[t_k, t_{k+1}]` of a quantity that grows or shrinks at most by the factor
    `g_k = e^{c h_k}` over the interval: it lies below both `r_k e^{c(t − t_k)}` and
    `r_{k+1} e^{c(t_{k+1} − t)}`, whose minimum peaks at `sqrt(r_k r_{k+1} g_k)`."""
    return np.sqrt(r[..., :-1] * r[..., 1:] * g)


def _prior_radius(field, field_p, ts, x0, x0_p):
    """A-priori sup-radius on each interval (monotone envelope, so its right end)."""
    V, _, _ = field_weights(field)
    Vp, _, _ = field_weights(field_p)
    v = max(opnorm(V), opnorm(Vp))
    R0 = np.maximum(_radius(x0), _radius(x0_p))
    if field.on_sphere:
        return np.ones_like(R0)[..., None] * np.ones(ts.shape[0] - 1)
    with np.errstate(over="ignore"):
        return R0[..., None] * np.exp(_radius_rate(field) * v * ts[1:])


def _first_growth(field, field_p, ts):
    """Growth factor of the a-priori envelope over the first interval (R[0] is its sup)."""
    return interval_growth(field, field_p, ts)[0]


def as_grid(ts):
    ts = np.asarray(ts, np.float64).ravel()
    if ts.size < 2 or np.any(np.diff(ts) <= 0):
        raise ValueError("ts must be an increasing grid of at least two times")
    return ts


def bound_a_posteriori(
    field: AbstractField,
    field_p: AbstractField,
    ts: Float[ArrayLike, " T"] | Sequence[float],
    xs: Float[ArrayLike, "*batch T n d"],
    xs_p: Float[ArrayLike, "*batch T n d"],
) -> Bound:
    """Bound on `max_i |x_i(t) − x̃_i(t)|` using radii read off the computed trajectories
    `xs`, `xs_p` of shape `(*batch, T, n, d)` at the times `ts` (T,)."""
    check_field_pair(field, field_p)
    ts = as_grid(ts)
    xs = np.asarray(xs, np.float64)
    xs_p = np.asarray(xs_p, np.float64)
    if xs.shape != xs_p.shape or xs.shape[-3] != ts.shape[0]:
        raise ValueError(
            f"trajectories {xs.shape} and {xs_p.shape} do not match ts ({ts.shape[0]} times)"
        )
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(xs_p))):
        raise ValueError("trajectories contain NaN or inf; no bound can be read off them")
    g = interval_growth(field, field_p, ts)
    R = interval_sup(np.maximum(_radius(xs), _radius(xs_p)), g)
    Dm = interval_sup(np.maximum(_diameter(xs), _diameter(xs_p)), g)
    # The a-priori envelope is valid too: never use a larger radius than it gives.
    R = np.minimum(R, _prior_radius(field, field_p, ts, xs[..., 0, :, :], xs_p[..., 0, :, :]))
    Dm = np.minimum(Dm, 2.0 * R)
    e0 = np.max(np.linalg.norm(xs[..., 0, :, :] - xs_p[..., 0, :, :], axis=-1), axis=-1)
    L, delta = _constants(field, field_p, ts, R, Dm)
    return Bound(ts, gronwall(ts, e0, L, delta), L, delta)


def bound_a_priori(
    field: AbstractField,
    field_p: AbstractField,
    ts: Float[ArrayLike, " T"] | Sequence[float],
    x0: Float[ArrayLike, "*batch n d"],
    x0_p: Float[ArrayLike, "*batch n d"] | None = None,
) -> Bound:
    """Bound using only the initial tokens: `R(t) ≤ R(0) e^{max(‖V‖,‖Ṽ‖) t}` (plain),
    `ρ(t) ≤ ρ(0) e^{2 max(‖V‖,‖Ṽ‖) t}` (rescaled), `R = 1` (sphere)."""
    check_field_pair(field, field_p)
    ts = as_grid(ts)
    x0 = np.asarray(x0, np.float64)
    x0_p = x0 if x0_p is None else np.asarray(x0_p, np.float64)
    if x0.shape != x0_p.shape:
        raise ValueError(f"x0 {x0.shape} and x0_p {x0_p.shape} differ in shape")
    R = _prior_radius(field, field_p, ts, x0, x0_p)
    # The diameter grows at the same rate as the radius (docs/bounds.md).
    growth = R / np.maximum(R[..., :1], 1e-300)
    Dm0 = np.maximum(_diameter(x0), _diameter(x0_p))[..., None]
    Dm = np.minimum(2.0 * R, Dm0 * np.maximum(growth, 1.0) * _first_growth(field, field_p, ts))
    if field.on_sphere:  # no growth law for the diameter; unused there
        Dm = 2.0 * R
    e0 = np.max(np.linalg.norm(x0 - x0_p, axis=-1), axis=-1)
    L, delta = _constants(field, field_p, ts, R, Dm)
    return Bound(ts, gronwall(ts, e0, L, delta), L, delta)


def certified_horizon(
    ts: Float[ArrayLike, " T"] | Sequence[float],
    bound: Float[ArrayLike, "*batch T"],
    eta: ScalarLike,
) -> Float[np.ndarray, "*batch"]:
    """Largest grid time `t_k` with `bound(s) ≤ eta` at every grid time `s ≤ t_k`
    (`nan` if already `bound(t_0) > eta`). Works over leading batch axes of `bound`."""
    ts = np.asarray(ts, np.float64)
    bound = np.asarray(bound, np.float64)
    ok = np.cumprod(bound <= eta, axis=-1).astype(bool)
    count = ok.sum(axis=-1)
    return np.where(count > 0, ts[np.maximum(count - 1, 0)], np.nan)
