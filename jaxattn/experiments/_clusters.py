"""Statistics of the clusters that token sets end in, and the geometry checks built on
them (see docs/theory.md, 'Clustering' and 'Low-rank attention').

The metrics of `_analysis/metrics.py` are defined on one token set; what a study of many final
token sets needs on top of them lives here, as NumPy results of a few compiled calls:

- `hull_directions` and `hull_vertex_mask`: which points (cluster centres) are vertices
  of their convex hull, tested with exposing directions in any dimension;
- `attention_matrices`: the rescaled field's attention `P(t, z)` for a stack of weight
  pairs `(Q_m, K_m)`, each applied to its own batch of token sets;
- `token_set_stats` (a `TokenSetStats`): per token set, its cluster count at a threshold
  and at a coarser one, its cluster centres and how many of them are hull vertices, and
  the leaders, Booleanness and rank of its attention matrix;
- `cluster_counts_by_rank`: the mean, min and max cluster count per rank of `A = QᵀK`;
- `leaders_at_extremes`, `offset_from_initial_mean`, `distance_from_uniform`: the
  predictions for a rank-1 `A` (the leaders are the extreme tokens along its direction)
  and for `A = 0` (uniform attention, one cluster at the conserved mean);
- `first_time_above` and `final_motion`: when a distance first exceeds a level, and how
  far a trajectory still moves at its end (has it converged?).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .._analysis import booleanness, cluster_centres_masked, leaders
from .._base import ArrayLike, Bool, Float, Int, ScalarLike
from .._model import RescaledField


# -- convex hull -----------------------------------------------------------------------
def hull_directions(d: int, m: int, *, seed: int = 0) -> Float[np.ndarray, "k d"]:
    """Unit directions in R^d for `hull_vertex_mask`.

    **Arguments:**

    - `d`: the dimension.
    - `m`: how many directions to draw: evenly spaced angles offset by one random phase
      for `d = 2`, normalised Gaussian vectors for `d ≥ 3`.
    - `seed`: seed of NumPy's `default_rng`.

    **Returns:**

    The `m` directions followed by `±e_k` (`k = 1..d`), shape `(m + 2d, d)`; for `d = 1`
    the two directions `±1`.
    """
    rng = np.random.default_rng(seed)
    if d == 1:
        return np.array([[1.0], [-1.0]])
    if d == 2:
        a = rng.uniform(0, 2 * np.pi / m) + 2 * np.pi * np.arange(m) / m
        w = np.stack([np.cos(a), np.sin(a)], axis=1)
    else:
        w = rng.standard_normal((m, d))
        w /= np.linalg.norm(w, axis=1, keepdims=True)
    return np.concatenate([w, np.eye(d), -np.eye(d)])


def hull_vertex_mask(
    points: Float[ArrayLike, "k d"], dirs: Float[ArrayLike, "m d"], *, margin: float = 1e-9
) -> Bool[np.ndarray, " k"]:
    """Which points are vertices of their convex hull, tested by exposing directions.

    Point `k` is a vertex iff some direction `w` has `⟨w, p_k⟩ > max_{j≠k} ⟨w, p_j⟩`. A
    point inside the hull (or in the middle of an edge) is never the strict maximiser, so
    the test has no false positives; a vertex whose normal cone misses every direction
    would be a false negative (densely sampled directions make that unlikely). Duplicated
    points are not vertices (no strict maximum): pass distinct cluster centres.

    **Arguments:**

    - `points`: the points, shape `(k, d)`.
    - `dirs`: the directions tested, e.g. from `hull_directions`.
    - `margin`: the strict maximum must win by `margin` × the diameter of the points.

    **Returns:**

    A Boolean mask of shape `(k,)`; a single point is a vertex.
    """
    p = np.asarray(points, dtype=np.float64)
    k = p.shape[0]
    if k == 1:
        return np.ones(1, bool)
    diam = float(np.max(np.linalg.norm(p[:, None] - p[None], axis=-1)))
    s = np.asarray(dirs, np.float64) @ p.T  # (m, k)
    top = np.argmax(s, axis=1)
    srt = np.sort(s, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    exposed = gap > margin * max(diam, 1e-300)
    mask = np.zeros(k, bool)
    mask[np.unique(top[exposed])] = True
    return mask


# -- attention and per-token-set statistics --------------------------------------------
def attention_matrices(
    Qs: Float[ArrayLike, "M d d"],
    Ks: Float[ArrayLike, "M d d"],
    z: Float[ArrayLike, "M S n d"],
    t: ScalarLike,
    *,
    beta: float,
    dtype: DTypeLike,
) -> Float[np.ndarray, "M S n n"]:
    """The attention matrix `P = field.attention(t, z)` of the rescaled field (V = I) with
    weights `(Q_m, K_m)`, for each of the `S` token sets that belong to pair `m`.

    **Arguments:**

    - `Qs`, `Ks`: the query and key matrices of the `M` weight pairs.
    - `z`: token sets, `S` per weight pair (e.g. the final tokens of `S` runs).
    - `t`: the time (the rescaled field's attention depends on it).
    - `beta`: the inverse temperature.
    - `dtype`: the dtype of the fields and of the computation.

    **Returns:**

    The row-stochastic matrices `P[m, s]`, as a NumPy array `(M, S, n, n)`.
    """

    def one(Q, K, x):
        return RescaledField(Q, K, None, beta=beta, dtype=dtype).attention(t, x)

    f = jax.vmap(jax.vmap(one, in_axes=(None, None, 0)))
    return np.asarray(f(jnp.asarray(Qs, dtype), jnp.asarray(Ks, dtype), jnp.asarray(z)))


class TokenSetStats(NamedTuple):
    """Per token set statistics from `token_set_stats` (NumPy arrays, leading axis `B`)."""

    #: number of clusters at the threshold, `(B,)`
    clusters: Int[np.ndarray, " B"]
    #: number of clusters at the coarse threshold, `(B,)`
    clusters_coarse: Int[np.ndarray, " B"]
    #: centres: row `k` is the mean of the cluster whose smallest token index is `k`
    #: (`cluster_centres_masked`), `(B, n, d)`
    centres: Float[np.ndarray, "B n d"]
    #: which rows of `centres` are clusters, `(B, n)`
    centre_mask: Bool[np.ndarray, "B n"]
    #: how many centres are vertices of their convex hull, `(B,)`
    centres_on_hull: Int[np.ndarray, " B"]
    #: leaders `{j : max_i P_ij > 1/2}`, `(B, n)`
    leaders: Bool[np.ndarray, "B n"]
    #: `max_ij min(P_ij, 1 − P_ij)`, `(B,)`
    booleanness: Float[np.ndarray, " B"]
    #: numerical rank of `P`, `(B,)`
    rank_P: Int[np.ndarray, " B"]


@jax.jit
def _centres_batch(x, threshold):
    return jax.vmap(lambda z: cluster_centres_masked(z, threshold))(x)


@jax.jit
def _attention_batch(P):
    return jax.vmap(booleanness)(P), jax.vmap(leaders)(P)


def token_set_stats(
    x: Float[ArrayLike, "B n d"],
    P: Float[ArrayLike, "B n n"],
    threshold: float,
    dirs: Float[ArrayLike, "m d"],
    *,
    coarse_factor: float = 10.0,
    rank_tol: float = 1e-9,
) -> TokenSetStats:
    """Cluster and attention statistics of a batch of token sets, in a few compiled calls.

    Clusters are the connected components at distance `≤ threshold` (`cluster_count`);
    the count at `coarse_factor · threshold` tells whether the clusters are well
    separated (the two counts agree) or the threshold sits inside a spread-out cluster.

    **Arguments:**

    - `x`: the token sets, e.g. the final tokens of `B` runs.
    - `P`: the attention matrix of each token set (e.g. from `attention_matrices`).
    - `threshold`: the cluster threshold (a Euclidean distance).
    - `dirs`: the directions of the hull-vertex test (`hull_directions`).
    - `coarse_factor`: the coarse threshold is `coarse_factor · threshold`.
    - `rank_tol`: singular values above it count towards the rank of `P`.

    **Returns:**

    A `TokenSetStats` of arrays with leading axis `B`.
    """
    xj = jnp.asarray(x)
    centres, mask = (np.asarray(a) for a in _centres_batch(xj, threshold))
    _, mask_coarse = _centres_batch(xj, coarse_factor * threshold)
    boo, lead = (np.asarray(a) for a in _attention_batch(jnp.asarray(P)))
    on_hull = [int(hull_vertex_mask(c[m], dirs).sum()) for c, m in zip(centres, mask)]
    return TokenSetStats(
        clusters=mask.sum(-1),
        clusters_coarse=np.asarray(mask_coarse).sum(-1),
        centres=centres,
        centre_mask=mask,
        centres_on_hull=np.array(on_hull, dtype=int),
        leaders=lead,
        booleanness=boo,
        rank_P=np.linalg.matrix_rank(np.asarray(P), tol=rank_tol),
    )


def cluster_counts_by_rank(
    ranks: Sequence[int], counts: Sequence[int], max_rank: int
) -> dict[str, dict[str, float | int]]:
    """Cluster counts grouped by the rank of the weights of each run.

    **Arguments:**

    - `ranks`: the rank of `A = QᵀK` of each run.
    - `counts`: the cluster count of each run (same order).
    - `max_rank`: the ranks `1..max_rank` are reported (where some run has them).

    **Returns:**

    `{str(r): {"clusters_mean", "clusters_min", "clusters_max", "runs"}}` for each rank
    `r` in `1..max_rank` that occurs, in increasing order.
    """
    if len(ranks) != len(counts):
        raise ValueError(f"{len(ranks)} ranks but {len(counts)} counts")
    out: dict[str, dict[str, float | int]] = {}
    for r in range(1, max_rank + 1):
        cs = [int(c) for rr, c in zip(ranks, counts) if rr == r]
        if cs:
            out[str(r)] = {
                "clusters_mean": float(np.mean(cs)),
                "clusters_min": min(cs),
                "clusters_max": max(cs),
                "runs": len(cs),
            }
    return out


# -- predictions for rank-1 and zero A -------------------------------------------------
def leaders_at_extremes(
    A: Float[ArrayLike, "d d"], x: Float[ArrayLike, "n d"], leader_mask: Bool[ArrayLike, " n"]
) -> bool:
    """Whether the leaders are extreme tokens along the direction of a rank-1 `A`.

    For `A = σ·a bᵀ` the attention depends on the tokens only through `⟨a, x_i⟩` and
    `⟨b, x_j⟩`; for `A = a aᵀ ⪰ 0` the tokens end in at most two clusters, led by the
    tokens with the largest and the smallest `⟨a, x_i⟩`.

    **Arguments:**

    - `A`: the matrix `QᵀK`; `a` is its top left singular vector.
    - `x`: the tokens (e.g. final).
    - `leader_mask`: the leaders (`leaders` of the attention matrix at `x`).

    **Returns:**

    True when there is at least one leader and every leader is the argmax or the argmin
    of `⟨a, x_i⟩`.
    """
    a = np.linalg.svd(np.asarray(A))[0][:, 0]
    c = np.asarray(x) @ a
    extremes = {int(np.argmax(c)), int(np.argmin(c))}
    lead = set(np.nonzero(np.asarray(leader_mask))[0].tolist())
    return bool(lead) and lead <= extremes


def offset_from_initial_mean(
    centre: Float[ArrayLike, "*batch d"], x0: Float[ArrayLike, "*batch n d"]
) -> Float[np.ndarray, "*batch"]:
    """`max_k |c_k − mean_i x0_ik|`: how far a point (for `A = 0`, the one cluster centre)
    is from the mean of the initial tokens, which the dynamics with V = I and uniform
    attention conserve.

    **Arguments:**

    - `centre`: the point(s), one per token set.
    - `x0`: the initial tokens of each token set.

    **Returns:**

    The sup-norm distance per token set, shape `(*batch,)`.
    """
    x0 = np.asarray(x0)
    return np.asarray(np.max(np.abs(np.asarray(centre) - x0.mean(axis=-2)), axis=-1))


def distance_from_uniform(P: Float[ArrayLike, "*batch n m"]) -> Float[np.ndarray, "*batch"]:
    """`max_ij |P_ij − 1/m|`: how far an attention matrix is from uniform attention (the
    exact attention when `A = 0`).

    **Arguments:**

    - `P`: attention matrices, `m` keys each.

    **Returns:**

    The distance per matrix, shape `(*batch,)`.
    """
    P = np.asarray(P)
    return np.asarray(np.max(np.abs(P - 1.0 / P.shape[-1]), axis=(-2, -1)))


# -- along a trajectory -----------------------------------------------------------------
def first_time_above(
    ts: Float[ArrayLike, " T"], values: Float[ArrayLike, " T"], level: float
) -> float | None:
    """The first time at which `values > level` (e.g. a divergence above a separation).

    **Arguments:**

    - `ts`: the times.
    - `values`: the values at those times.
    - `level`: the level.

    **Returns:**

    That time, or None when `values` never exceed `level` (NaN never does).
    """
    above = np.nonzero(np.asarray(values) > level)[0]
    return float(np.asarray(ts)[above[0]]) if above.size else None


def final_motion(
    ts: Float[ArrayLike, " T"], xs: Float[ArrayLike, "*batch T n d"], span: float = 1.0
) -> float:
    """How far the tokens still move at the end: `max |z(t1) − z(t1 − span)|`.

    **Arguments:**

    - `ts`: the saved times.
    - `xs`: trajectories saved at `ts`, any leading batch axes.
    - `span`: the look-back; the saved time nearest `t1 − span` is used.

    **Returns:**

    The largest coordinate change over tokens and batch; small means converged.
    """
    ts = np.asarray(ts)
    xs = np.asarray(xs)
    k = int(np.argmin(np.abs(ts - (ts[-1] - span))))
    return float(np.max(np.abs(xs[..., -1, :, :] - xs[..., k, :, :])))
