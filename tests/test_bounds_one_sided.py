"""The one-sided (logarithmic-norm) stability bound (docs/bounds.md, 'The one-sided
bound'): its Jacobian blocks are the field's, its ball bounds hold, and the bound is never
below the divergence of converged float64 runs."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn as ja
from jaxattn._bounds import lognorm

DYNAMICS = ("plain", "rescaled", "sphere")


def _weights(rng, d, scale=1.0):
    return [scale * rng.normal(size=(d, d)) / np.sqrt(d) for _ in range(3)]


def _tokens(rng, dyn, n, d, low=-1.0, high=1.0):
    x = rng.uniform(low, high, size=(n, d))
    if dyn == "sphere":
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _exact_blocks(f, t, z):
    """Block norms from `jax.jacfwd` of the package's own field, in NumPy float64."""
    J = np.asarray(jax.jacfwd(lambda y: f(t, y))(jnp.asarray(z)))  # (n, d, n, d)
    J = J.transpose(0, 2, 1, 3)
    n = J.shape[0]
    out = np.linalg.norm(J, ord=2, axis=(-2, -1))
    for i in range(n):
        S = 0.5 * (J[i, i] + J[i, i].T)
        out[i, i] = np.linalg.eigvalsh(S)[-1]
    return out


@pytest.mark.parametrize("dyn", DYNAMICS)
@pytest.mark.parametrize("d", [2, 3])
def test_blocks_and_velocity_are_the_fields(dyn, d):
    rng = np.random.default_rng(d)
    Q, K, V = _weights(rng, d)
    f = ja.make_field(dyn, jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V), beta=1.3)
    z = _tokens(rng, dyn, 7, d)
    Vn, An, beta = lognorm.field_weights(f)
    with jax.enable_x64(True):
        for t in (0.0, 0.4):
            At = lognorm._logit_matrix(dyn, jnp.asarray(Vn), jnp.asarray(An), t)
            v = lognorm._velocity(dyn, jnp.asarray(Vn), At, beta, jnp.asarray(z))
            np.testing.assert_allclose(v, f(t, jnp.asarray(z)), rtol=1e-12, atol=1e-12)
            norm, var, _ = lognorm._blocks(
                dyn,
                jnp.asarray(Vn),
                At,
                beta,
                jnp.asarray(z),
                jnp.zeros(7),
                0.0,
                float(np.linalg.norm(Vn, 2)),
            )
            exact = _exact_blocks(f, t, z)
            if d <= 2:  # closed forms
                np.testing.assert_allclose(norm, exact, rtol=1e-10, atol=1e-10)
            else:  # an upper bound within d^(1/128) (diagonal: eigvalsh, exact)
                assert np.all(norm >= exact - 1e-10)
                assert np.all(norm <= exact + np.abs(exact) * (d ** (1 / 128) - 1) + 1e-10)
            # a ball of radius 0 and a window of length 0 let nothing move
            np.testing.assert_allclose(var, 0.0, atol=1e-12)


def _field_at(dyn, V, A, beta, t, z):
    return lognorm._velocity(dyn, V, lognorm._logit_matrix(dyn, V, A, t), beta, z)


def _raw_jacobian(dyn, V, A, beta, t, z):
    J = jax.jacfwd(lambda y: _field_at(dyn, V, A, beta, t, y))(z)
    return np.asarray(J).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("dyn", DYNAMICS)
def test_ball_bounds_hold_on_random_points(dyn):
    # Every point of the ball and window moves each block by at most `var`, the velocity's
    # time derivative stays below `vy` (rescaled frame), and the gap to a perturbed field
    # (Ṽ, Ã a few percent away) below `_gap_ball`: 40 random points per ball, on balls from
    # tiny to large (the bounds are meant to hold on all of them).
    rng = np.random.default_rng(11)
    n, d = 6, 3
    with jax.enable_x64(True):
        for trial in range(4):
            V, A = (jnp.asarray(w) for w in _weights(rng, d, 1.2)[:2])
            beta = float(rng.uniform(0.3, 2.0))
            z = jnp.asarray(_tokens(rng, dyn, n, d))
            t = float(rng.uniform(0.0, 0.5))
            r = jnp.asarray(rng.uniform(0.0, 1.0, n) * 10.0 ** (-3 + trial))
            tau = 0.0 if dyn != "rescaled" else 10.0 ** (-3 + trial)
            vnorm = float(np.linalg.norm(np.asarray(V), 2))
            At = lognorm._logit_matrix(dyn, V, A, t)
            Vp = V + 0.03 * jnp.asarray(rng.normal(size=(d, d)))
            Ap = A + 0.03 * jnp.asarray(rng.normal(size=(d, d)))
            vnorm = max(vnorm, float(np.linalg.norm(np.asarray(Vp), 2)))
            Atp = lognorm._logit_matrix(dyn, Vp, Ap, t)
            _, var, vy = lognorm._blocks(dyn, V, At, beta, z, r, tau, vnorm)
            gap = np.asarray(lognorm._gap_ball(dyn, V, At, Vp, Atp, beta, z, r, tau, vnorm))
            J0 = _raw_jacobian(dyn, V, A, beta, t, z)
            for _ in range(40):
                dz = rng.normal(size=(n, d))
                dz /= np.linalg.norm(dz, axis=-1, keepdims=True)
                dz *= np.asarray(r)[:, None] * rng.uniform(0, 1, (n, 1))
                tp = t + rng.uniform(-tau, tau)
                J1 = _raw_jacobian(dyn, V, A, beta, tp, z + jnp.asarray(dz))
                moved = np.linalg.norm(J1 - J0, ord=2, axis=(-2, -1))
                assert np.all(moved <= np.asarray(var) * (1 + 1e-9) + 1e-12)
                zp = z + jnp.asarray(dz)
                g = _field_at(dyn, Vp, Ap, beta, tp, zp) - _field_at(dyn, V, A, beta, tp, zp)
                assert np.all(np.linalg.norm(g, axis=-1) <= gap * (1 + 1e-9))
                if tau > 0:
                    dFdt = jax.jacfwd(partial(_field_at, dyn, V, A, beta, z=z))(tp)
                    assert np.all(np.linalg.norm(dFdt, axis=-1) <= np.asarray(vy) * (1 + 1e-9))


# Shapes of the random cases: one compile each; (n, d) spans n 8–64 and d 2–4.
SHAPES = ((8, 2), (16, 4), (32, 3), (64, 2))
CASES_PER_SHAPE = 17  # × 4 shapes × 3 dynamics = 204 cases
T1, GRID, REF_DT = 0.5, 0.05, 1e-3


def _random_case(rng, dyn, n, d):
    Q, K, V = _weights(rng, d, rng.uniform(0.5, 1.5))
    beta = float(rng.uniform(0.3, 2.0))
    f = ja.make_field(dyn, jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V), beta=beta)
    target = str(rng.choice(["Q", "K", "V"]))
    rank = int(rng.integers(1, 3))
    eps = float(10.0 ** rng.uniform(-3, -0.5))
    key = jax.random.key(int(rng.integers(1 << 30)))
    lora = ja.LoRA.random(d, rank=rank, norm=eps, target=target, key=key)
    # the LoRA merged into dense weights: every case of a shape has one structure (one
    # compile of the reference solve); the bound sees only the effective weights
    fl = f.with_lora(lora)
    fp = ja.make_field(dyn, *(fl.weight(w) for w in "QKV"), beta=beta)
    return f, fp, jnp.asarray(_tokens(rng, dyn, n, d))


@pytest.mark.slow
@pytest.mark.parametrize("dyn", DYNAMICS)
def test_never_below_the_converged_divergence(dyn):
    rng = np.random.default_rng({"plain": 1, "rescaled": 2, "sphere": 3}[dyn])
    ts = np.linspace(0.0, T1, round(T1 / GRID) + 1)
    for n, d in SHAPES:
        for _ in range(CASES_PER_SHAPE):
            f, fp, x0 = _random_case(rng, dyn, n, d)
            s = ja.simulate(f, x0, T1, dt=REF_DT, ts=ts)
            sp = ja.simulate(fp, x0, T1, dt=REF_DT, ts=ts)
            e = np.asarray(ja.divergence(s.xs, sp.xs))
            b = ja.bound_one_sided(f, fp, ts, x0, substeps=4).bound  # one compile per shape
            # any case below the converged divergence fails: the only slack is the
            # reference's own error (RK4, dt = 1e-3, float64: below 1e-11 here)
            assert np.all(e <= b + 1e-10), (n, d, e, b)


@pytest.mark.slow
def test_demo_certified_horizon():
    # The paper's figure (n = 50, U[−5, 5]², V = I against diag(1, 0.9)): e first exceeds
    # 0.1 at t = 0.237 (RK4, dt = 1e-3, float64); the one-sided bound must stay above e
    # and certify e ≤ 0.1 at least up to t = 0.08 (the Grönwall bound: 0.014).
    from jaxattn.experiments.lora_divergence import paper_lora

    x0 = ja.uniform_tokens(0, (50, 2), -5.0, 5.0, jnp.float64)
    base = ja.RescaledField(d=2, beta=1.0, dtype=jnp.float64)
    f0, f1 = (base.with_lora(paper_lora(eps, jnp.float64)) for eps in (0.0, 0.1))
    ts = np.linspace(0.0, 0.15, 151)
    s0, s1 = (ja.simulate(f, x0, 0.15, dt=1e-3, ts=ts) for f in (f0, f1))
    e = np.asarray(ja.divergence(s0.xs, s1.xs))
    b = ja.bound_one_sided(f0, f1, ts, x0).bound
    assert np.all(e <= b + 1e-10)
    assert ja.certified_horizon(ts, b, 0.1) >= 0.08


def test_bad_input_is_refused_in_one_line():
    f = ja.RescaledField(d=2, dtype=jnp.float64)
    x0 = np.zeros((4, 2))
    with pytest.raises(ValueError, match="for usa use bound_a_posteriori"):
        ja.bound_one_sided(ja.USAField(d=2), ja.USAField(d=2), [0.0, 0.1], x0)
    with pytest.raises(ValueError, match="at most 4096 solver steps"):
        ja.bound_one_sided(f, f, np.linspace(0, 1, 2001), x0, substeps=4)
    with pytest.raises(ValueError, match="must be finite"):
        ja.bound_one_sided(f, f, [0.0, 0.1], np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="increasing grid"):
        ja.bound_one_sided(f, f, [0.1, 0.0], x0)
