"""jaxattn against the independent NumPy/SciPy reference of `tests/reference.py`.

Every test here compares the package to float64 numbers computed from the equations of
docs/theory.md by code that shares nothing with `jaxattn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxattn as ja

DYNAMICS = ("plain", "rescaled", "sphere", "usa")
SPHERE = ("sphere", "usa")
D, N, BETA, T1 = 3, 8, 1.0, 3.0
TS = np.array([0.5, 1.0, 2.0, 3.0])
ALPHA = 2.0  # α ≠ r so that a wrong α/r scaling is seen

# (target, rank) of each LoRA in a configuration. "QKV" perturbs all three at once.
LORA_CASES = {
    "none": (),
    "Q": (("Q", 1),),
    "K": (("K", 2),),
    "V": (("V", 1),),
    "QKV": (("Q", 1), ("K", 2), ("V", 2)),
}


# ---------------------------------------------------------------------------------
# Problem construction (NumPy first; jnp float64 arrays are made from it).


def _weights(seed: int, d: int = D):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(d, d)) / np.sqrt(d) for _ in range(3)]


def _tokens(seed: int, dynamics: str, n: int = N, d: int = D):
    x = np.random.default_rng(seed + 1000).normal(size=(n, d))
    if dynamics in SPHERE:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _numpy_loras(case: str, seed: int, d: int = D, size: float = 0.3):
    """NumPy factors (target, A, B) with ‖ΔW‖₂ = size each."""
    rng = np.random.default_rng(seed + 2000)
    out = []
    for target, r in LORA_CASES[case]:
        A = rng.normal(size=(r, d))
        B = rng.normal(size=(d, r))
        B *= size / np.linalg.norm(ref.lora_delta(A, B, ALPHA), 2)
        out.append((target, A, B))
    return out


def _problem(dynamics: str, case: str, seed: int = 0, d: int = D):
    """(jaxattn field, reference rhs, effective NumPy weights)."""
    Q, K, V = _weights(seed, d)
    nl = _numpy_loras(case, seed, d)
    eff = {"Q": Q.copy(), "K": K.copy(), "V": V.copy()}
    for target, A, B in nl:
        eff[target] = eff[target] + ref.lora_delta(A, B, ALPHA)
    loras = [ja.LoRA(jnp.asarray(A), jnp.asarray(B), alpha=ALPHA, target=t) for t, A, B in nl]
    field = ja.make_field(
        dynamics, jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V), beta=BETA, lora=loras or None
    )
    rhs = ref.make_rhs(dynamics, eff["Q"], eff["K"], eff["V"], BETA)
    return field, rhs, eff


def _rel_err(a, b) -> float:
    """max |a − b| / max |b| (relative to the size of the solution)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------
# The field at one state.


@pytest.mark.parametrize("case", list(LORA_CASES))
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_field_value_matches_reference(dynamics, case):
    field, rhs, eff = _problem(dynamics, case, seed=1)
    x = _tokens(1, dynamics)
    t = 0.7  # non-zero so the rescaled field's e^{tV} matters
    got = np.asarray(field(t, jnp.asarray(x)))
    want = rhs(t, x)
    # Same float64 arithmetic up to reassociation (and an expm for "rescaled"):
    # a few ulps times the O(1)–O(10) magnitudes involved.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for name in "QKV":
        np.testing.assert_allclose(
            np.asarray(field.weight(name)), eff[name], rtol=1e-13, atol=1e-14
        )
    P = np.asarray(field.attention(t, jnp.asarray(x)))
    if dynamics == "usa":
        P_ref = np.exp(ref.logits(x, eff["Q"], eff["K"], BETA)) / x.shape[0]
    elif dynamics == "rescaled":
        P_ref = ref.rescaled_attention(t, x, eff["Q"], eff["K"], eff["V"], BETA)
    else:
        P_ref = ref.softmax_rows(ref.logits(x, eff["Q"], eff["K"], BETA))
    np.testing.assert_allclose(P, P_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_field_value_factored_lora_path(dynamics):
    """n = 2, d = 12: d² > n·2d, so each single LoRA is applied in factored form."""
    d, n = 12, 2
    field, rhs, _ = _problem(dynamics, "QKV", seed=2, d=d)
    x = _tokens(2, dynamics, n=n, d=d)
    got = np.asarray(field(0.4, jnp.asarray(x)))
    np.testing.assert_allclose(got, rhs(0.4, x), rtol=1e-12, atol=1e-12)


def test_field_value_two_loras_on_one_target():
    """Two LoRAs on V add up: ΔV = ΔV₁ + ΔV₂."""
    Q, K, V = _weights(3)
    rng = np.random.default_rng(3)
    A1, B1 = rng.normal(size=(1, D)), rng.normal(size=(D, 1))
    A2, B2 = rng.normal(size=(2, D)), rng.normal(size=(D, 2))
    loras = [
        ja.LoRA(jnp.asarray(A1), jnp.asarray(B1), alpha=ALPHA, target="V"),
        ja.LoRA(jnp.asarray(A2), jnp.asarray(B2), alpha=ALPHA, target="V"),
    ]
    Veff = V + ref.lora_delta(A1, B1, ALPHA) + ref.lora_delta(A2, B2, ALPHA)
    x = _tokens(3, "plain")
    field = ja.PlainField(jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V), beta=BETA, lora=loras)
    want = ref.plain_rhs(Q, K, Veff, BETA)(0.0, x)
    np.testing.assert_allclose(np.asarray(field(0.0, jnp.asarray(x))), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------
# Trajectories.

# Tolerances.
# dopri8 at rtol=1e-10, atol=1e-12 controls the *local* error per step; the global
# error is that times the growth of perturbations over [0, 3] (≈ e^{L t} with L the
# Lipschitz constant, O(1) here, so at most a factor ~10–100). Measured: ≤ ~3e-10
# relative. The reference (DOP853 at 1e-12) is two orders tighter. Bound: 1e-8.
DOPRI8_TOL = 1e-8
# RK4 with dt = 0.01: global error C·dt⁴ = C·1e-8 with C = O(1) (derivatives of the
# field are O(1) for these weights); measured ≤ ~3e-10 relative. Bound 1e-6 leaves a
# wide margin but still fails for any method of order ≤ 2 (dt² = 1e-4) or for the
# research code's "RK4" (= Euler, error O(dt) = 1e-2).
RK4_TOL = 1e-6

# dopri8: every dynamics without LoRA and with all three targets perturbed (in the
# rescaled case ΔV also enters e^{tV}). Single-target LoRAs on every dynamics are
# checked on the field value above (cheap: no compilation per case).
DOPRI8_CASES = [(dyn, c) for dyn in DYNAMICS for c in ("none", "QKV")]


@pytest.mark.parametrize(("dynamics", "case"), DOPRI8_CASES)
def test_dopri8_matches_reference(dynamics, case):
    field, rhs, _ = _problem(dynamics, case)
    x0 = _tokens(0, dynamics)
    sol = ja.simulate(field, jnp.asarray(x0), T1, solver="dopri8", rtol=1e-10, atol=1e-12, ts=TS)
    assert sol.ok, sol.messages()
    np.testing.assert_allclose(np.asarray(sol.ts), TS, rtol=0, atol=1e-15)
    want = ref.solve_reference(rhs, x0, TS)
    err = _rel_err(sol.xs, want)
    print(f"\n dopri8 {dynamics:8s} lora={case:4s}: max rel err {err:.2e}")
    assert err <= DOPRI8_TOL
    if dynamics in SPHERE:
        assert float(sol.norm_drift) < 1e-8


@pytest.mark.parametrize("case", ["QKV"])
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_rk4_matches_reference(dynamics, case):
    field, rhs, _ = _problem(dynamics, case)
    x0 = _tokens(0, dynamics)
    dt = 0.01
    sol = ja.simulate(field, jnp.asarray(x0), T1, solver="rk4", dt=dt)
    assert sol.ok, sol.messages()
    ts = np.asarray(sol.ts)
    assert ts.shape == (301,)
    np.testing.assert_allclose(ts, np.linspace(0.0, T1, 301), rtol=0, atol=1e-13)
    idx = np.rint(TS / dt).astype(int)
    want = ref.solve_reference(rhs, x0, ts[idx])  # the solver's own grid times
    err = _rel_err(np.asarray(sol.xs)[idx], want)
    print(f"\n rk4    {dynamics:8s} lora={case:4s}: max rel err {err:.2e}")
    assert err <= RK4_TOL


# ---------------------------------------------------------------------------------
# Batching: one vmapped solve equals a Python loop of single solves.


@pytest.mark.parametrize(
    ("dynamics", "solver", "kw", "tol"),
    [
        # Fixed steps: the batch performs the same arithmetic as each single solve, up to
        # reassociation in batched matmuls: equal to ~1e-12.
        ("sphere", "rk4", {"dt": 0.1}, 1e-12),
        # Adaptive steps: the controller's first steps are decided by error estimates near
        # roundoff (~1e-15), so batched and single solves take slightly different step
        # sequences (a property of diffrax under vmap, not of jaxattn). Both are within
        # the tolerance of the true solution, so they agree to ~rtol·growth, not 1e-12.
        ("usa", "dopri8", {"rtol": 1e-10, "atol": 1e-12, "ts": [0.5, 1.0, 2.0]}, 1e-8),
    ],
)
def test_batched_solve_equals_loop(dynamics, solver, kw, tol):
    Q, K, V = (jnp.asarray(w) for w in _weights(4))
    norms = jnp.array([0.05, 0.2, 0.5])
    lo = ja.LoRA.random(D, rank=2, norm=norms, target="V", key=jax.random.key(4), alpha=ALPHA)
    assert lo.batch_shape == (3,)
    # Each member has exactly the requested operator norm, and one shared direction.
    deltas = np.asarray(lo.delta())
    for p in range(3):
        assert np.linalg.norm(deltas[p], 2) == pytest.approx(float(norms[p]), rel=1e-12)
    np.testing.assert_allclose(deltas[2] / 0.5, deltas[0] / 0.05, rtol=1e-10, atol=1e-13)

    field = ja.make_field(dynamics, Q, K, V, beta=BETA, lora=lo)
    x0 = np.stack([_tokens(s, dynamics, n=6) for s in range(2)])  # (B=2, n=6, d=3)
    t1 = 2.0
    sol = ja.simulate(field, jnp.asarray(x0), t1, solver=solver, **kw)
    T = sol.ts.shape[0]
    assert sol.xs.shape == (3, 2, T, 6, D)
    assert sol.status.shape == (3, 2)
    assert sol.ok
    xs = np.asarray(sol.xs)
    worst = 0.0
    for p in range(3):
        single = ja.LoRA(lo.A[p], lo.B[p], alpha=ALPHA, target="V")
        f1 = field.with_lora(single)
        Veff = np.asarray(V) + deltas[p]
        np.testing.assert_allclose(np.asarray(f1.weight("V")), Veff, rtol=1e-13, atol=1e-14)
        for b in range(2):
            one = ja.simulate(f1, jnp.asarray(x0[b]), t1, solver=solver, **kw)
            assert one.xs.shape == (T, 6, D)
            worst = max(worst, float(np.max(np.abs(xs[p, b] - np.asarray(one.xs)))))
            np.testing.assert_allclose(xs[p, b], np.asarray(one.xs), rtol=0, atol=tol)
        if solver == "dopri8":  # and each member is the right solution
            rhs = ref.make_rhs(dynamics, Q, K, Veff, BETA)
            want = ref.solve_reference(rhs, x0[0], np.asarray(sol.ts))  # unit tokens
            assert _rel_err(xs[p, 0], want) <= DOPRI8_TOL
    print(f"\n batched {dynamics} {solver}: max |batch - loop| {worst:.2e}")
    # ...and the batch is not trivially constant across the perturbation size.
    assert np.max(np.abs(xs[2] - xs[0])) > 1e-3


# ---------------------------------------------------------------------------------
# LoRA: factored application equals the materialised weight.


def _forms_square_product(fn, d_out, d_in, *args) -> bool:
    """Does fn(*args) compute a (d_out, d_in) matrix product (i.e. ΔW = B A)?"""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return any(
        eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape == (d_out, d_in)
        for eqn in jaxpr.jaxpr.eqns
    )


@pytest.mark.parametrize(
    ("n", "d", "r", "factored"),
    [
        (64, 4, 2, False),  # d² = 16 ≤ n·2d = 512: materialising is cheaper
        (1, 48, 3, True),  # d² = 2304 > n·2d = 96: the factored product is cheaper
        (3, 40, 1, True),
    ],
)
def test_lora_apply_equals_merged(n, d, r, factored):
    rng = np.random.default_rng(n + d)
    W = rng.normal(size=(d, d)) / np.sqrt(d)
    A = rng.normal(size=(r, d))
    B = rng.normal(size=(d, r))
    x = rng.normal(size=(n, d))
    lo = ja.LoRA(jnp.asarray(A), jnp.asarray(B), alpha=ALPHA, target="V")
    Wj, xj = jnp.asarray(W), jnp.asarray(x)
    want = x @ (W + ref.lora_delta(A, B, ALPHA)).T
    np.testing.assert_allclose(
        np.asarray(lo.delta()), ref.lora_delta(A, B, ALPHA), rtol=1e-14, atol=1e-14
    )
    np.testing.assert_allclose(
        np.asarray(lo.merged(Wj)), W + ref.lora_delta(A, B, ALPHA), rtol=1e-14, atol=1e-14
    )
    got_apply = np.asarray(lo.apply(Wj, xj))
    got_merged = np.asarray(xj @ lo.merged(Wj).T)
    np.testing.assert_allclose(got_apply, got_merged, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_apply, want, rtol=1e-12, atol=1e-12)
    # Never form W + ΔW when the factored product is cheaper.
    assert _forms_square_product(lo.apply, d, d, Wj, xj) == (not factored)


# ---------------------------------------------------------------------------------
# Convergence order and the "RK4 is Euler" pitfall (docs/theory.md, 'Numerical schemes').


def test_convergence_order_euler_rk4():
    """Fit log(err) against log(dt) on the plain field at t1 = 2."""
    field, rhs, _ = _problem("plain", "none", seed=5)
    x0 = _tokens(5, "plain")
    t1 = 2.0
    want = ref.solve_reference(rhs, x0, [t1])[0]
    # RK4 error at dt = 0.025 stays ~5e-9, far above float64 roundoff (~1e-14 here);
    # dt ≤ 0.2 is close enough to the asymptotic regime (dt·L ≲ 0.2) that the fitted
    # slopes are within ±0.1 of the orders (measured 0.93 and 3.95).
    dts = np.array([0.2, 0.1, 0.05, 0.025])
    slopes = {}
    for solver in ("euler", "rk4"):
        errs = []
        for dt in dts:
            sol = ja.simulate(field, jnp.asarray(x0), t1, solver=solver, dt=float(dt))
            assert float(sol.ts[-1]) == pytest.approx(t1, abs=1e-14)
            errs.append(np.max(np.abs(np.asarray(sol.final) - want)))
        errs = np.array(errs)
        slopes[solver] = float(np.polyfit(np.log(dts), np.log(errs), 1)[0])
        print(
            f"\n {solver}: dt {dts.tolist()} err {[f'{e:.2e}' for e in errs]} "
            f"slope {slopes[solver]:.3f}"
        )
        assert errs.min() > 1e-12
    assert 0.85 <= slopes["euler"] <= 1.15
    assert 3.6 <= slopes["rk4"] <= 4.4


def test_rk4_is_not_euler():
    """The research code's "RK4" had error 2e-2 after 5 steps of dt = 0.1.

    Setup of the departure-time experiment: rescaled dynamics, Q = K = V = I, n = 20,
    d = 2, x0 ~ U[-1, 1]². True RK4 error is O(dt⁵) per step (~6e-7 after those 5 steps);
    Euler's is O(dt) globally.
    """
    rng = np.random.default_rng(6)
    n, d = 20, 2
    x0 = rng.uniform(-1.0, 1.0, size=(n, d))
    eye = np.eye(d)
    want = ref.solve_reference(ref.rescaled_rhs(eye, eye, eye, 1.0), x0, [0.5])[0]
    field = ja.RescaledField(d=d)
    sol = ja.simulate(field, jnp.asarray(x0), 0.5, solver="rk4", dt=0.1)
    assert sol.xs.shape == (6, n, d)  # 5 steps
    err_rk4 = float(np.max(np.abs(np.asarray(sol.final) - want)))
    # Forward Euler (what the research code's "RK4" reduces to), on the reference field,
    # to show that the threshold discriminates.
    rhs = ref.rescaled_rhs(eye, eye, eye, 1.0)
    z = x0.copy()
    for k in range(5):
        z = z + 0.1 * rhs(0.1 * k, z)
    err_euler = float(np.max(np.abs(z - want)))
    print(f"\n 5 steps dt=0.1: rk4 err {err_rk4:.2e}, euler err {err_euler:.2e}")
    assert err_euler > 1e-3
    assert err_rk4 < 1e-5
