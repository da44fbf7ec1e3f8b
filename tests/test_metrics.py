"""Cluster and divergence metrics against direct NumPy/SciPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unchecked
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist, directed_hausdorff

import jaxattn as ja


def _rng_tokens(seed, n=12, d=3):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_pairwise_distances_match_scipy():
    x, y = _rng_tokens(0), _rng_tokens(1, n=7)
    np.testing.assert_allclose(
        ja.pairwise_distances(jnp.asarray(x), jnp.asarray(y)), cdist(x, y), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.8, 1.5])
def test_cluster_labels_match_scipy_components(seed, threshold):
    x = _rng_tokens(seed, n=15, d=2)
    k_ref, lab_ref = connected_components(cdist(x, x) <= threshold, directed=False)
    labels = np.asarray(ja.cluster_labels(jnp.asarray(x), threshold))
    assert int(ja.cluster_count(jnp.asarray(x), threshold)) == k_ref
    # Same partition: labels equal iff reference labels equal.
    np.testing.assert_array_equal(
        labels[:, None] == labels[None, :], lab_ref[:, None] == lab_ref[None, :]
    )
    # Label is the smallest index of the component.
    assert all(labels[i] == min(np.nonzero(lab_ref == lab_ref[i])[0]) for i in range(15))


def test_chain_is_one_cluster_and_centres():
    # 0 — 0.09 — 0.18 are linked through the middle token although |0 − 0.18| > 0.1.
    x = jnp.asarray([[0.0, 0.0], [0.09, 0.0], [0.18, 0.0], [5.0, 5.0]])
    assert int(ja.cluster_count(x, 0.1)) == 2
    centres = ja.cluster_centres(x, 0.1)
    np.testing.assert_allclose(sorted(centres[:, 0]), [0.09, 5.0], atol=1e-15)


def test_sphere_cluster_threshold_is_a_chord_between_normalised_tokens():
    a = np.array([1.0, 0.0, 0.0])
    b = 3.0 * np.array([np.cos(0.01), np.sin(0.01), 0.0])  # chord 2 sin(0.005) ≈ 0.01
    c = np.array([0.0, 0.0, 1.0])
    x = jnp.asarray(np.stack([a, b, c]))
    assert int(ja.cluster_count(x, 0.011, sphere=True)) == 2
    assert int(ja.cluster_count(x, 0.009, sphere=True)) == 3
    # 1 − cos ≤ δ is the chord sqrt(2δ): 1 − cos(0.01) ≈ 5e-5
    from jaxattn._analysis.metrics import chord_from_cosine_gap

    assert int(ja.cluster_count(x, chord_from_cosine_gap(6e-5), sphere=True)) == 2
    assert int(ja.cluster_count(x, chord_from_cosine_gap(4e-5), sphere=True)) == 3
    assert chord_from_cosine_gap(0.1) == pytest.approx(np.sqrt(0.2), rel=1e-15)


def _uniform_sphere(rng, n, d=3):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sphere_threshold_does_not_call_random_points_one_cluster():
    """200 uniform points on S² are far from clustered: at the sweep's default
    threshold 0.1 (chord, ≈ 5.7°) they form many components — the same count as the
    Euclidean components of the normalised points; three tight caps give 3."""
    rng = np.random.default_rng(0)
    x = _uniform_sphere(rng, 200)
    k = int(ja.cluster_count(jnp.asarray(x), 0.1, sphere=True))
    assert k > 100
    assert k == connected_components(cdist(x, x) <= 0.1, directed=False)[0]
    # unnormalised input: the sphere metric normalises first
    assert (
        int(ja.cluster_count(jnp.asarray(x * rng.uniform(0.5, 2.0, (200, 1))), 0.1, sphere=True))
        == k
    )
    centres = np.eye(3)
    caps = np.concatenate([c + 0.01 * _uniform_sphere(rng, 60) for c in centres])
    caps = caps / np.linalg.norm(caps, axis=1, keepdims=True)
    assert int(ja.cluster_count(jnp.asarray(caps), 0.1, sphere=True)) == 3


def test_cluster_metrics_vmap_over_time():
    xs = jnp.asarray(np.stack([_rng_tokens(s, n=8, d=2) for s in range(4)]))
    counts = jax.vmap(lambda x: ja.cluster_count(x, 0.7))(xs)
    ref = [connected_components(cdist(x, x) <= 0.7, directed=False)[0] for x in np.asarray(xs)]
    np.testing.assert_array_equal(counts, ref)


def test_hausdorff_two_sided_and_paper_metric_blind_to_merging():
    x, y = _rng_tokens(2, n=9), _rng_tokens(3, n=5)
    ref = max(directed_hausdorff(x, y)[0], directed_hausdorff(y, x)[0])
    assert float(ja.hausdorff(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(ref, rel=1e-12)
    # All tokens merged onto one of two reference clusters: one-sided metric sees 0.
    centres = jnp.asarray([[0.0, 0.0], [3.0, 0.0]])
    merged = jnp.zeros((6, 2))
    assert float(ja.one_sided_distance(merged, centres)) == 0.0
    assert float(ja.hausdorff(merged, centres)) == pytest.approx(3.0)


def test_divergence_is_max_token_distance():
    x, y = _rng_tokens(4), _rng_tokens(5)
    ref = np.max(np.linalg.norm(x - y, axis=1))
    assert float(ja.divergence(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(ref, rel=1e-14)
    xs = jnp.asarray(np.stack([x, y, y]))
    np.testing.assert_allclose(ja.divergence(xs, xs[::-1]), [ref, 0.0, ref], rtol=1e-14)


def test_approach_departure_times_and_nan_handling():
    ts = jnp.linspace(0.0, 9.0, 10)
    dist = jnp.asarray([5, 3, 0.5, 0.05, 0.02, 0.04, 0.2, 0.5, 0.01, 0.3])
    t_app, t_dep = ja.approach_departure(ts, dist, 0.1)
    assert (float(t_app), float(t_dep)) == (3.0, 6.0)
    never = ja.approach_departure(ts, jnp.full((10,), 2.0), 0.1)
    assert np.isinf(never[0]) and np.isinf(never[1])
    # NaN before the departure is never read as "far": the time becomes NaN.
    bad = dist.at[5].set(jnp.nan)
    t_app, t_dep = ja.approach_departure(ts, bad, 0.1)
    assert float(t_app) == 3.0 and np.isnan(t_dep)
    # The eager, checked form raises.
    xs = jnp.zeros((10, 3, 2)).at[4, 0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="NaN or inf"):
        ja.approach_departure_times(ts, xs, jnp.zeros((1, 2)), 0.1)


def test_approach_departure_times_eager():
    ts = jnp.linspace(0.0, 4.0, 5)
    c = jnp.asarray([[0.0, 0.0]])
    xs = jnp.asarray([[[2.0, 0.0]], [[0.05, 0.0]], [[0.0, 0.0]], [[0.5, 0.0]], [[0.0, 0.0]]])
    assert ja.approach_departure_times(ts, xs, c, 0.1) == (1.0, 3.0)
    assert ja.approach_departure_times(ts, xs, c, 0.1, metric="paper") == (1.0, 3.0)
    with pytest.raises(ValueError, match="unknown metric"):
        ja.approach_departure_times(ts, xs, c, 0.1, metric="nope")


def test_booleanness_and_leaders():
    perm = jnp.eye(4)[jnp.asarray([1, 0, 3, 2])]
    assert float(ja.booleanness(perm)) == 0.0
    uniform = jnp.full((4, 4), 0.25)
    assert float(ja.booleanness(uniform)) == 0.25
    P = jnp.asarray([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.4, 0.0, 0.6]])
    np.testing.assert_array_equal(ja.leaders(P), [True, False, True])


def test_energy_support_cosine_pairs():
    x = _rng_tokens(6, n=6, d=3)
    xj = jnp.asarray(x)
    beta = 1.7
    E = np.exp(beta * x @ x.T).sum() / (2 * beta * 36)
    assert float(ja.energy(xj, beta)) == pytest.approx(E, rel=1e-13)
    w = _rng_tokens(7, n=4, d=3)
    np.testing.assert_allclose(ja.support(xj, jnp.asarray(w)), (w @ x.T).max(axis=1), rtol=1e-14)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    G = u @ u.T
    iu = np.triu_indices(6, 1)
    assert float(ja.mean_cosine(xj)) == pytest.approx(G[iu].mean(), rel=1e-12)
    assert float(ja.fraction_close_pairs(xj, 0.5)) == pytest.approx((G[iu] >= 0.5).mean())


def test_metrics_take_leading_batch_axes_like_a_loop_of_single_calls():
    """`(..., n, d)` in, `(...)` (plus the metric's own axes) out: every metric equals a
    Python loop of single calls, jitted too; one configuration broadcasts against a
    batch (fixed centres against a trajectory)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(3, 4, 7, 2)))  # (seeds, T, n, d)
    y = jnp.asarray(rng.normal(size=(3, 4, 5, 2)))
    c = jnp.asarray(rng.normal(size=(5, 2)))
    P = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4, 6, 6))), axis=-1)
    cases = {
        "cluster_count": (lambda x: ja.cluster_count(x, 0.6), (x,)),
        "cluster_count sphere": (lambda x: ja.cluster_count(x, 0.3, sphere=True), (x,)),
        "cluster_labels": (lambda x: ja.cluster_labels(x, 0.6), (x,)),
        "centres": (lambda x: ja.cluster_centres_masked(x, 0.6)[0], (x,)),
        "mask": (lambda x: ja.cluster_centres_masked(x, 0.6)[1], (x,)),
        "pairwise": (ja.pairwise_distances, (x, y)),
        "pairwise self": (ja.pairwise_distances, (x,)),
        "gram": (ja.gram, (x,)),
        "hausdorff": (ja.hausdorff, (x, y)),
        "one_sided": (ja.one_sided_distance, (x, y)),
        "energy": (lambda x: ja.energy(x, 1.3), (x,)),
        "support": (ja.support, (x, y)),
        "fraction_close_pairs": (lambda x: ja.fraction_close_pairs(x, 0.5), (x,)),
        "mean_cosine": (ja.mean_cosine, (x,)),
        "divergence": (ja.divergence, (x, x[::-1])),
        "booleanness": (ja.booleanness, (P,)),
        "leaders": (ja.leaders, (P,)),
    }
    for name, (fn, args) in cases.items():
        batched = np.asarray(fn(*args))
        loop = np.stack(
            [
                np.stack([np.asarray(fn(*(a[i, j] for a in args))) for j in range(4)])
                for i in range(3)
            ]
        )
        assert batched.shape == loop.shape, name
        np.testing.assert_allclose(batched, loop, rtol=1e-13, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(
            np.asarray(jax.jit(fn)(*args)), loop, rtol=1e-13, atol=1e-15, err_msg=name
        )
    # a single configuration broadcasts against the batch
    for fn in (ja.hausdorff, ja.one_sided_distance, ja.support):
        loop = [[np.asarray(fn(x[i, j], c)) for j in range(4)] for i in range(3)]
        np.testing.assert_allclose(fn(x, c), np.asarray(loop), rtol=1e-13)
    # trajectories against their own reference centres, and approach/departure per run
    d = ja.cluster_distance(x, y[:, 0])
    ref = [np.asarray(ja.cluster_distance(x[i], y[i, 0])) for i in range(3)]
    np.testing.assert_allclose(d, np.stack(ref), rtol=1e-13)
    ts = jnp.linspace(0.0, 3.0, 4)
    app, dep = ja.approach_departure(ts, d, 2.0)
    ref = np.asarray([ja.approach_departure(ts, d[i], 2.0) for i in range(3)])
    np.testing.assert_array_equal(np.stack([app, dep], -1), ref)
    with unchecked(), pytest.raises(ValueError, match="one configuration"):
        ja.cluster_centres(x, 0.6)  # annotated (n, d): the type checks would refuse it first
