"""Distances between token clouds, nested initial measures, ladders in n and the
Wasserstein stability bound (docs/mean_field.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unchecked
from scipy.optimize import linear_sum_assignment

import jaxattn as ja


def _w2_scipy(x, y):
    """Independent reference: exact W2 by SciPy's assignment in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    C = np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    r, c = linear_sum_assignment(C)
    return float(np.sqrt(C[r, c].mean()))


def _cloud(seed, n, d, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)) + shift)


# -- exact W2 ------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(1, 2), (7, 1), (40, 2), (25, 5)])
def test_exact_w2_matches_scipy(n, d):
    x, y = _cloud(0, n, d), _cloud(1, n, d, 0.4)
    assert abs(float(ja.wasserstein2(x, y)) - _w2_scipy(x, y)) < 1e-12


def test_exact_w2_closed_forms():
    # Two Diracs: W2 = distance.
    assert float(ja.wasserstein2(jnp.asarray([[0.0, 0.0]]), jnp.asarray([[3.0, 4.0]]))) == 5.0
    # A translated cloud: W2 = |shift| (for the squared cost translations split off).
    x = _cloud(2, 30, 3)
    shift = jnp.asarray([0.3, -1.2, 0.5])
    assert abs(float(ja.wasserstein2(x, x + shift[None])) - float(jnp.linalg.norm(shift))) < 1e-12
    # A permutation of the same cloud is the same measure.
    assert float(ja.wasserstein2(x, x[::-1])) == 0.0


def test_exact_w2_jit_vmap_equals_loop():
    xs = jnp.stack([_cloud(s, 12, 2) for s in range(4)])
    ys = jnp.stack([_cloud(10 + s, 12, 2) for s in range(4)])
    batched = jax.jit(jax.vmap(ja.wasserstein2))(xs, ys)
    loop = [_w2_scipy(a, b) for a, b in zip(xs, ys)]
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=0, atol=1e-12)


def test_exact_w2_gradient_matches_finite_differences():
    x, y = _cloud(3, 10, 2), _cloud(4, 10, 2, 0.5)
    g = jax.grad(ja.wasserstein2)(x, y)
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.normal(size=x.shape))
    h = 1e-6  # small enough to keep the (generically unique) assignment fixed
    fd = (float(ja.wasserstein2(x + h * v, y)) - float(ja.wasserstein2(x - h * v, y))) / (2 * h)
    assert abs(float(jnp.sum(g * v)) - fd) < 1e-7


def test_line_w2_matches_sorting_and_quantiles():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=50), rng.normal(size=50) + 1.0
    ref = np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
    assert abs(float(ja.wasserstein2_line(jnp.asarray(x), jnp.asarray(y))) - ref) < 1e-12
    # Different sizes: y3 = y repeated 3 times is the same measure as y.
    y3 = np.repeat(y, 3)
    assert abs(float(ja.wasserstein2_line(jnp.asarray(x), jnp.asarray(y3))) - ref) < 1e-12
    # Weighted: two atoms of mass (0.25, 0.75) at 0 and 1 against one atom at 1:
    # W2² = 0.25·1².
    w = ja.wasserstein2_line(jnp.asarray([0.0, 1.0]), jnp.asarray([1.0]), jnp.asarray([0.25, 0.75]))
    assert abs(float(w) - 0.5) < 1e-15


def test_sliced_w2_properties():
    x, y = _cloud(6, 64, 3), _cloud(7, 64, 3, 0.3)
    key = jax.random.key(1)
    sliced = jax.jit(lambda x, y: ja.sliced_wasserstein2(x, y, key=key, n_projections=4000))
    sw = float(sliced(x, y))
    assert 0.0 < sw <= _w2_scipy(x, y) + 1e-12  # SW2 ≤ W2 for every direction set
    assert float(sliced(x, x[::-1])) == 0.0
    # Translation: every slice sees a shift ⟨θ, s⟩, so SW2² = E⟨θ, s⟩² = |s|²/d in
    # expectation; with 4000 directions the Monte-Carlo error is ~1 % (sd of ⟨θ,e⟩² is
    # 0.30 for d = 3, over √4000).
    s = jnp.asarray([1.0, 0.0, 0.0])
    assert abs(float(sliced(x, x + s[None])) ** 2 - 1.0 / 3.0) < 0.02
    # Same key, same number; eager equals jitted.
    assert float(ja.sliced_wasserstein2(x, y, key=key, n_projections=4000)) == pytest.approx(
        sw, rel=1e-12
    )


def test_sliced_w2_in_groups_of_projections_equals_all_at_once(monkeypatch):
    # Large clouds sort their projections in groups (memory O(n + m) at any number of
    # projections); forcing groups of 3 on a small cloud must give the same number.
    import jaxattn._analysis.wasserstein as W

    x, y = _cloud(6, 20, 3), _cloud(7, 13, 3, 0.3)
    key = jax.random.key(2)
    whole = float(ja.sliced_wasserstein2(x, y, key=key, n_projections=10))
    monkeypatch.setattr(W, "SLICED_GROUP_ENTRIES", 3 * 33)
    grouped = float(ja.sliced_wasserstein2(x, y, key=key, n_projections=10))
    assert grouped == pytest.approx(whole, rel=1e-14, abs=0)
    # NaN stays NaN through the grouped path under jit as well
    sw = jax.jit(lambda u: ja.sliced_wasserstein2(u, y, key=key, n_projections=10))
    assert bool(jnp.isnan(sw(x.at[0, 0].set(jnp.nan))))


def test_transport_sizes_are_checked_before_allocating(monkeypatch):
    # Before: exact W2 of 20,000 points and sliced W2 of 2·10⁶ failed inside XLA
    # ("Error dispatching computation"), Sinkhorn ran on with no estimate.
    big = jnp.zeros((10_001, 2))
    with pytest.raises(ValueError, match=r"exact W2 of 10001 points needs an O\(n³\)"):
        ja.wasserstein2(big, big)
    with pytest.raises(ValueError, match="over max_points = 10000"):
        ja.optimal_assignment(big, big)
    x, y = _cloud(0, 300, 2), _cloud(1, 300, 2)
    monkeypatch.setenv("JAXATTN_MAX_MEMORY", "1M")
    with pytest.raises(ValueError, match=r"exact W2 of 300 points in d = 2 needs 3\.43 MiB"):
        ja.wasserstein2(x, y)
    with pytest.raises(ValueError, match="entropic OT of 300 and 300 points"):
        ja.entropic_ot(x, y)
    with pytest.raises(ValueError, match="Sinkhorn divergence of 300 and 300 points"):
        ja.sinkhorn_divergence(x, y)
    monkeypatch.setenv("JAXATTN_MAX_MEMORY", "10K")
    with pytest.raises(ValueError, match="sliced W2 of 300 and 300 points"):
        ja.sliced_wasserstein2(x, y, key=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size must be"):
        ja.entropic_ot(x, y, batch_size=0)


# -- entropic OT through OTT-JAX -----------------------------------------------------
def test_distances_of_unmeasurable_input_are_nan_under_jit_and_vmap():
    # Before the fix, a NaN (or inf) point gave a distance of exactly 0 under jit/vmap
    # (where the eager check cannot look): the square root mapped NaN to 0.
    x, y = _cloud(0, 5, 2), _cloud(1, 6, 2)
    xn = x.at[2, 0].set(jnp.nan)
    sw = jax.jit(lambda u, v: ja.sliced_wasserstein2(u, v, n_projections=8, key=jax.random.key(0)))
    both = jax.vmap(sw, in_axes=(0, None))(jnp.stack([x, xn]), y)
    assert float(both[0]) > 0 and bool(jnp.isnan(both[1]))
    assert bool(jnp.isnan(sw(xn, y)))
    line = jax.jit(ja.wasserstein2_line)
    ref = line(jnp.asarray([0.0, 1.0]), jnp.asarray([0.0, 2.0]))
    assert float(ref) == pytest.approx(np.sqrt(0.5), rel=1e-14)
    for bad in (jnp.nan, jnp.inf):
        assert bool(jnp.isnan(line(jnp.asarray([0.0, 1.0, bad]), jnp.asarray([0.0, 2.0]))))
    w2 = jax.jit(ja.wasserstein2)  # SciPy raised "infeasible" inside the callback
    vals = jax.vmap(w2, in_axes=(0, None))(jnp.stack([x[:5], xn[:5]]), y[:5])
    assert float(vals[0]) > 0 and bool(jnp.isnan(vals[1]))
    assert not np.isfinite(float(w2(x[:5].at[0, 1].set(jnp.inf), y[:5])))
    geo = jax.jit(ja.geodesic_distance)
    assert bool(jnp.isnan(geo(jnp.asarray([jnp.nan, 0.0]), jnp.asarray([1.0, 0.0]))))
    assert float(geo(jnp.asarray([1.0, 0.0]), jnp.asarray([1.0, 0.0]))) == 0.0


def test_unconverged_sinkhorn_is_nan_and_says_so():
    x, y = _cloud(0, 6, 2), _cloud(1, 5, 2, shift=1.0)
    for fn in (ja.entropic_ot, ja.sinkhorn_divergence):
        with pytest.warns(RuntimeWarning, match="did not converge within max_iterations = 1"):
            v = fn(x, y, epsilon=1e-4, max_iterations=1)
        assert bool(jnp.isnan(v))


def test_sinkhorn_divergence_tends_to_w2_squared_and_vmaps():
    n = 30
    x, y = _cloud(8, n, 2), _cloud(9, n, 2, 0.7)
    w2sq = _w2_scipy(x, y) ** 2
    eps = jnp.asarray([0.3, 0.1, 0.05])
    # One compiled solve vmapped over ε (the check on ε is skipped for traced values).
    s = np.asarray(
        jax.jit(
            jax.vmap(
                lambda e: ja.sinkhorn_divergence(
                    x, y, epsilon=e, threshold=1e-5, max_iterations=20_000
                )
            )
        )(eps)
    )
    # W2² ≤ OT_ε ≤ W2² + ε·log n (the optimal permutation has KL = log n) and
    # 0 ≤ OT_ε(μ, μ) ≤ ε·log n, so |S_ε − W2²| ≤ ε·log n; 1e-3 covers the stopping
    # rule (marginal error 1e-5 in ℓ1 times dual potentials of order 10).
    assert np.all(np.abs(s - w2sq) <= np.asarray(eps) * np.log(n) + 1e-3)
    assert abs(s[-1] - w2sq) < abs(s[0] - w2sq)  # closer as ε decreases


@pytest.mark.slow
def test_sinkhorn_sizes_weights_and_gradient():
    # Weighted Diracs on the line: 0.5δ_0 + 0.5δ_2 against δ_1, W2² = 1. With one target
    # point the plan is forced (KL = 0): OT_ε = 1 exactly, and OT_ε(ν, ν) = 0, while
    # OT_ε(μ, μ) ∈ [0, ε log 2]: |S_ε − 1| ≤ ε log 2 / 2.
    a = jnp.asarray([0.5, 0.5])
    xs, y = jnp.asarray([[0.0], [2.0]]), jnp.asarray([[1.0]])
    s = ja.sinkhorn_divergence(xs, y, a, epsilon=0.1, threshold=1e-8)
    assert abs(float(s) - 1.0) <= 0.1 * np.log(2) / 2 + 1e-6
    # Gradient against central finite differences, clouds of different sizes.
    x, y = _cloud(11, 8, 2), _cloud(12, 6, 2, 0.5)
    f = jax.jit(
        lambda x: ja.sinkhorn_divergence(x, y, epsilon=0.5, threshold=1e-10, max_iterations=20_000)
    )
    g = jax.grad(f)(x)
    v = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    h = 1e-5
    fd = (float(f(x + h * v)) - float(f(x - h * v))) / (2 * h)
    assert abs(float(jnp.sum(g * v)) - fd) < 1e-5 * max(1.0, abs(fd))


@pytest.mark.slow
def test_sinkhorn_row_blocks_match_dense():
    # The row-blocked geometry (used automatically for large clouds) gives the same
    # divergence as the dense one, to the solver's tolerance.
    x, y = _cloud(15, 40, 2), _cloud(16, 24, 2, 0.3)
    dense = float(ja.sinkhorn_divergence(x, y, epsilon=0.2, threshold=1e-9))
    blocked = float(ja.sinkhorn_divergence(x, y, epsilon=0.2, threshold=1e-9, batch_size=16))
    assert abs(dense - blocked) < 1e-9


# -- the sphere ----------------------------------------------------------------------
def test_geodesic_cost_on_the_sphere():
    x = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = jnp.asarray([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # antipodal, orthogonal
    np.testing.assert_allclose(
        np.asarray(ja.geodesic_distance(x, y)), [np.pi, np.pi / 2], atol=1e-15
    )
    u = np.array(_cloud(13, 15, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.array(_cloud(14, 15, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    C = np.arccos(np.clip(u @ v.T, -1.0, 1.0)) ** 2  # the arccos form, independently
    r, c = linear_sum_assignment(C)
    ref = np.sqrt(C[r, c].mean())
    assert (
        abs(float(ja.wasserstein2(jnp.asarray(u), jnp.asarray(v), cost="geodesic")) - ref) < 1e-10
    )
    # Geodesic ≥ chordal, and ≤ π/2 · chordal.
    chord = _w2_scipy(u, v)
    assert chord <= ref <= np.pi / 2 * chord
    s = float(
        ja.sinkhorn_divergence(
            jnp.asarray(u),
            jnp.asarray(v),
            cost="geodesic",
            epsilon=0.05,
            threshold=1e-6,
            max_iterations=50_000,
        )
    )
    assert abs(s - ref**2) <= 0.05 * np.log(15) + 1e-4


# -- bad input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ja.wasserstein2(jnp.ones((3, 2)), jnp.ones((3, 3))), "different dimensions"),
        (lambda: ja.wasserstein2(jnp.ones((3, 2)), jnp.ones((4, 2))), "same size"),
        (lambda: ja.wasserstein2(jnp.ones((0, 2)), jnp.ones((0, 2))), "empty"),
        (lambda: ja.wasserstein2(jnp.asarray([[np.nan, 0.0]]), jnp.ones((1, 2))), "NaN"),
        (
            lambda: ja.sinkhorn_divergence(
                jnp.ones((2, 1)), jnp.ones((1, 1)), jnp.asarray([1.5, -0.5])
            ),
            "negative",
        ),
        (
            lambda: ja.sinkhorn_divergence(
                jnp.ones((2, 1)), jnp.ones((1, 1)), jnp.asarray([0.5, 0.6])
            ),
            "sum to",
        ),
        (
            lambda: ja.sinkhorn_divergence(jnp.ones((2, 1)), jnp.ones((1, 1)), jnp.asarray([1.0])),
            "shape",
        ),
        (
            lambda: ja.sinkhorn_divergence(jnp.ones((2, 1)), jnp.ones((1, 1)), epsilon=-1.0),
            "epsilon",
        ),
        (
            lambda: ja.wasserstein2(jnp.ones((2, 2)), jnp.ones((2, 2)), cost="geodesic"),
            "unit sphere",
        ),
        (lambda: ja.wasserstein2(jnp.ones((2, 2)), jnp.ones((2, 2)), cost="manhattan"), "cost"),
        (lambda: ja.wasserstein2(jnp.ones(3), jnp.ones(3)), r"\(n, d\)"),
        (lambda: ja.wasserstein2_line(jnp.ones((3, 2)), jnp.ones((3, 2))), "line"),
        # Complex points lost their imaginary part, half precision failed deep in SciPy/OTT.
        (lambda: ja.wasserstein2(jnp.ones((2, 2), jnp.complex128), jnp.ones((2, 2))), "real array"),
        (
            lambda: ja.sinkhorn_divergence(jnp.ones((2, 2)), jnp.ones((2, 2), jnp.complex128)),
            "real array",
        ),
        (
            lambda: ja.wasserstein2(jnp.ones((2, 2), jnp.float16), jnp.ones((2, 2))),
            "float32 or float64",
        ),
        (
            lambda: ja.sinkhorn_divergence(jnp.ones((2, 2)), jnp.ones((2, 2), jnp.bfloat16)),
            "float32 or float64",
        ),
        # Truncated silently before; overflowing costs failed inside SciPy or gave NaN.
        (lambda: ja.entropic_ot(jnp.ones((2, 2)), jnp.ones((2, 2)), max_iterations=2.7), "integer"),
        (
            lambda: ja.sliced_wasserstein2(
                jnp.ones((2, 2)), jnp.ones((2, 2)), n_projections=2.5, key=jax.random.key(0)
            ),
            "integer",
        ),
        (lambda: ja.wasserstein2(jnp.ones((2, 2)) * 1e160, -jnp.ones((2, 2))), "overflow"),
        (lambda: ja.sinkhorn_divergence(jnp.ones((2, 2)) * 1e160, jnp.ones((2, 2))), "overflow"),
        # the size is reported without overflowing itself (it said "norm up to inf")
        (lambda: ja.wasserstein2(jnp.ones((2, 2)) * 1e300, jnp.ones((2, 2))), r"up to 1\.41e\+300"),
    ],
)
def test_bad_input_is_one_line_value_error(call, match):
    # the functions' own checks (some inputs are already refused by the annotated shapes)
    with unchecked(), pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# -- initial measures and ladders ------------------------------------------------------
@pytest.mark.parametrize(
    "measure",
    [
        ja.InitialMeasure.uniform(2, -1.0, 1.0),
        ja.InitialMeasure.gaussian(3, mean=[1.0, 0.0, 0.0], std=0.5),
        ja.InitialMeasure.sphere(3),
        ja.InitialMeasure.mixture(
            [ja.InitialMeasure.gaussian(2, -2.0, 0.1), ja.InitialMeasure.gaussian(2, 2.0, 0.1)],
            [0.25, 0.75],
        ),
    ],
)
def test_samples_are_nested_and_seeded(measure):
    key = jax.random.key(7)
    big = np.asarray(measure.sample(key, 4000))
    small = np.asarray(measure.sample(key, 100))
    # Same μ0 at every n (up to the last bit: XLA may vectorise differently by size).
    np.testing.assert_allclose(big[:100], small, rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(measure.sample(key, 100)), small)
    assert not np.array_equal(np.asarray(measure.sample(jax.random.key(8), 100)), small)
    assert big.shape == (4000, measure.d) and np.all(np.isfinite(big))
    if measure.kind == "uniform":
        assert big.min() >= -1.0 and big.max() <= 1.0
        assert abs(big.mean()) < 0.05 and abs(big.var() - 1.0 / 3.0) < 0.03
    if measure.kind == "sphere":
        np.testing.assert_allclose(np.linalg.norm(big, axis=1), 1.0, atol=1e-14)
        assert np.all(np.abs(big.mean(axis=0)) < 0.05)
    if measure.kind == "gaussian":
        np.testing.assert_allclose(big.mean(axis=0), [1.0, 0.0, 0.0], atol=0.05)
        np.testing.assert_allclose(big.std(axis=0), 0.5, atol=0.03)
    if measure.kind == "mixture":  # 4000 draws: the fraction near +2 is 0.75 ± 0.02
        assert abs(np.mean(big[:, 0] > 0) - 0.75) < 0.03


def test_bad_measures():
    with pytest.raises(ValueError, match="low < high"):
        ja.InitialMeasure.uniform(2, 1.0, 0.0)
    with pytest.raises(ValueError, match="summing to 1"):
        ja.InitialMeasure.mixture([ja.InitialMeasure.sphere(2)] * 2, [0.5, 0.6])
    with pytest.raises(ValueError, match="different dimensions"):
        ja.InitialMeasure.mixture([ja.InitialMeasure.sphere(2), ja.InitialMeasure.sphere(3)])


def test_ladder_converges_and_matches_simulate():
    field = ja.SphereField(d=2, beta=1.0)
    measure = ja.InitialMeasure.sphere(2)
    key = jax.random.key(0)
    ts = [0.0, 1.0, 2.0]
    ladder = ja.simulate_ladder(field, measure, [16, 64, 256], 2.0, key=key, ts=ts, dt=0.1)
    # The rung of size 64 is exactly simulate on the first 64 points of the sample.
    direct = ja.simulate(field, measure.sample(key, 64), 2.0, ts=ts, dt=0.1).xs
    np.testing.assert_array_equal(ladder[64], np.asarray(direct))
    ns, W = ja.ladder_distances(ladder, distance="sliced", key=jax.random.key(1))
    assert ns == [16, 64] and W.shape == (2, 3)
    assert np.all(W[1] < W[0])  # more tokens, closer to the reference run
    # The mean-field flow is W-stable: the distance at t = 2 stays within a few times
    # the initial sampling error.
    assert np.all(W[:, -1] < 10 * W[:, 0])


# -- the stability bound -----------------------------------------------------------------
@pytest.mark.parametrize("case", range(6))
def test_wasserstein_bound_dominates_measured(case):
    dyn = ("plain", "rescaled", "sphere")[case % 3]
    rng = np.random.default_rng(100 + case)
    d, n = 2 + case // 3, 8
    Q, K, V = (rng.normal(size=(d, d)) / np.sqrt(d) for _ in range(3))
    f = ja.make_field(dyn, Q, K, V, beta=0.3 + rng.uniform())
    lora = ja.LoRA.random(
        d,
        rank=1,
        norm=10.0 ** rng.uniform(-3, -0.5),
        target="QKV"[(case + case // 3) % 3],
        key=jax.random.key(case),
    )
    fp = f.with_lora(lora)
    x0 = rng.uniform(-1.0, 1.0, size=(n, d))
    # Half of the cases start the perturbed run from a different cloud (W2(μ0, μ̃0) > 0).
    x0p = x0 + (0.05 * rng.normal(size=(n, d)) if case % 2 else 0.0)
    ts = np.linspace(0.0, 1.5, 16)
    xs = np.asarray(ja.simulate(f, x0, 1.5, dt=0.005, ts=ts).xs)
    xsp = np.asarray(ja.simulate(fp, x0p, 1.5, dt=0.005, ts=ts).xs)
    b = ja.wasserstein_bound(f, fp, ts, xs, xsp)
    W = np.asarray([_w2_scipy(a, c) for a, c in zip(xs, xsp)])
    assert abs(b.w0 - W[0]) < 1e-12
    # RK4 with dt = 0.005 is accurate to ~1e-10 here: a slack of 1e-8 covers it.
    assert np.all(W <= b.bound + 1e-8)
    assert np.all(b.bound <= b.dobrushin) and np.all(b.bound <= b.coupling)
    assert np.all(b.dobrushin[1:] >= b.dobrushin[:-1])  # inf ≥ inf holds too
    assert b.bound[1] < np.inf  # informative at short times


def test_wasserstein_bound_rejects_mismatch():
    f = ja.PlainField(d=2)
    with pytest.raises(ValueError, match="output times"):
        ja.wasserstein_bound(f, f, [0.0, 1.0], np.zeros((3, 4, 2)), np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="USA"):
        g = ja.USAField(d=2)
        ja.wasserstein_bound(g, g, [0.0, 1.0], np.ones((2, 4, 2)), np.ones((2, 4, 2)))


def test_sinkhorn_progress_lines(capfd):
    x, y = _cloud(0, 30, 2), _cloud(1, 20, 2, 0.5)
    quiet = ja.entropic_ot(x, y, epsilon=0.05)
    loud = ja.entropic_ot(x, y, epsilon=0.05, progress=True)
    assert float(loud) == float(quiet)
    err = capfd.readouterr().err
    assert "entropic OT: iteration 10 of at most 2000, marginal error" in err, err
    ja.sinkhorn_divergence(x, y, epsilon=0.05, progress=True)
    assert "Sinkhorn divergence: iteration 10" in capfd.readouterr().err
