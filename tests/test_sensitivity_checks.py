"""`jaxattn.experiments._sensitivity_checks` (the analysis of `worst-case-lora`) against references
computed independently of the library.

The reference system: plain dynamics with β = 0. The attention is then exactly uniform,
`P_ij = 1/n`, so every token moves with the mean: `x_i' = V x̄`, `x̄' = V x̄`, and

    x_i(t) = x_i(0) + (e^{tV} − I) m,   m = x̄(0).

Under `V ← V + εΔ` the response of every token is `δx_i(t) = L(tV, tΔ) m`, with `L` the
Fréchet derivative of the matrix exponential (SciPy's `expm_frechet`, float64): the
Jacobian `J_t : Δ ↦ δx(t)` is known in closed form, and the runs with `V + εΔ` too
(`expm`). For V = 0 it is simply `δx_i(t) = t Δ m`.

Tolerances. RK4 with dt = 0.02 applies the degree-4 Taylor polynomial of `e^{hV}` per
step: the global error is ~ t·(h|V|)⁴|V|/120 ≈ 1e-9 relative for |V| ≲ 1.5 (measured:
1.6e-12 on the trajectory), so the closed-form comparisons use rtol 1e-7. For V = 0 the
tangent is integrated exactly (its right side is constant) and only rounding remains.
LOBPCG stops at a residual of ~10·n·eps relative: σ² to ~1e-12, σ to better than 1e-8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm, expm_frechet

import jaxattn as ja
import jaxattn.experiments._sensitivity_checks as C

N, D = 4, 3
TIMES = (0.5, 1.0)
SOLVE = dict(solver="rk4", dt=0.02)


def _system(V):
    field = ja.make_field("plain", jnp.eye(D), jnp.eye(D), jnp.asarray(V), beta=0.0)
    x0s = [jax.random.normal(jax.random.key(s), (N, D), jnp.float64) for s in (31, 32)]
    return field, x0s


def _generic_V():
    return 0.5 * np.asarray(jax.random.normal(jax.random.key(3), (D, D), jnp.float64))


def _closed_form_jacobian(V, x0, times):
    """`(k, n·d, d·d)`: column `p·d + q` is `L(tV, t E_pq) m` repeated for every token."""
    m = np.asarray(x0).mean(0)
    J = np.zeros((len(times), N * D, D * D))
    for k, t in enumerate(times):
        for p in range(D):
            for q in range(D):
                E = np.zeros((D, D))
                E[p, q] = 1.0
                J[k, :, p * D + q] = np.tile(expm_frechet(t * V, t * E, compute_expm=False) @ m, N)
    return J


@pytest.fixture(scope="module")
def generic_system():
    V = _generic_V()
    return (V, *_system(V))


@pytest.fixture(scope="module")
def generic(generic_system):
    """The system and its worst case against random directions (LOBPCG: the expensive
    part, about 25 s; its users are in the slow suite)."""
    V, field, x0s = generic_system
    op = ja.ResponseOperator(field, x0s[0], TIMES[-1], TIMES, "V", **SOLVE)
    R = ja.random_directions(jax.random.key(5), 6, D)
    Rr = ja.random_directions(jax.random.key(6), 5, D, rank=1)
    res = C.worst_vs_random(op, x0s, R, Rr, rank=1, iters=40, power_iters=100)
    return V, field, x0s, op, R, Rr, res


# ------------------------------------------------------------------ worst vs random
@pytest.mark.slow
def test_worst_vs_random_matches_the_closed_form_jacobian(generic):
    """σ, the random responses and every ratio equal those of the closed-form Jacobian
    (NumPy SVD and products in float64) at each initial condition and time."""
    V, _, x0s, _, R, Rr, res = generic
    assert res.sigma.shape == (2, 2) and res.random.shape == (2, 6, 2)
    assert res.random_rank.shape == (2, 5, 2)
    sig = np.zeros((2, 2))
    rnd, rnd_r = np.zeros((2, 6, 2)), np.zeros((2, 5, 2))
    for s, x0 in enumerate(x0s):
        J = _closed_form_jacobian(V, x0, TIMES)
        sig[s] = np.linalg.svd(J, compute_uv=False)[:, 0]
        rnd[s] = np.linalg.norm(np.einsum("kmp,jp->jkm", J, R.reshape(6, -1)), axis=-1)
        rnd_r[s] = np.linalg.norm(np.einsum("kmp,jp->jkm", J, Rr.reshape(5, -1)), axis=-1)
    np.testing.assert_allclose(res.sigma, sig, rtol=1e-7)
    np.testing.assert_allclose(res.random, rnd, rtol=1e-7)
    np.testing.assert_allclose(res.random_rank, rnd_r, rtol=1e-7)
    np.testing.assert_allclose(res.ratio_to_mean_random(), sig / rnd.mean(1), rtol=1e-7)
    np.testing.assert_allclose(res.ratio_to_max_random(), sig / rnd.max(1), rtol=1e-7)
    assert np.all(res.ratio_to_max_random() >= 1.0)
    # the best rank-1 direction lies between the best random rank-1 one and the worst one
    assert np.all(res.sigma_rank <= res.sigma * (1 + 1e-10))
    assert np.all(res.sigma_rank >= res.random_rank.max(1) * (1 - 1e-10))
    np.testing.assert_allclose(
        res.rank_ratio_to_mean_random(), res.sigma_rank / rnd_r.mean(1), rtol=1e-7
    )
    # the directions and the base run are those of the first initial condition
    assert res.worst.directions.shape == (2, D, D) and res.worst_rank.rank == 1
    m = np.asarray(x0s[0]).mean(0)
    base = np.asarray(x0s[0]) + np.stack([(expm(t * V) - np.eye(D)) @ m for t in TIMES])[:, None]
    np.testing.assert_allclose(res.base, base, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
def test_worst_vs_random_restores_the_operator_and_needs_an_initial_condition(generic):
    _, _, x0s, op, R, Rr, _ = generic
    np.testing.assert_array_equal(np.asarray(op.x0), np.asarray(x0s[0]))
    with pytest.raises(ValueError, match="initial condition"):
        C.worst_vs_random(op, [], R, Rr)


@pytest.mark.slow
def test_worst_vs_random_when_the_response_is_t_delta_m():
    """V = 0: `δx_i(t) = t Δ m` exactly, so `|J_t Δ| = √n t |Δ m|`: σ = √n t |m|, reached
    by the rank-1 directions u mᵀ/|m| (rank-1 worst = worst), and a random R gives
    `√n t |R m|`."""
    field, x0s = _system(np.zeros((D, D)))
    op = ja.ResponseOperator(field, x0s[0], TIMES[-1], TIMES, "V", **SOLVE)
    R = ja.random_directions(jax.random.key(7), 4, D)
    Rr = ja.random_directions(jax.random.key(8), 3, D, rank=1)
    res = C.worst_vs_random(op, x0s[:1], R, Rr, rank=1, iters=40)
    m = np.asarray(x0s[0]).mean(0)
    t = np.asarray(TIMES)
    np.testing.assert_allclose(res.sigma[0], np.sqrt(N) * t * np.linalg.norm(m), rtol=1e-8)
    np.testing.assert_allclose(res.rank_over_full(), 1.0, rtol=1e-8)
    ref = np.sqrt(N) * t[None] * np.linalg.norm(R @ m, axis=-1)[:, None]
    np.testing.assert_allclose(res.random[0], ref, rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(C.response_norms(op, R)), ref, rtol=1e-12
    )  # the same numbers through the public helper
    # the worst direction maps everything onto m: Δ = u mᵀ/|m| has Δ m/|m| = u
    for k in range(2):
        W = res.worst.directions[k]
        np.testing.assert_allclose(np.linalg.norm(W @ m), np.linalg.norm(m), rtol=1e-8)
        np.testing.assert_allclose(C.direction_spectrum(W)[1:], 0.0, atol=1e-7)


# ------------------------------------------------------------------ brute force
def test_full_jacobian_is_the_frechet_derivative_of_the_exponential(generic_system):
    V, field, x0s = generic_system
    J = C.full_jacobian(field, x0s[0], TIMES[-1], TIMES, "V", **SOLVE)
    ref = _closed_form_jacobian(V, x0s[0], TIMES)
    assert J.shape == ref.shape == (2, N * D, D * D)
    np.testing.assert_allclose(J, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())


@pytest.mark.slow
def test_brute_force_check_agrees_with_the_worst_case(generic):
    """The forward-mode Jacobian's SVD and the LOBPCG worst case agree; the check's σ_svd
    is the closed form's top singular value."""
    V, field, x0s, _, _, _, res = generic
    chk = C.brute_force_check(
        field, x0s[0], TIMES[-1], TIMES, "V", res.worst, res.worst_rank, **SOLVE
    )
    ref = np.linalg.svd(_closed_form_jacobian(V, x0s[0], TIMES), compute_uv=False)[:, 0]
    np.testing.assert_allclose(chk.sigma_svd, ref, rtol=1e-7)
    np.testing.assert_array_equal(chk.sigma, res.worst.sigma)
    assert chk.max_rel_sigma_error < 1e-8
    assert np.all(chk.alignment > 1 - 1e-8)
    assert chk.rank1_grid is None and chk.rank1 is None  # d = 3: no grid


def _known_svd(k, m, d, s, seed=0):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((k, m, m)))[0]
    W = np.linalg.qr(rng.standard_normal((k, d * d, d * d)))[0]
    J = np.einsum("kmi,i,kpi->kmp", U[:, :, : d * d], s, W)
    return J, W


def _worst(directions, sigma):
    k = len(sigma)
    d = directions.shape[-1]
    return ja.WorstCase(np.zeros(k), directions, sigma, np.zeros((k, 1, d)), None, 0)


def test_check_against_jacobian_measures_sigma_error_and_alignment():
    """A Jacobian with prescribed singular values s and right vectors W: the right answer
    scores error 0 and alignment 1; a 1 % high σ and the second vector are reported."""
    s = np.array([3.0, 2.0, 1.0, 0.5])
    J, W = _known_svd(2, 6, 2, s)
    top = W[:, :, 0].reshape(2, 2, 2)
    good = C.check_against_jacobian(J, _worst(top, np.full(2, 3.0)))
    np.testing.assert_allclose(good.sigma_svd, 3.0, rtol=1e-13)
    assert good.max_rel_sigma_error < 1e-13
    np.testing.assert_allclose(good.alignment, 1.0, rtol=1e-13)
    second = W[:, :, 1].reshape(2, 2, 2)
    bad = C.check_against_jacobian(J, _worst(second, np.array([3.0, 3.03])))
    np.testing.assert_allclose(bad.max_rel_sigma_error, 0.01, rtol=1e-10)
    np.testing.assert_allclose(bad.alignment, 0.0, atol=1e-13)
    assert bad.rank1 is None and bad.rank1_grid is not None  # d = 2, no rank-1 result
    assert np.all(bad.rank1_grid <= 3.0 * (1 + 1e-12))  # a rank-1 value is ≤ σ₁


@pytest.mark.parametrize("angle_deg", [30.0, 30.5])
def test_rank1_grid_search_closed_form(angle_deg):
    """`J vec(u vᵀ) = (u vᵀ m)` tiled: `|J(u vᵀ)| = √n |v·m|`, largest at v ∥ m. The grid
    has v every 1°: m on a grid angle gives √n |m| exactly; half-way between, the
    nearest grid v is 0.5° off, which gives √n |m| cos 0.5°."""
    n = 3
    m = 1.7 * np.array([np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))])
    J = np.zeros((1, n * 2, 4))
    for p in range(2):
        for q in range(2):
            E = np.zeros((2, 2))
            E[p, q] = 1.0
            J[0, :, 2 * p + q] = np.tile(E @ m, n)
    expected = np.sqrt(n) * 1.7 * np.cos(np.radians(angle_deg - np.round(angle_deg)))
    np.testing.assert_allclose(C.rank1_grid_search(J), [expected], rtol=1e-12)
    # a coarser grid (every 4°, v 2° off at 30°) loses the corresponding factor
    coarse = np.sqrt(n) * 1.7 * np.cos(np.radians(abs(angle_deg - 32.0)))
    np.testing.assert_allclose(C.rank1_grid_search(J, steps=45), [coarse], rtol=1e-12)


# ------------------------------------------------------------------ linear response
def test_linear_response_check_against_the_exponential():
    """Measured divergence, linear response, remainder and its order in ε equal their
    closed forms `|(e^{t(V+εΔ)} − e^{tV}) m|`, `|L(tV, tΔ) m|` and
    `|(e^{t(V+εΔ)} − e^{tV} − ε L(tV, tΔ)) m|` (the same for every token)."""
    V = _generic_V()
    field, x0s = _system(V)
    x0 = x0s[0]
    m = np.asarray(x0).mean(0)
    dW = np.asarray(ja.random_directions(jax.random.key(9), 1, D))[0]
    eps = (1e-1, 1e-2, 1e-3)
    solve = dict(SOLVE, ts=np.linspace(0.0, 1.0, 11))
    chk = C.linear_response_check(field, x0, 1.0, dW, "V", eps, **solve)
    ref_max_remainder = []
    ts = chk.response.ts
    np.testing.assert_allclose(ts, np.linspace(0.0, 1.0, 11), atol=1e-14)
    lin = np.array(
        [np.linalg.norm(expm_frechet(t * V, t * dW, compute_expm=False) @ m) for t in ts]
    )
    np.testing.assert_allclose(chk.linear, lin, rtol=1e-7, atol=1e-12)
    for i, e in enumerate(eps):
        diff = [expm(t * (V + e * dW)) - expm(t * V) for t in ts]
        dev = np.array([np.linalg.norm(dM @ m) for dM in diff])
        rem = np.array(
            [
                np.linalg.norm((dM - e * expm_frechet(t * V, t * dW, compute_expm=False)) @ m)
                for t, dM in zip(ts, diff)
            ]
        )
        np.testing.assert_allclose(chk.divergence[i], dev, rtol=1e-7, atol=1e-12)
        # the remainder is O(ε²) ≥ 1e-7 here; rounding of x(ε) − x − εδx is ~1e-15
        np.testing.assert_allclose(chk.remainder[i, 1:], rem[1:], rtol=1e-5)
        assert chk.remainder[i, 0] < 1e-14
        ref_max_remainder.append(rem.max())
    np.testing.assert_allclose(chk.max_remainder(), ref_max_remainder, rtol=1e-5)
    r = ref_max_remainder
    order = [np.log(r[i] / r[i + 1]) / np.log(eps[i] / eps[i + 1]) for i in range(2)]
    # 1e-5 relative on each remainder moves the order by ≤ 2e-5 / log(10)
    np.testing.assert_allclose(chk.remainder_order(), order, atol=1e-5)
    np.testing.assert_allclose(chk.remainder_order(), 2.0, atol=0.05)
    np.testing.assert_allclose(
        chk.max_divergence_over_eps(), [chk.divergence[i].max() / e for i, e in enumerate(eps)]
    )
    # the a-posteriori bound is above the measured divergence (it is a bound)
    assert chk.bound_holds()
    viol = chk.max_measured_minus_bound()
    assert all(v <= 0 for v in viol)
    np.testing.assert_allclose(viol, np.max(chk.divergence - chk.bound, axis=1))
    assert not C.LinearResponseCheck(
        chk.eps, chk.response, chk.linear, chk.bound + 1.0, chk.bound, chk.remainder
    ).bound_holds()


def test_first_order_norm_is_displacement_over_the_response():
    V = _generic_V()
    field, x0s = _system(V)
    m = np.asarray(x0s[0]).mean(0)
    dW = np.asarray(ja.random_directions(jax.random.key(10), 1, D))[0]
    nu = C.first_order_norm(field, x0s[0], 1.0, dW, 0.05, "V", **SOLVE)
    ref = 0.05 / np.linalg.norm(expm_frechet(V, dW, compute_expm=False) @ m)
    np.testing.assert_allclose(nu, ref, rtol=1e-7)


# ------------------------------------------------------------------ rank structure
def test_direction_spectrum_is_the_singular_values():
    rng = np.random.default_rng(1)
    s = np.array([[0.9, 0.4, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]])
    U = np.linalg.qr(rng.standard_normal((2, 4, 4)))[0]
    W = np.linalg.qr(rng.standard_normal((2, 4, 4)))[0]
    dirs = np.einsum("kij,kj,klj->kil", U, s, W)
    np.testing.assert_allclose(C.direction_spectrum(dirs), s, atol=1e-14)
    np.testing.assert_allclose(C.direction_spectrum(dirs[1]), s[1], atol=1e-14)
