"""The fast paths compute the same thing as the straightforward formulas.

- `_fields.expm` (float32: Taylor + scaling and squaring, no LU) against scipy in float64
  and against `jax.scipy.linalg.expm`, over norms that need 0 … many squarings;
- the folded logits `(x A) xᵀ` / `z (Sᵀ A S) zᵀ` and the dense kernel normalised after
  `P·v`, against the textbook field (`jsl.expm`, separate Q/K/V projections, `P @ v`),
  with and without LoRAs on every target;
- fixed steps land exactly on the float grid `t0 + k·dt` (the saved step times are
  compared for equality), the cached grid/time constants never go stale;
- float32 rescaled dynamics stay finite at t = 1000; gradients through every adjoint;
  batching over stacked LoRAs and x0 equals member-by-member solves.
"""

import diffrax
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest
import scipy.linalg

import jaxattn as ja
import jaxattn._model.attention as _attention
import jaxattn._model.fields as _fields
import jaxattn._simulate.integrate as _simulate
import jaxattn._simulate.options as _options


def _rand(shape, seed, scale=1.0, dtype=jnp.float64):
    return scale * jax.random.normal(jax.random.key(seed), shape, dtype)


# ------------------------------------------------------------------ expm
# Compiled once per shape: called eagerly, the `lax.cond`s inside would compile anew on
# every call (fresh branch functions each time).
_expm_jit = jax.jit(_fields.expm)
_jsl_expm_jit = jax.jit(jsl.expm)


@pytest.mark.parametrize("d", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.1, 0.5, 2.0, 30.0, 400.0])
def test_float32_expm_matches_scipy(d, scale):
    M64 = np.asarray(_rand((d, d), d, scale / np.sqrt(d)))
    # Negative-definite symmetric part (as t(V − cI) in the rescaled field): e^M stays
    # bounded however large t; the raw random matrix may grow like e^{‖M‖}.
    for M in (M64, M64 - (np.linalg.eigvalsh(0.5 * (M64 + M64.T))[-1]) * np.eye(d)):
        ref = scipy.linalg.expm(M)
        if not np.abs(ref).max() < 1e30:  # beyond float32 for any algorithm
            continue
        got = np.asarray(_expm_jit(jnp.asarray(M, jnp.float32)), np.float64)
        old = np.asarray(_jsl_expm_jit(jnp.asarray(M, jnp.float32)), np.float64)
        scale_ref = max(np.abs(ref).max(), 1e-30)
        err_new = np.abs(got - ref).max() / scale_ref
        err_old = np.abs(old - ref).max() / scale_ref
        # Rounding-level: as accurate as jax.scipy's Padé (within a small factor), and
        # absolutely small where few squarings are needed.
        assert err_new <= 4 * err_old + 2e-6 * max(1.0, np.abs(M).sum(0).max()), (err_new, err_old)


def test_float32_expm_exact_cases_and_limits():
    for d in (1, 2, 5):
        z = jnp.zeros((d, d), jnp.float32)
        np.testing.assert_array_equal(_fields.expm(z), np.eye(d))  # V = I: S = I exactly
    D = jnp.diag(jnp.asarray([0.0, -1.0, -80.0], jnp.float32))  # 8 squarings
    ref = np.diag(np.exp([0.0, -1.0, -80.0]))
    err = np.abs(np.asarray(_fields.expm(D), np.float64) - ref) / np.maximum(ref, 1e-300)
    err_jsl = np.abs(np.asarray(jsl.expm(D), np.float64) - ref) / np.maximum(ref, 1e-300)
    assert np.all(err[ref > 0] <= 2 * err_jsl[ref > 0] + 2e-5), (err, err_jsl)
    # Beyond the squaring budget: NaN, like jax.scipy.linalg.expm.
    big = jnp.asarray([[0.0, 1e6], [0.0, 0.0]], jnp.float32)
    assert bool(jnp.all(jnp.isnan(_fields.expm(big))))
    assert bool(jnp.all(jnp.isnan(jsl.expm(big))))
    # float64 keeps jax.scipy's algorithm bit for bit.
    M = _rand((4, 4), 3)
    np.testing.assert_array_equal(_fields.expm(M), jsl.expm(M))


def test_float32_expm_gradient_matches_jsl():
    M = _rand((3, 3), 7, 0.7, jnp.float32)
    W = _rand((3, 3), 8, 1.0, jnp.float32)
    g_new = jax.grad(lambda M: jnp.sum(W * _fields.expm(M)))(M)
    g_old = jax.grad(lambda M: jnp.sum(W * jsl.expm(M)))(M)
    np.testing.assert_allclose(g_new, g_old, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ fields
def _textbook(field, t, z):
    """The field as docs/theory.md writes it: separate projections, jsl.expm, P @ v."""
    Q, K, V = (field.weight(w) for w in "QKV")
    if field.dynamics == "rescaled":
        c = jnp.linalg.eigvalsh(0.5 * (V + V.T))[-1]
        S = jsl.expm(t * (V - c * jnp.eye(V.shape[0], dtype=V.dtype)))
        x, log_scale = z @ S.T, 2.0 * c * t
    else:
        x, log_scale = z, 0.0
    P = _attention.softmax_weights((x @ Q.T) @ (x @ K.T).T, field.beta, log_scale)
    if field.dynamics == "usa":
        P = _attention.unnormalised_weights((x @ Q.T) @ (x @ K.T).T, field.beta)
    vz = z @ V.T
    out = P @ vz
    if field.dynamics == "rescaled":
        return out - vz
    if field.dynamics in ("sphere", "usa"):
        return out - jnp.sum(z * out, -1, keepdims=True) * z
    return out


def _lora(d, target, seed):
    return ja.LoRA(_rand((1, d), seed, 0.3), _rand((d, 1), seed + 1, 0.3), 1.0, target)


# Every pair of (dynamics, size) — n ≤ 2d and n > 2d take different paths — with the
# dtype alternating, so each dynamics and each size meets both dtypes (pairwise coverage).
_FOLDED_CASES = [
    pytest.param(
        dyn,
        n,
        d,
        [jnp.float32, jnp.float64][(i + j) % 2],
        id=f"{dyn}-{n}-{d}-{'f32' if (i + j) % 2 == 0 else 'f64'}",
    )
    for i, dyn in enumerate(["rescaled", "plain", "sphere", "usa"])
    for j, (n, d) in enumerate([(3, 4), (9, 4), (40, 3)])
]


@pytest.mark.parametrize("dynamics,n,d,dtype", _FOLDED_CASES)
def test_folded_logits_match_textbook(dynamics, n, d, dtype):
    Q, K = _rand((d, d), 1, 0.5), _rand((d, d), 2, 0.5)
    V = jnp.eye(d) + _rand((d, d), 3, 0.2)
    z = _rand((n, d), 4, 0.7)
    if dynamics in ("sphere", "usa"):
        z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    tol = 2e-5 if dtype == jnp.float32 else 1e-12
    for lora in (
        None,
        _lora(d, "Q", 5),
        _lora(d, "K", 6),
        _lora(d, "V", 7),
        [_lora(d, "Q", 8), _lora(d, "K", 9), _lora(d, "V", 10)],
    ):
        f = ja.make_field(dynamics, Q, K, V, beta=1.3, lora=lora, dtype=dtype)
        zz = z.astype(dtype)
        for t in (0.0, 0.37, 3.0):
            t = jnp.asarray(t, dtype)
            ref = _textbook(f, t, zz)
            for got in (f(t, zz), f(t, zz, f.solve_args())):
                np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_dense_kernel_normalised_after_the_product(kernel):
    q, k, v = _rand((7, 3), 1), _rand((5, 3), 2), _rand((5, 4), 3)
    for log_scale in (0.0, 2.5, 1e4):
        P = _attention.softmax_weights(q @ k.T, 0.8, log_scale)
        got = _attention.attend(q, k, v, 0.8, log_scale, kernel=kernel, block=2)
        np.testing.assert_allclose(got, P @ v, rtol=1e-12, atol=1e-13)
    U = _attention.unnormalised_weights(q @ k.T, 0.8)
    got = _attention.attend(q, k, v, 0.8, kernel=kernel, block=2, normalise=False)
    np.testing.assert_allclose(got, U @ v, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------ simulate
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("t0,t1,dt", [(0.0, 1.0, 0.1), (0.3, 2.05, 0.25), (0.0, 0.5, 0.01)])
def test_fixed_steps_land_exactly_on_the_grid(t0, t1, dt, dtype):
    f = ja.RescaledField(d=2, dtype=dtype)
    x0 = _rand((4, 2), 0).astype(dtype)
    sol = ja.simulate(f, x0, t1, t0=t0, dt=dt, summary=lambda t, x: t)
    grid = np.asarray(_options.fixed_step_grid(t0, t1, dt), dtype)
    np.testing.assert_array_equal(np.asarray(sol.xs), grid)  # diffrax's own step times
    np.testing.assert_array_equal(np.asarray(sol.ts), grid)
    assert int(sol.num_steps) == grid.size - 1
    # The cached constants equal a fresh jnp.asarray, and a different grid is not stale.
    np.testing.assert_array_equal(_options.const(grid, dtype), jnp.asarray(grid, dtype))
    other = ja.simulate(f, x0, t1, t0=t0, dt=dt / 2, summary=lambda t, x: t)
    np.testing.assert_array_equal(
        np.asarray(other.xs), np.asarray(_options.fixed_step_grid(t0, t1, dt / 2), dtype)
    )


def test_const_cache_never_holds_tracers():
    @jax.jit
    def g(x):
        return _options.const(np.asarray([1.25, 2.5]), jnp.float32) * x

    np.testing.assert_array_equal(g(jnp.float32(2.0)), [2.5, 5.0])
    assert not any(isinstance(v, jax.core.Tracer) for v in _options._CONST_CACHE.values())


def test_rescaled_float32_finite_at_t_1000():
    f = ja.RescaledField(V=jnp.diag(jnp.asarray([1.0, 0.999])), dtype=jnp.float32)
    x0 = jax.random.uniform(jax.random.key(0), (10, 2), jnp.float32, -5.0, 5.0)
    sol = ja.simulate(f, x0, 1000.0, dt=0.5, ts=[0.0, 500.0, 1000.0])
    assert sol.ok and bool(jnp.all(jnp.isfinite(sol.xs)))
    F = f(jnp.float32(1000.0), sol.final)
    assert bool(jnp.all(jnp.isfinite(F)))


def test_float32_simulate_matches_textbook_rk4():
    """The whole float32 solve against RK4 of the textbook field, step by step."""
    d, n, dt, steps = 3, 12, 0.05, 20
    V = jnp.eye(d) + _rand((d, d), 3, 0.3)
    f = ja.RescaledField(
        _rand((d, d), 1, 0.6),
        _rand((d, d), 2, 0.6),
        V,
        beta=1.5,
        lora=_lora(d, "V", 4),
        dtype=jnp.float32,
    )
    x0 = _rand((n, d), 5).astype(jnp.float32)
    got = ja.simulate(f, x0, dt * steps, dt=dt).final
    g = lambda t, z: _textbook(f, jnp.asarray(t, jnp.float32), z)
    z, t = x0, 0.0
    for _ in range(steps):
        k1 = g(t, z)
        k2 = g(t + dt / 2, z + dt / 2 * k1)
        k3 = g(t + dt / 2, z + dt / 2 * k2)
        k4 = g(t + dt, z + dt * k3)
        z, t = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + dt
    np.testing.assert_allclose(got, z, rtol=2e-5, atol=2e-5)


# In the slow suite: the fast suite checks the adjoints' float64 gradients against
# finite differences (test_sensitivity.py, pairwise) and the batch gradient against the
# sum of single solves (below); float32 agreement is this test's own case.
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gradients_agree_across_adjoints(dtype):
    d = 3
    x0 = _rand((6, d), 0, 0.8).astype(dtype)

    def loss(A, adjoint):
        lo = ja.LoRA(A, jnp.ones((d, 1), dtype) * 0.2, 1.0, "V")
        f = ja.RescaledField(
            d=d, lora=[lo, ja.LoRA(A, jnp.ones((d, 1), dtype) * 0.1, 1.0, "Q")], dtype=dtype
        )
        return jnp.sum(ja.simulate(f, x0, 0.5, dt=0.05, ts=[0.5], adjoint=adjoint).final ** 2)

    A = jnp.asarray([[0.3, -0.2, 0.1]], dtype)
    # Fixed-step backsolve walks back with constant steps (as `_sensitivity` sets it up).
    back = diffrax.BacksolveAdjoint(stepsize_controller=diffrax.ConstantStepSize(), dt0=-0.05)
    grads = {
        "checkpoint": jax.grad(loss)(A, "checkpoint"),
        "backsolve": jax.grad(loss)(A, back),
        "forward": jax.jacfwd(loss)(A, "forward"),
    }
    eps = 1e-3 if dtype == jnp.float32 else 1e-6
    fd = loss(A.at[0, 0].add(eps), "checkpoint") - loss(A.at[0, 0].add(-eps), "checkpoint")
    fd = fd / (2 * eps)
    tol = 2e-3 if dtype == jnp.float32 else 1e-6
    for g in grads.values():
        assert bool(jnp.all(jnp.isfinite(g)))
        np.testing.assert_allclose(g, grads["checkpoint"], rtol=tol, atol=tol)
    np.testing.assert_allclose(grads["checkpoint"][0, 0], fd, rtol=20 * tol, atol=20 * tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_batches_equal_member_by_member(dtype):
    d = 2
    norms = jnp.asarray([0.0, 0.1, 0.3])
    los = [
        ja.LoRA.random(d, rank=1, norm=norms, key=jax.random.key(1), target=t) for t in ("V", "Q")
    ]
    x0 = jnp.stack([_rand((5, d), s, 0.8) for s in range(2)]).astype(dtype)
    f = ja.RescaledField(d=d, dtype=dtype).with_lora(los)
    sol = ja.simulate(f, x0, 0.6, dt=0.1)
    assert sol.xs.shape == (3, 2, 7, 5, d)
    for i in range(3):
        member = [ja.LoRA(lo.A[i], lo.B[i], lo.alpha, lo.target) for lo in los]
        fi = ja.RescaledField(d=d, dtype=dtype).with_lora(member)
        for j in range(2):
            one = ja.simulate(fi, x0[j], 0.6, dt=0.1)
            tol = 1e-5 if dtype == jnp.float32 else 1e-12
            np.testing.assert_allclose(sol.xs[i, j], one.xs, rtol=tol, atol=tol)


def test_logit_matrix_of_a_stacked_field_is_per_member():
    # `A = Qᵀ K` of a field with a stacked LoRA on Q: one matrix per member, each equal to
    # the A of the field with that member's LoRA alone (a plain `.T` would transpose the
    # batch axis too).
    import jax as _jax
    import jax.numpy as _jnp
    import numpy as _np

    import jaxattn as _ja

    rng = _np.random.default_rng(11)
    Q, K = (_jnp.asarray(rng.normal(size=(3, 3))) for _ in range(2))
    lora = _ja.LoRA.random(
        3, rank=1, norm=_jnp.asarray([0.1, 0.5, 0.9]), target="Q", key=_jax.random.key(0)
    )
    f = _ja.PlainField(Q, K, None, lora=lora)
    assert f.A.shape == (3, 3, 3)
    for b in range(3):
        one = _ja.LoRA(lora.A[b], lora.B[b], lora.alpha, "Q")
        _np.testing.assert_allclose(
            f.A[b], _ja.PlainField(Q, K, None, lora=one).A, rtol=1e-14, atol=1e-14
        )


def _members_case(dyn, dtype, d=3):
    rng = np.random.default_rng(4)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 6, d)), dtype)
    lo = ja.LoRA.random(d, rank=1, norm=jnp.asarray([0.1, 0.3]), key=jax.random.key(1), target="V")
    base = ja.make_field(dyn, d=d, beta=1.2, dtype=dtype)
    members = [base.with_lora(ja.LoRA(lo.A[i], lo.B[i], lo.alpha, "V")) for i in range(2)]
    return x0, base.with_lora(lo), members


_HOWS = {"final": {}, "ts": {"ts": [0.05, 0.33, 0.7]}, "summary": {"summary": "mean"}}
# Every pair of (dynamics, output) with the dtype alternating: each dynamics and each
# output meets both dtypes (pairwise coverage; each case compiles three solves).
_MEMBER_CASES = [
    pytest.param(
        dyn,
        [jnp.float32, jnp.float64][(i + j) % 2],
        how,
        id=f"{dyn}-{name}-{'f32' if (i + j) % 2 == 0 else 'f64'}",
    )
    for i, dyn in enumerate(["rescaled", "sphere", "plain", "usa"])
    for j, (name, how) in enumerate(_HOWS.items())
]


@pytest.mark.parametrize("dyn,dtype,how", _MEMBER_CASES)
def test_fixed_step_batches_equal_a_loop_of_single_solves(dyn, dtype, how):
    # A batch with fixed steps is one solve of the stacked state; each member's arithmetic
    # is that of its own solve, but XLA may vectorise the batched products differently
    # from a single solve's, which can move the last bit (seen in both dtypes): 1e-12 in
    # float64 (≈ 5000 ulp, far below any modelling difference), a few float32 ulp of the
    # state's scale after 7 steps.
    x0, stacked, members = _members_case(dyn, dtype)
    kw = dict(how)
    if "summary" in kw:
        kw["summary"] = lambda t, x: {"mean": jnp.mean(x, axis=0), "t": t}
    run = lambda f, x: ja.simulate(f, x, 0.7, dt=0.1, **kw)
    both, only_x = run(stacked, x0), run(members[0], x0)
    leaves = lambda s: jax.tree.leaves(s.xs)

    def same(a, b):
        scale = max(1.0, float(jnp.max(jnp.abs(b))))
        tol = 1e-12 if dtype == jnp.float64 else 16 * float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)

    for j in range(4):
        one = run(members[0], x0[j])
        for a, b in zip(leaves(only_x), leaves(one)):
            same(a[j], b)
        for i in range(2):
            one = run(members[i], x0[j])
            for a, b in zip(leaves(both), leaves(one)):
                same(a[i, j], b)
            assert int(both.status[i, j]) == int(one.status) == _simulate.STATUS_OK
            assert int(both.num_steps[i, j]) == int(one.num_steps) == 7
            if one.norm_drift is not None and "summary" not in kw:
                np.testing.assert_allclose(
                    both.norm_drift[i, j],
                    one.norm_drift,
                    rtol=0,
                    atol=4 * float(jnp.finfo(dtype).eps),
                )


def test_fixed_step_batch_keeps_per_member_status():
    # One member blows up (β huge on a plain field with an expanding V): it alone is
    # flagged non-finite, the others equal their single solves.
    d = 2
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 5, d)))
    x0 = x0.at[1].multiply(1e200)
    f = ja.PlainField(V=4.0 * jnp.eye(d))
    sol = ja.simulate(f, x0, 2.0, dt=0.5)
    assert sol.status.tolist() == [
        _simulate.STATUS_OK,
        _simulate.STATUS_NONFINITE,
        _simulate.STATUS_OK,
    ]
    for j in (0, 2):
        np.testing.assert_array_equal(sol.xs[j], ja.simulate(f, x0[j], 2.0, dt=0.5).xs)


# The default adjoint here; the other two in the slow suite (each is a new gradient
# program of a batched solve, ~10 s of compilation).
@pytest.mark.parametrize(
    "adjoint",
    [
        "checkpoint",
        pytest.param("backsolve", marks=pytest.mark.slow),
        pytest.param("forward", marks=pytest.mark.slow),
    ],
)
def test_fixed_step_batch_gradients_equal_the_sum_of_single_solves(adjoint):
    x0, _, _ = _members_case("rescaled", jnp.float64)

    def loss(beta, x):
        f = ja.RescaledField(d=3, beta=beta)
        return jnp.sum(ja.simulate(f, x, 0.5, dt=0.1, adjoint=adjoint).final ** 2)

    diff = jax.jacfwd if adjoint == "forward" else jax.grad
    beta = jnp.asarray(1.1)
    g_batch = diff(loss)(beta, x0)
    g_loop = sum(diff(loss)(beta, x0[j]) for j in range(4))
    np.testing.assert_allclose(g_batch, g_loop, rtol=1e-12)
