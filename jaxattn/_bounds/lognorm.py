"""The one-sided (logarithmic-norm) stability bound (derivation: `docs/bounds.md`, 'The
one-sided bound').

For the divergence `e_i(t) = x̃_i(t) − x_i(t)` of a run of the perturbed field `F̃` from
a run of `F`, `e' = J̄ e + g` with `J̄ = ∫₀¹ J(x + s e) ds` (J the Jacobian of F) and the
field gap `g = F̃(x̃) − F(x̃)`. Per token,

    D⁺|e_i| ≤ μ₂(J̄_ii) |e_i| + Σ_{k≠i} ‖J̄_ik‖ |e_k| + |g_i|,

a linear comparison system with a Metzler matrix, so (Kamke–Müller) `|e_i| ≤ b_i` with
`b' = M b + G`, `b(0) = |e(0)|`, whenever `M` and `G` bound those coefficients. Both
runs are computed here (RK4, float64, with an error estimate), and `M`, `G` are bounded
on balls that cover the segment between the two exact states over each time window:
the Jacobian blocks in closed form at each ball's centre plus a bound on how much they
can move inside the ball. Everything is computed in float64 (`jax.enable_x64` for the
call), whatever the fields' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import expm

from .._base import ArrayLike, Float
from .gronwall import Bound, as_grid, check_field_pair, field_weights

#: the dynamics the one-sided bound is derived for (USA's unnormalised weights are not)
ONE_SIDED_DYNAMICS = ("plain", "rescaled", "sphere")
#: safety factor on the Richardson estimate of each run's solver error
SAFETY = 10.0
#: the automatic step: the logits move by about this much over one step
WINDOW_LOGIT_MOTION = 0.025
#: at most this many solver steps (and windows) per interval of the output grid
MAX_SUBSTEPS = 64
#: at most this many solver steps per call: on this CPU a call of 8000 steps (n = 50)
#: hung inside XLA, one of 4000 did not (not understood yet)
MAX_STEPS = 4096


#: squarings of `BᵀB` in the spectral-norm bound for blocks of size d ≥ 3
SQUARINGS = 6


def _norm2(B):
    """Upper bound on the spectral norm of the trailing d×d blocks: exact for d ≤ 2
    (closed form); for d ≥ 3, `‖(BᵀB)^(2^k)‖_F^(1/2^(k+1)) ≥ σ_max`, which exceeds it by at
    most a factor `d^(1/2^(k+1))` (1.011 for d = 4 with k = `SQUARINGS` = 6). Batched
    eigensolvers are slow for millions of tiny blocks; a few products are not."""
    if B.shape[-1] == 1:
        return jnp.abs(B[..., 0, 0])
    if B.shape[-1] == 2:  # closed form: largest singular value of a 2×2 matrix
        a, b, c, d = B[..., 0, 0], B[..., 0, 1], B[..., 1, 0], B[..., 1, 1]
        s = a * a + b * b + c * c + d * d
        det = a * d - b * c
        return jnp.sqrt(0.5 * (s + jnp.sqrt(jnp.maximum(s * s - 4.0 * det * det, 0.0))))
    M = jnp.swapaxes(B, -1, -2) @ B
    log_lam = jnp.zeros(B.shape[:-2], B.dtype)
    for j in range(SQUARINGS + 1):
        f = jnp.sqrt(jnp.sum(M * M, axis=(-2, -1)))  # ‖M_j‖_F
        with jax.numpy_dtype_promotion("standard"):
            log_lam = log_lam + 2.0**-j * jnp.log(f)
        N = M / jnp.where(f > 0, f, 1.0)[..., None, None]
        M = N @ N
    return jnp.exp(0.5 * log_lam)


def _lognorm2(B):
    """Logarithmic norm `μ₂(B) = λ_max((B + Bᵀ)/2)` of the trailing d×d blocks."""
    S = 0.5 * (B + jnp.swapaxes(B, -1, -2))
    if B.shape[-1] == 1:
        return S[..., 0, 0]
    if B.shape[-1] == 2:
        a, b, d = S[..., 0, 0], S[..., 0, 1], S[..., 1, 1]
        return 0.5 * (a + d) + jnp.sqrt(0.25 * (a - d) ** 2 + b * b)
    return jnp.linalg.eigvalsh(S)[..., -1]


def _logit_matrix(kind, V, A, t):
    """`A_t = e^{tVᵀ} A e^{tV}` in the rescaled frame, `A` otherwise."""
    if kind != "rescaled":
        return A
    E = expm(t * V)
    return E.T @ A @ E


def _velocity(kind, V, At, beta, z):
    """The field at tokens `z` (n, d), given the logit matrix `A_t` of that time."""
    P = jax.nn.softmax(beta * (z @ At) @ z.T, axis=-1)
    y = (P @ z) @ V.T
    if kind == "rescaled":
        return y - z @ V.T
    if kind == "sphere":
        return y - jnp.sum(z * y, axis=-1, keepdims=True) * z
    return y


def _rk4_step(kind, V, beta, z, h, A0, Am, A1):
    """One classical RK4 step of size h; `A0`, `Am`, `A1`: the logit matrices at its
    start, middle and end."""
    k1 = _velocity(kind, V, A0, beta, z)
    k2 = _velocity(kind, V, Am, beta, z + h / 2 * k1)
    k3 = _velocity(kind, V, Am, beta, z + h / 2 * k2)
    k4 = _velocity(kind, V, A1, beta, z + h * k3)
    return z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _runs(kind, Vs, Aq, beta, tf, z0):
    """Both runs (stacked on axis 0: fields `Vs` (2, d, d), initial tokens `z0` (2, n, d))
    on the fine grid `tf`, with one RK4 step per interval and, beside it, two half steps.
    `Aq` (2, 4(T−1)+1, d, d): logit matrices on the grid of quarter steps.
    Returns the states of both (2, T, n, d)."""
    step = jax.vmap(_rk4_step, in_axes=(None, 0, None, 0, None, 0, 0, 0))

    def interval(carry, k):
        z1, z2 = carry
        h = tf[k + 1] - tf[k]
        A = [jax.lax.dynamic_index_in_dim(Aq, 4 * k + j, axis=1, keepdims=False) for j in range(5)]
        z1 = step(kind, Vs, beta, z1, h, A[0], A[2], A[4])
        z2 = step(kind, Vs, beta, z2, h / 2, A[0], A[1], A[2])
        z2 = step(kind, Vs, beta, z2, h / 2, A[2], A[3], A[4])
        return (z1, z2), (z1, z2)

    _, (z1s, z2s) = jax.lax.scan(interval, (z0, z0), jnp.arange(tf.shape[0] - 1))
    z1s = jnp.concatenate([z0[None], z1s])
    z2s = jnp.concatenate([z0[None], z2s])
    return jnp.swapaxes(z1s, 0, 1), jnp.swapaxes(z2s, 0, 1)


def _attention_ball(kind, At, beta, z, r, tau, vnorm):
    """The attention at the centre `z` and how far it moves on the ball
    `|z'_j − z_j| ≤ r_j`, `|t' − t| ≤ τ`: logits by at most `w_ij`, so weights by a factor
    `e^{±2 w_i}` (`|P'_ij − P_ij| ≤ γ_i P_ij`) and means by `δm_i`.

    Returns `(‖A_t‖, ‖A_t' − A_t‖ on the window, P, m, u, |u|, |z|, γ, δm)`."""
    nA = _norm2(At)
    if kind == "rescaled":
        dA = nA * jnp.expm1(2.0 * vnorm * tau)  # ‖A_t' − A_t‖ on the window
    else:
        dA = jnp.zeros_like(nA)
    P = jax.nn.softmax(beta * (z @ At) @ z.T, axis=-1)
    m = P @ z
    u = z[None, :, :] - m[:, None, :]  # u[i, k] = z_k − m_i
    nz, nu = jnp.linalg.norm(z, axis=-1), jnp.linalg.norm(u, axis=-1)
    R = nz + r
    w = beta * (
        nA * (r[:, None] * R[None, :] + nz[:, None] * r[None, :]) + dA * R[:, None] * R[None, :]
    )
    gam = jnp.expm1(2.0 * jnp.max(w, axis=-1))
    dm = (1.0 + gam) * (P @ r) + gam * jnp.einsum("ij,ij->i", P, nu)  # |m'_i − m_i|
    return nA, dA, P, m, u, nu, nz, gam, dm


def _gap_ball(kind, V, At, Vp, Atp, beta, y, r, tau, vnorm):
    """A bound on the field gap `|F̃_i − F_i|` on the whole ball around `y` that is
    proportional to the perturbation (docs/bounds.md, 'The gap'):
    `F̃_i − F_i = ΔV (m̃_i − c z_i) + V (m̃_i − m_i)` (c = 1 rescaled, 0 plain; projected
    on the sphere), with `‖P̃'_i − P'_i‖₁` at most half the range of the logit change."""
    _, dA, _, _, _, nu, nz, _, _ = _attention_ball(kind, At, beta, y, r, tau, vnorm)
    _, _, _, mp, _, _, _, _, dmp = _attention_ball(kind, Atp, beta, y, r, tau, vnorm)
    nV, ndV = _norm2(V), _norm2(Vp - V)
    dlog = _norm2(Atp - At)
    if kind == "rescaled":  # ‖Ã_t' − A_t'‖ on the window (Grönwall on its derivative)
        grow = jnp.exp(2.0 * vnorm * tau)
        dlog = grow * (dlog + 2.0 * tau * ndV * (_norm2(At) + dA))
    diam = jnp.max(jnp.linalg.norm(y[:, None] - y[None], axis=-1)) + 2.0 * jnp.max(r)
    half_range = 0.5 * beta * dlog * (nz + r) * diam  # ≥ ‖P̃'_i − P'_i‖₁
    far = jnp.max(nu, axis=-1) + jnp.max(r)  # ≥ max_j |z'_j − m_i|
    c = 1.0 if kind == "rescaled" else 0.0
    shift = jnp.linalg.norm(mp - c * y, axis=-1) + dmp + c * r  # ≥ |m̃'_i − c z'_i|
    crude = ndV * shift + nV * half_range * far
    if kind == "sphere":
        crude = crude * (jnp.maximum(1.0, jnp.abs(nz**2 - 1.0)) + 2.0 * nz * r + r**2)
    return crude


def _blocks(kind, V, At, beta, z, r, tau, vnorm):
    """Jacobian blocks of the field at the centre `z` (n, d) and a time `t` whose logit
    matrix is `At`, and bounds on how far they move on the ball `|z'_j − z_j| ≤ r_j`,
    `|t' − t| ≤ τ` (`vnorm` ≥ ‖V‖ of both fields: the rate at which `A_t` can change).

    Returns `(norm, var, vy)`: `norm[i, k]` is `‖J_ik‖₂` off the diagonal and `μ₂(J_ii)`
    on it; `var[i, k] ≥ sup ‖J'_ik − J_ik‖₂` over the ball; `vy[i]` bounds `|∂_t F_i|`
    over the time window at the centre (zero outside the rescaled frame).
    Derivation: docs/bounds.md, 'The one-sided bound'."""
    n, d = z.shape
    eye = jnp.eye(d, dtype=z.dtype)
    nV = _norm2(V)
    ball = _attention_ball(kind, At, beta, z, r, tau, vnorm)
    nA, dA, P, m, u, nu, nz, gam, dm = ball
    alpha = nA + dA  # ‖A_t'‖ on the window
    a = z @ At  # row i: (A_tᵀ z_i)ᵀ
    na = jnp.linalg.norm(a, axis=-1)
    C = jnp.einsum("ij,ija,ijb->iab", P, u, u)
    s2 = jnp.einsum("ij,ij->i", P, nu**2)  # tr C_i ≥ ‖C_i‖
    # V Y_ik: the derivative of V m_i with respect to z_k
    VY = P[:, :, None, None] * (eye[None, None] + beta * u[:, :, :, None] * a[:, None, None, :])
    idx = jnp.arange(n)
    VY = VY.at[idx, idx].add(beta * jnp.einsum("iab,cb->iac", C, At))
    VY = jnp.einsum("ab,ikbc->ikac", V, VY)
    nVY = _norm2(VY)

    # -- the ball (weights and means: _attention_ball)
    da = alpha * r + dA * nz  # |a'_i − a_i|
    X = (r[None, :] + dm[:, None]) * (na + da)[:, None] + nu * da[:, None]
    dVY = gam[:, None] * nVY + (1.0 + gam[:, None]) * beta * nV * P * X
    dC = (
        gam * s2
        + (1.0 + gam) * jnp.einsum("ij,ij->i", P, r[None, :] * (2.0 * nu + r[None, :]))
        + dm**2
    )
    Pii, nuii = P[idx, idx], nu[idx, idx]
    diag = nV * (
        gam * Pii
        + beta * (dC * alpha + s2 * dA)
        + beta * (gam * Pii * (nuii + r + dm) * (na + da) + Pii * X[idx, idx])
    )
    dVY = dVY.at[idx, idx].set(diag)

    if kind == "sphere":
        y = m @ V.T
        Pi = eye[None] - z[:, :, None] * z[:, None, :]
        J = jnp.einsum("iab,ikbc->ikac", Pi, VY)
        D = z[:, :, None] * y[:, None, :]
        D = D + jnp.sum(z * y, axis=-1)[:, None, None] * eye[None]
        J = J.at[idx, idx].add(-D)
        nPi = jnp.maximum(1.0, jnp.abs(nz**2 - 1.0))
        dPi = 2.0 * nz * r + r**2
        dy = nV * dm
        dD = 2.0 * (r * (jnp.linalg.norm(y, axis=-1) + dy) + nz * dy)
        var = dPi[:, None] * (nVY + dVY) + nPi[:, None] * dVY
        var = var.at[idx, idx].add(dD)
    else:
        J = VY
        if kind == "rescaled":
            J = J.at[idx, idx].add(-jnp.broadcast_to(V, (n, d, d)))
        var = dVY
    norm = _norm2(J)
    norm = norm.at[idx, idx].set(_lognorm2(J[idx, idx]))
    if kind == "rescaled":
        w0 = beta * dA * nz[:, None] * nz[None, :]
        g0 = jnp.expm1(2.0 * jnp.max(w0, axis=-1))
        vy = nV * beta * 2.0 * vnorm * alpha * nz * (1.0 + g0) * s2
    else:
        vy = jnp.zeros((n,), z.dtype)
    return norm, var, vy


def _check_dynamics(field) -> str:
    if field.dynamics not in ONE_SIDED_DYNAMICS:
        raise ValueError(
            f"the one-sided bound is derived for the {', '.join(ONE_SIDED_DYNAMICS)} "
            f"dynamics; for {field.dynamics} use bound_a_posteriori"
        )
    return field.dynamics


def _window_speed(kind, nV, z, err, tau):
    """Bound on every token's speed on the window `|t' − t| ≤ τ` around a computed state
    `z` whose exact counterpart is within `err` (per token) of it."""
    if kind == "sphere":  # |Π_x y| ≤ |y| ≤ ‖V‖ on the sphere
        return nV * jnp.ones(z.shape[0], z.dtype)
    if kind == "rescaled":  # |z_i'| ≤ ‖V‖ max_j |z_j − z_i|, the diameter grows at 2‖V‖
        diam = jnp.max(jnp.linalg.norm(z[:, None] - z[None], axis=-1)) + 2.0 * jnp.max(err)
        return nV * diam * jnp.exp(2.0 * nV * tau) * jnp.ones(z.shape[0], z.dtype)
    radius = jnp.max(jnp.linalg.norm(z, axis=-1)) + jnp.max(err)  # |x_i'| ≤ ‖V‖ max |x_j|
    return nV * radius * jnp.exp(nV * tau) * jnp.ones(z.shape[0], z.dtype)


def _coefficients(kind, W, Wp, beta, vnorm, At, Atp, tau, x, y, ex, ey, pieces):
    """Upper bounds `(M, G)` of the comparison system's coefficients on the window
    `|t' − t| ≤ τ` around the computed states `x`, `y` (per-token errors `ex`, `ey`) at a
    time whose logit matrices are `At`, `Atp`."""
    V, Vp = W[0], Wp[0]
    nV, nVp = _norm2(V), _norm2(Vp)
    rx = ex + tau * _window_speed(kind, nV, x, ex, tau)
    ry = ey + tau * _window_speed(kind, nVp, y, ey, tau)
    e = jnp.linalg.norm(y - x, axis=-1)
    s = (jnp.arange(pieces, dtype=x.dtype) + 0.5) / pieces
    r = jnp.maximum(rx, ry) + e / (2.0 * pieces)
    # one vmapped evaluation: the segment's pieces (field F), then the perturbed state's
    # ball for F and for F̃ (the gap's movement)
    centres = jnp.concatenate([x[None] + s[:, None, None] * (y - x)[None], y[None], y[None]])
    radii = jnp.concatenate([jnp.broadcast_to(r, (pieces, r.shape[0])), ry[None], ry[None]])
    Vs = jnp.stack([V] * (pieces + 1) + [Vp])
    As = jnp.stack([At] * (pieces + 1) + [Atp])
    norm, var, vy = jax.vmap(lambda Vk, Ak, c, rk: _blocks(kind, Vk, Ak, beta, c, rk, tau, vnorm))(
        Vs, As, centres, radii
    )
    M = jnp.mean(norm[:pieces] + var[:pieces], axis=0)
    # the gap at the perturbed state, and how far it can move on its ball
    g = jnp.linalg.norm(
        _velocity(kind, Vp, Atp, beta, y) - _velocity(kind, V, At, beta, y), axis=-1
    )
    Jd = _jacobian_gap(kind, V, At, Vp, Atp, beta, y)
    G = g + (Jd + var[pieces] + var[pieces + 1]) @ ry + tau * (vy[pieces] + vy[pieces + 1])
    # both are bounds on the gap over the ball: the first is tight for large
    # perturbations, the second proportional to the perturbation however small
    G = jnp.minimum(G, _gap_ball(kind, V, At, Vp, Atp, beta, y, ry, tau, vnorm))
    return M, G


def _jacobian_gap(kind, V, At, Vp, Atp, beta, y):
    """`‖J̃_ik − J_ik‖₂` at `y` (blocks by forward-mode differentiation)."""

    def diff(z):
        return _velocity(kind, Vp, Atp, beta, z) - _velocity(kind, V, At, beta, z)

    Jd = jax.jacfwd(diff)(y)  # (n, d, n, d)
    return _norm2(jnp.transpose(Jd, (0, 2, 1, 3)))


def _propagate(M, G, b0, h):
    """`b_{k+1} = e^{M_k h_k} b_k + ∫₀^{h_k} e^{M_k s} ds G_k` (exact for constant
    coefficients; the exponential of a Metzler matrix is non-negative)."""
    n = b0.shape[0]

    def step(b, inp):
        Mk, Gk, hk = inp
        # a vacuous bound stays vacuous; and never hand expm a non-finite or huge matrix
        # (its number of squarings comes from the norm: inf would never finish)
        live = jnp.all(jnp.isfinite(b)) & jnp.all(jnp.isfinite(Mk)) & jnp.all(jnp.isfinite(Gk))
        live = live & (hk * jnp.max(jnp.sum(jnp.abs(Mk), axis=-1)) < 700.0)
        Z = jnp.zeros((n + 1, n + 1), b.dtype)
        Z = Z.at[:n, :n].set(jnp.where(live, Mk, 0.0)).at[:n, n].set(jnp.where(live, Gk, 0.0))
        nxt = (expm(hk * Z) @ jnp.append(jnp.where(live, b, 0.0), 1.0))[:n]
        b = jnp.where(live & jnp.isfinite(nxt), jnp.maximum(nxt, 0.0), jnp.inf)
        return b, b

    _, bs = jax.lax.scan(step, b0, (M, G, h))
    return jnp.concatenate([b0[None], bs])


def bound_one_sided(
    field,
    field_p,
    ts: Float[ArrayLike, " T"] | Sequence[float],
    x0: Float[ArrayLike, "*batch n d"],
    x0_p: Float[ArrayLike, "*batch n d"] | None = None,
    *,
    substeps: int | None = None,
    pieces: int = 8,
) -> Bound:
    """One-sided (logarithmic-norm) bound on `e(t) = max_i |x_i(t) − x̃_i(t)|` for a run of
    `field` from `x0` and a run of `field_p` from `x0_p` (default `x0`), on the grid `ts`;
    leading batch axes of `x0` are initial conditions, bounded in one vmapped call.

    Both runs are solved here in float64 with RK4 (`substeps` steps per interval of
    `ts`), and again with twice as many steps: each run's error is taken as `SAFETY` (10)
    times its Richardson estimate. Each step is also a window on which the coefficients
    are bounded, so finer steps give a tighter bound: by default (`substeps=None`) the
    step is chosen so that the initial tokens' logits move by about 0.025 over it (a
    power of two, at most `MAX_SUBSTEPS` steps per interval; one choice for a whole
    batch). The Jacobian of `field` is bounded on `pieces` balls along the segment
    between the two runs, the field gap on a ball around the perturbed run
    (docs/bounds.md). Plain, rescaled and sphere dynamics; single fields.

    Returns a `Bound`: `bound` (*batch, T) at `ts`, and per interval of `ts` the largest rate
    (`lipschitz`: the comparison matrix's largest row sum, a logarithmic norm for the
    max-norm) and the largest gap bound (`gap`).
    """
    check_field_pair(field, field_p)
    kind = _check_dynamics(field)
    ts_np = as_grid(ts)
    if (substeps is not None and int(substeps) < 1) or int(pieces) < 1:
        raise ValueError(f"substeps and pieces must be ≥ 1, got {substeps} and {pieces}")
    x0 = np.asarray(x0, np.float64)
    x0_p = x0 if x0_p is None else np.asarray(x0_p, np.float64)
    if x0.ndim < 2 or x0.shape != x0_p.shape or x0.shape[-1] != field.d:
        raise ValueError(
            f"x0 and x0_p must be (..., n, {field.d}) token arrays of one shape, got "
            f"{x0.shape} and {x0_p.shape}"
        )
    if not (np.all(np.isfinite(x0)) and np.all(np.isfinite(x0_p))):
        raise ValueError("x0 and x0_p must be finite")
    V, A, beta = field_weights(field)
    Vp, Ap, _ = field_weights(field_p)
    batch, (n, d) = x0.shape[:-2], x0.shape[-2:]
    flat, flat_p = x0.reshape(-1, n, d), x0_p.reshape(-1, n, d)
    if substeps is None:
        m = max(
            auto_substeps(kind, V, A, beta, ts_np, np.concatenate([a, b]))
            for a, b in zip(flat, flat_p)
        )
    else:
        m = int(substeps)
    steps = (ts_np.shape[0] - 1) * m
    if steps > MAX_STEPS:
        raise ValueError(
            f"the one-sided bound takes at most {MAX_STEPS} solver steps per call, got "
            f"{ts_np.shape[0] - 1} intervals × {m} substeps; bound a shorter grid (it is a "
            "short-time bound) or pass fewer substeps"
        )
    with jax.enable_x64(True):
        out = _bound(kind, V, A, Vp, Ap, beta, ts_np, flat, flat_p, m, int(pieces))
    b, rate, gap = (np.asarray(o, np.float64).reshape(*batch, -1) for o in out)
    return Bound(ts_np, b, rate, gap)


def auto_substeps(kind, V, A, beta, ts, x0) -> int:
    """Steps per interval of `ts` such that, at the initial tokens `x0` (n, d), the logits
    move by at most about `WINDOW_LOGIT_MOTION` over one step (the window's share of the
    ball, `w` in docs/bounds.md): the next power of two, capped at `MAX_SUBSTEPS`."""
    nV, nA = float(np.linalg.norm(V, 2)), float(np.linalg.norm(A, 2))
    radius = float(np.max(np.linalg.norm(x0, axis=-1)))
    if kind == "sphere":
        speed = nV
    elif kind == "rescaled":
        speed = nV * float(np.max(np.linalg.norm(x0[:, None] - x0[None], axis=-1)))
    else:
        speed = nV * radius
    rate = beta * nA * radius * speed  # the logits move at about this rate
    if rate <= 0.0:
        return 1
    h = WINDOW_LOGIT_MOTION / rate
    m = max(1.0, float(np.max(np.diff(ts))) / h)
    return int(min(MAX_SUBSTEPS, 2 ** int(np.ceil(np.log2(m)))))  # one compile per power


def _fine_grid(ts, m):
    h = np.diff(ts) / m
    fine = ts[:-1, None] + h[:, None] * np.arange(m)[None, :]
    return np.append(fine.ravel(), ts[-1])


def _bound(kind, V, A, Vp, Ap, beta, ts, x0, x0_p, m, pieces):
    W = (jnp.asarray(V), jnp.asarray(A))
    Wp = (jnp.asarray(Vp), jnp.asarray(Ap))
    vnorm = max(float(np.linalg.norm(V, 2)), float(np.linalg.norm(Vp, 2)))
    tf = jnp.asarray(_fine_grid(ts, m))
    x0j, x0pj = jnp.asarray(x0), jnp.asarray(x0_p)
    return _bound_jit(kind, W, Wp, beta, vnorm, tf, x0j, x0pj, m, pieces)


@jax.jit(static_argnums=(0, 8, 9))
def _bound_jit(kind, W, Wp, beta, vnorm, tf, x0, x0_p, m, pieces):
    """Batched over the leading axis of `x0`, `x0_p` (one initial condition per row)."""
    # the logit matrices of both fields on the grid of quarter steps (one vmapped expm)
    tq = jnp.concatenate(
        [(tf[:-1, None] + jnp.diff(tf)[:, None] * jnp.arange(4.0)[None] / 4).ravel(), tf[-1:]]
    )
    Aq = jax.vmap(
        lambda t: jnp.stack(
            [_logit_matrix(kind, W[0], W[1], t), _logit_matrix(kind, Wp[0], Wp[1], t)]
        ),
        out_axes=1,
    )(tq)
    one = lambda a, b: _bound_one(kind, W, Wp, beta, vnorm, tf, Aq, a, b, m, pieces)
    return jax.vmap(one)(x0, x0_p)


def _bound_one(kind, W, Wp, beta, vnorm, tf, Aq, x0, x0_p, m, pieces):
    Vs = jnp.stack([W[0], Wp[0]])
    (xs, ys), (xs2, ys2) = (
        jnp.unstack(r) for r in _runs(kind, Vs, Aq, beta, tf, jnp.stack([x0, x0_p]))
    )
    scale = 1e-13 * (1.0 + jnp.max(jnp.abs(xs)) + jnp.max(jnp.abs(ys)))
    # the runs at h/2 are the centres; RK4's error there is 1/15 of their difference from
    # the runs at h (Richardson), times the safety factor
    ex = SAFETY / 15.0 * jnp.linalg.norm(xs - xs2, axis=-1) + scale
    ey = SAFETY / 15.0 * jnp.linalg.norm(ys - ys2, axis=-1) + scale
    xs, ys = xs2, ys2
    h = jnp.diff(tf)
    tau = jnp.concatenate([h[:1], jnp.maximum(h[1:], h[:-1]), h[-1:]]) / 2.0
    A_grid = Aq[:, ::4]

    def coeff(inp):
        At, Atp, tk, x, y, a, b = inp
        return _coefficients(kind, W, Wp, beta, vnorm, At, Atp, tk, x, y, a, b, pieces)

    M, G = jax.lax.map(coeff, (A_grid[0], A_grid[1], tau, xs, ys, ex, ey))
    Mi = jnp.maximum(M[:-1], M[1:])
    Gi = jnp.maximum(G[:-1], G[1:])
    b0 = jnp.linalg.norm(x0_p - x0, axis=-1)
    bs = _propagate(Mi, Gi, b0, h)
    bmax = jnp.max(bs, axis=-1)[::m]
    rate = jnp.max(jnp.sum(Mi, axis=-1), axis=-1).reshape(-1, m).max(-1)
    gap = jnp.max(Gi, axis=-1).reshape(-1, m).max(-1)
    return bmax, rate, gap
