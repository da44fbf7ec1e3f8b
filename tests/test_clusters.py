"""The cluster statistics of `jaxattn.experiments._clusters` against independent references: SciPy's
convex hull and connected components, the NumPy/SciPy float64 attention of
tests/reference.py, and hand-built token sets whose clusters, leaders and hulls are known.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import rescaled_attention
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull
from scipy.spatial.distance import cdist

from jaxattn.experiments._clusters import (
    attention_matrices,
    cluster_counts_by_rank,
    distance_from_uniform,
    final_motion,
    first_time_above,
    hull_directions,
    hull_vertex_mask,
    leaders_at_extremes,
    offset_from_initial_mean,
    token_set_stats,
)


# -- convex hull ---------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_hull_directions_are_unit_and_include_the_axes(d):
    m = 50
    w = hull_directions(d, m, seed=3)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=0, atol=1e-14)
    if d == 1:
        np.testing.assert_array_equal(w, [[1.0], [-1.0]])
        return
    assert w.shape == (m + 2 * d, d)
    np.testing.assert_array_equal(w[m:], np.concatenate([np.eye(d), -np.eye(d)]))
    np.testing.assert_array_equal(w, hull_directions(d, m, seed=3))  # seeded
    if d == 2:  # evenly spaced angles: consecutive directions 2π/m apart
        cos = np.sum(w[: m - 1] * w[1:m], axis=1)
        np.testing.assert_allclose(cos, np.cos(2 * np.pi / m), rtol=0, atol=1e-12)


def test_hull_vertex_mask_square_with_interior_edge_and_duplicate_points():
    """Known answer: the four corners are vertices; the centre, an edge midpoint and a
    point that occurs twice are not; one point alone is a vertex."""
    pts = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5], [0.5, 0.0]], float)
    dirs = hull_directions(2, 720)
    assert hull_vertex_mask(pts, dirs).tolist() == [True] * 4 + [False] * 2
    tri = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])  # (2, 0) twice
    assert hull_vertex_mask(tri, dirs).tolist() == [True, False, True, False]
    assert hull_vertex_mask(np.array([[0.3, -1.0]]), dirs).tolist() == [True]


@pytest.mark.parametrize("d", [2, 3])
def test_hull_vertex_mask_matches_scipy(d):
    """Against SciPy's Qhull: never a false positive, and 20000 directions miss at most
    one vertex of 12 random points (a vertex with a thin normal cone)."""
    rng = np.random.default_rng(10 + d)
    dirs = hull_directions(d, 20000, seed=1)
    for _ in range(5):
        pts = rng.standard_normal((12, d))
        ref = np.zeros(len(pts), bool)
        ref[ConvexHull(pts).vertices] = True
        got = hull_vertex_mask(pts, dirs)
        assert not np.any(got & ~ref)
        assert got.sum() >= ref.sum() - 1


# -- attention and per-token-set statistics ------------------------------------------------
def test_attention_matrices_match_numpy_reference():
    """Each (Q_m, K_m) applied to its own S token sets, against the float64 NumPy/SciPy
    rescaled attention (x = e^{tV} z with V = I, row softmax of β<Q x_i, K x_j>)."""
    rng = np.random.default_rng(0)
    M, S, n, d, t, beta = 3, 2, 7, 3, 0.7, 1.3
    Qs = rng.standard_normal((M, d, d)) / np.sqrt(d)
    Ks = rng.standard_normal((M, d, d)) / np.sqrt(d)
    z = rng.standard_normal((M, S, n, d))
    P = attention_matrices(Qs, Ks, z, t, beta=beta, dtype=jnp.float64)
    assert P.shape == (M, S, n, n)
    for m in range(M):
        for s in range(S):
            ref = rescaled_attention(t, z[m, s], Qs[m], Ks[m], np.eye(d), beta)
            np.testing.assert_allclose(P[m, s], ref, rtol=1e-12, atol=1e-14)
    # the pairs are not mixed up: pair 1's weights on pair 0's tokens give another P
    other = rescaled_attention(t, z[0, 0], Qs[1], Ks[1], np.eye(d), beta)
    assert np.max(np.abs(P[0, 0] - other)) > 1e-3


def _known_clusters(rng, jitter):
    """Three clusters at the corners of a triangle and one at its centroid (not a hull
    vertex), plus a fifth inside the triangle at distance 0.07 from the first corner: 5
    clusters at threshold 0.01, 4 at the coarse threshold 0.1. Tokens jittered by at most
    `jitter` per axis."""
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.05, 0.05]])
    sizes = [4, 3, 2, 3, 2]
    owner = np.repeat(np.arange(5), sizes)
    x = centres[owner] + rng.uniform(-jitter, jitter, (owner.size, 2))
    return x, owner


def test_token_set_stats_on_known_clusters():
    rng = np.random.default_rng(1)
    x, owner = _known_clusters(rng, jitter=1e-4)
    n = x.shape[0]
    # attention: every token attends fully to the first token of its cluster (Boolean),
    # so the leaders are those first tokens and rank P = number of clusters
    first = np.array([np.nonzero(owner == owner[i])[0][0] for i in range(n)])
    P_bool = np.eye(n)[first]
    P_unif = np.full((n, n), 1.0 / n)
    X = np.stack([x, x])
    st = token_set_stats(X, np.stack([P_bool, P_unif]), 0.01, hull_directions(2, 3600))
    assert st.clusters.tolist() == [5, 5]
    assert st.clusters_coarse.tolist() == [4, 4]
    # centres = means of the tokens of each cluster (NumPy), in the order of first tokens
    ref = np.stack([x[owner == k].mean(axis=0) for k in range(5)])
    np.testing.assert_allclose(st.centres[0][st.centre_mask[0]], ref, rtol=0, atol=1e-12)
    assert st.centre_mask[0].tolist() == [i in set(first) for i in range(n)]
    # hull of the 5 centres: the triangle's corners, i.e. 3 (the other two are inside)
    assert st.centres_on_hull.tolist() == [3, 3]
    # Boolean attention: Booleanness 0, leaders = first tokens, rank 5
    assert st.booleanness[0] == 0.0
    assert st.leaders[0].tolist() == [i in set(first) for i in range(n)]
    assert st.rank_P[0] == 5
    # uniform attention: Booleanness 1/n, no leader, rank 1
    assert st.booleanness[1] == pytest.approx(1.0 / n, rel=1e-15)
    assert not st.leaders[1].any() and st.rank_P[1] == 1


@pytest.mark.parametrize("seed", range(3))
def test_token_set_stats_match_scipy_and_numpy(seed):
    """Random token sets and row-stochastic matrices: the counts against SciPy's connected
    components of `cdist ≤ threshold`, the attention statistics against their NumPy
    definitions, the hull counts against `hull_vertex_mask` of NumPy-computed centres."""
    rng = np.random.default_rng(seed)
    B, n, d, thr = 4, 15, 2, 0.35
    x = rng.standard_normal((B, n, d))
    logits = 6.0 * rng.standard_normal((B, n, n))
    P = np.exp(logits - logits.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    P[0, :, 3] = 0.0  # a zero column: rank P < n
    dirs = hull_directions(d, 2000, seed=seed)
    st = token_set_stats(x, P, thr, dirs, coarse_factor=2.0)
    for b in range(B):
        k, lab = connected_components(cdist(x[b], x[b]) <= thr, directed=False)
        k2, _ = connected_components(cdist(x[b], x[b]) <= 2.0 * thr, directed=False)
        assert st.clusters[b] == k and st.clusters_coarse[b] == k2
        centres = np.stack([x[b][lab == c].mean(axis=0) for c in np.unique(lab)])
        got = st.centres[b][st.centre_mask[b]]
        # same set of centres (SciPy numbers the components in another order)
        assert np.max(np.min(cdist(got, centres), axis=1)) < 1e-12
        if len(centres) > d:  # SciPy's hull; dense directions miss at most one vertex
            ref = len(ConvexHull(centres).vertices)
            assert ref - 1 <= st.centres_on_hull[b] <= ref
        else:  # up to d points in general position: all are vertices
            assert st.centres_on_hull[b] == len(centres)
        np.testing.assert_allclose(
            st.booleanness[b], np.max(np.minimum(P[b], 1 - P[b])), rtol=1e-15
        )
        np.testing.assert_array_equal(st.leaders[b], P[b].max(axis=0) > 0.5)
        assert st.rank_P[b] == np.sum(np.linalg.svd(P[b], compute_uv=False) > 1e-9)
    assert st.rank_P[0] < n


def test_cluster_counts_by_rank_hand_computed():
    ranks = [1, 1, 3, 3, 3, 0, 2]
    counts = [2, 2, 4, 5, 7, 1, 3]
    got = cluster_counts_by_rank(ranks, counts, 3)
    assert list(got) == ["1", "2", "3"]  # rank 0 is not reported
    assert got["1"] == {"clusters_mean": 2.0, "clusters_min": 2, "clusters_max": 2, "runs": 2}
    assert got["2"] == {"clusters_mean": 3.0, "clusters_min": 3, "clusters_max": 3, "runs": 1}
    assert got["3"] == {"clusters_mean": 16 / 3, "clusters_min": 4, "clusters_max": 7, "runs": 3}
    assert cluster_counts_by_rank(ranks, counts, 2).keys() == {"1", "2"}
    assert cluster_counts_by_rank([4], [9], 3) == {}
    with pytest.raises(ValueError, match="ranks"):
        cluster_counts_by_rank([1, 2], [3], 2)


# -- predictions for rank-1 and zero A ----------------------------------------------------
def test_leaders_at_extremes_uses_the_left_singular_vector():
    """A = 2 u vᵀ: the extremes are taken along u (not v), for either sign of A."""
    u = np.array([1.0, 0.0, 0.0])
    v = np.array([0.0, 1.0, 0.0])
    A = 2.0 * np.outer(u, v)
    # token 0 is largest along u, token 1 smallest along u; token 2 is largest along v
    x = np.array([[3.0, 0.0, 0.0], [-2.0, 0.5, 0.0], [0.5, 4.0, 0.0], [0.0, -1.0, 1.0]])
    mask = lambda *idx: np.isin(np.arange(4), idx)
    for sign in (1.0, -1.0):
        assert leaders_at_extremes(sign * A, x, mask(0, 1))
        assert leaders_at_extremes(sign * A, x, mask(1))
        assert not leaders_at_extremes(sign * A, x, mask(2))  # extreme along v only
        assert not leaders_at_extremes(sign * A, x, mask(0, 1, 3))
        assert not leaders_at_extremes(sign * A, x, mask())  # no leader


def test_leaders_at_extremes_psd_random():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(4)
    x = rng.standard_normal((20, 4))
    c = x @ a
    lead = np.zeros(20, bool)
    lead[[np.argmax(c), np.argmin(c)]] = True
    assert leaders_at_extremes(np.outer(a, a), x, lead)
    lead[np.argsort(c)[10]] = True  # a middle token
    assert not leaders_at_extremes(np.outer(a, a), x, lead)


def test_offset_from_initial_mean_known_offsets():
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((3, 10, 4))
    offsets = np.array([[0.0, 1e-3, -2e-3, 0.0], [0.0] * 4, [0.5, 0.0, 0.0, -0.25]])
    centre = x0.mean(axis=1) + offsets
    got = offset_from_initial_mean(centre, x0)
    np.testing.assert_allclose(got, [2e-3, 0.0, 0.5], rtol=1e-9, atol=1e-15)
    one = offset_from_initial_mean(centre[2], x0[2])
    assert one.shape == () and float(one) == pytest.approx(0.5, rel=1e-12)


def test_distance_from_uniform_known_perturbation():
    n, m = 5, 4
    P = np.full((2, n, m), 1.0 / m)
    P[1, 2, 1] += 0.03
    P[1, 2, 3] -= 0.03  # still row-stochastic
    np.testing.assert_allclose(distance_from_uniform(P), [0.0, 0.03], rtol=1e-12, atol=1e-16)
    assert float(distance_from_uniform(np.eye(3))) == pytest.approx(2.0 / 3.0, rel=1e-15)


# -- along a trajectory ---------------------------------------------------------------------
def test_first_time_above_is_strict_and_none_when_never():
    ts = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    e = np.array([0.0, 0.1, 0.2, 0.3, 0.05])
    assert first_time_above(ts, e, 0.2) == 1.5  # 0.2 itself is not above
    assert first_time_above(ts, e, 0.15) == 1.0
    assert first_time_above(ts, e, -1.0) == 0.0
    assert first_time_above(ts, e, 0.3) is None
    assert first_time_above(ts, np.array([0.0, np.nan, 0.1, 0.4, 0.0]), 0.2) == 1.5


def test_final_motion_of_an_exponential_decay():
    """x(t) = c e^{-t}: the motion over the last unit is max|c| (e^{-(t1-1)} − e^{-t1}),
    with the saved time nearest t1 − span used on a non-uniform grid."""
    rng = np.random.default_rng(4)
    c = rng.standard_normal((2, 6, 3))  # (batch, n, d)
    ts = np.concatenate([np.linspace(0.0, 4.0, 9), [4.3, 4.95, 5.0, 5.6, 6.0]])
    xs = c[:, None] * np.exp(-ts)[None, :, None, None]  # (batch, T, n, d)
    t1 = ts[-1]
    expected = np.max(np.abs(c)) * (np.exp(-5.0) - np.exp(-t1))  # nearest to 5.0 is 5.0
    assert final_motion(ts, xs) == pytest.approx(expected, rel=1e-12)
    expected2 = np.max(np.abs(c)) * (np.exp(-4.3) - np.exp(-t1))  # nearest to 4.5 is 4.3
    assert final_motion(ts, xs, span=1.5) == pytest.approx(expected2, rel=1e-12)
    assert final_motion(ts, xs[0]) == pytest.approx(
        np.max(np.abs(c[0])) * (np.exp(-5.0) - np.exp(-t1)), rel=1e-12
    )
