"""Cluster and divergence statistics (see docs/theory.md, 'Clustering' and
'Departure time').

Every function is defined on one token set `(n, d)` (or a pair of them) and accepts
leading batch axes `(..., n, d)` (times, seeds, sweep points), which broadcast against
each other like NumPy's and give outputs of shape `(...)` plus the function's own
(`jnp.vectorize` with the signature in `_batched`); all are jittable and vmappable. The
exception is `cluster_centres`, whose compact NumPy output has a data-dependent size.
Non-finite tokens are never read as distances: the functions that return a decision
(times, counts) come with eager wrappers that raise on NaN/inf, and the jittable forms
return NaN, never "far".
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .._base import Array, ArrayLike, Bool, Float, Int, ScalarLike
from .._model import unit_rows as unit_rows


def _batched(signature: str, check=None):
    """Let `fn(*arrays, **static)`, written for one configuration, take leading batch
    axes: `jnp.vectorize(fn, signature=signature)`, with the arrays' batch axes first
    padded to the same number (so one configuration against a batch, e.g. fixed centres
    against a trajectory, is explicit broadcasting, never rank promotion). Keyword
    arguments are static (not batched); without batch axes `fn` is called directly.

    The shapes are checked against the signature first (each array has its core axes,
    and axes of one name agree, e.g. the `d` of `(n,d),(m,d)`), so a mismatch is one
    line naming the function rather than an error from inside JAX; `check(*args)`, if
    given, validates the arguments' values."""
    inputs = signature.split("->")[0]
    names = [
        [c.strip() for c in g.split(",") if c.strip()] for g in re.findall(r"\(([^)]*)\)", inputs)
    ]
    core = [len(g) for g in names]

    def check_shapes(fn_name, args):
        sizes: dict[str, int] = {}
        for i, (a, axes) in enumerate(zip(args, names)):
            if a is None or not axes:
                continue
            shape = jnp.shape(a)
            if len(shape) < len(axes):
                raise ValueError(
                    f"{fn_name}: argument {i + 1} must have shape (..., {', '.join(axes)}), "
                    f"got {tuple(shape)}"
                )
            for name, size in zip(axes, shape[len(shape) - len(axes) :]):
                if sizes.setdefault(name, size) != size:
                    raise ValueError(
                        f"{fn_name}: the arguments disagree on {name} ({sizes[name]} and "
                        f"{size}; shapes {[tuple(jnp.shape(b)) for b in args if b is not None]})"
                    )

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            check_shapes(fn.__name__, args)
            if check is not None:
                check(*args)
            f = functools.partial(fn, **kwargs) if kwargs else fn
            ranks = [max(jnp.ndim(a) - c, 0) if a is not None else 0 for a, c in zip(args, core)]
            batch = max(ranks, default=0)
            if batch == 0:
                return f(*args)
            args = [
                a
                if a is None or jnp.ndim(a) == 0
                else jnp.reshape(jnp.asarray(a), (1,) * (batch - r) + jnp.shape(a))
                for a, r in zip(args, ranks)
            ]
            return jnp.vectorize(f, signature=signature)(*args)

        return wrapper

    return deco


def _require_finite(x, name: str) -> None:
    if not isinstance(x, Tracer) and not bool(np.all(np.isfinite(np.asarray(x)))):
        raise ValueError(
            f"{name} contains NaN or inf; non-finite tokens have no distance "
            "(check the solve's status)"
        )


def pairwise_distances(
    x: Float[Array, "*batch n d"], y: Float[Array, "*batch m d"] | None = None
) -> Float[Array, "*batch n m"]:
    """Euclidean distances `|x_i − y_j|` (y defaults to x), computed from differences."""
    return _pairwise_distances(x, x if y is None else y)


@_batched("(n,d),(m,d)->(n,m)")
def _pairwise_distances(x, y):
    diff = x[:, None, :] - y[None, :, :]
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1))


@_batched("(n,d)->(n,n)")
def gram(x: Float[Array, "*batch n d"]) -> Float[Array, "*batch n n"]:
    """Gram matrix of the normalised tokens, `G_ij = <x_i/|x_i|, x_j/|x_j|>`."""
    u = unit_rows(x)
    return u @ u.T


def chord_from_cosine_gap(
    delta: ScalarLike | Float[Array, "*shape"],
) -> float | Float[Array, "*shape"]:
    """The cluster threshold (a chord length) equivalent to `1 − cos(x_i, x_j) ≤ delta`:
    `sqrt(2·delta)`, since `|u − v|² = 2 − 2<u, v>` for unit vectors."""
    if isinstance(delta, jax.Array):
        return jnp.sqrt(2.0 * delta)
    return float(np.sqrt(2.0 * float(delta)))  # a Python float: weakly typed in comparisons


def _adjacency(x, threshold, sphere: bool):
    if sphere:
        x = unit_rows(x)
    return pairwise_distances(x) <= threshold


def _check_threshold(x, threshold, *_) -> None:
    """A cluster threshold is a distance: ≥ 0 (checked when concrete)."""
    if threshold is None or isinstance(threshold, Tracer):
        return
    t = np.asarray(threshold)
    if t.dtype.kind not in "fiu" or np.any(np.isnan(t)) or np.any(t < 0):
        raise ValueError(f"the cluster threshold must be a distance ≥ 0, got {threshold!r}")


@_batched("(n,d),()->(n)", check=_check_threshold)
def cluster_labels(
    x: Float[Array, "*batch n d"],
    threshold: ScalarLike | Float[Array, "*batch"],
    *,
    sphere: bool = False,
) -> Int[Array, "*batch n"]:
    """Connected components of the graph `{|x_i − x_j| ≤ threshold}`. Label = smallest
    token index in the component.

    `threshold` is a Euclidean distance in both geometries: with `sphere=True` it is the
    chord `|x_i/|x_i| − x_j/|x_j||` between the normalised tokens (angle θ ↔ chord
    `2 sin(θ/2)`; `1 − cos ≤ δ` ↔ chord `≤ chord_from_cosine_gap(δ) = sqrt(2δ)`), so the
    same number means nearly the same on R^d and on the unit sphere (threshold 0.1 ≈ 5.7°).
    """
    n = x.shape[0]
    adj = _adjacency(x, threshold, sphere)
    big = jnp.asarray(n, jnp.int32)

    def step(labels):
        cand = jnp.where(adj, labels[None, :], big)
        return jnp.minimum(labels, jnp.min(cand, axis=1))

    def cond(carry):
        old, new = carry
        return jnp.any(old != new)

    def body(carry):
        _, new = carry
        return new, step(new)

    labels0 = jnp.arange(n, dtype=jnp.int32)
    _, labels = jax.lax.while_loop(cond, body, (labels0, step(labels0)))
    return labels


@_batched("(n,d),()->()", check=_check_threshold)
def cluster_count(
    x: Float[Array, "*batch n d"],
    threshold: ScalarLike | Float[Array, "*batch"],
    *,
    sphere: bool = False,
) -> Int[Array, "*batch"]:
    """Number of clusters (connected components at `threshold`)."""
    labels = cluster_labels(x, threshold, sphere=sphere)
    return jnp.sum(labels == jnp.arange(x.shape[0], dtype=jnp.int32))


@_batched("(n,d),()->(n,d),(n)", check=_check_threshold)
def cluster_centres_masked(
    x: Float[Array, "*batch n d"],
    threshold: ScalarLike | Float[Array, "*batch"],
    *,
    sphere: bool = False,
) -> tuple[Float[Array, "*batch n d"], Bool[Array, "*batch n"]]:
    """Jittable centres: row `k` is the mean of component `k`, valid where `mask[k]`."""
    n = x.shape[0]
    labels = cluster_labels(x, threshold, sphere=sphere)
    onehot = (labels[:, None] == jnp.arange(n, dtype=jnp.int32)[None, :]).astype(x.dtype)
    counts = jnp.sum(onehot, axis=0)
    centres = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    return centres, counts > 0


def cluster_centres(
    x: Float[ArrayLike, "n d"], threshold: ScalarLike, *, sphere: bool = False
) -> Float[np.ndarray, "k d"]:
    """Centres of the clusters as a compact NumPy array `(k, d)` (eager only; one
    configuration `(n, d)`: `k` depends on the data, use `cluster_centres_masked` for
    batches)."""
    if np.ndim(x) != 2:
        raise ValueError(
            f"cluster_centres takes one configuration (n, d), got shape "
            f"{np.shape(x)}; use cluster_centres_masked for batches"
        )
    _require_finite(x, "tokens")
    centres, mask = cluster_centres_masked(jnp.asarray(x), threshold, sphere=sphere)
    return np.asarray(centres)[np.asarray(mask)]


@_batched("(n,d),(m,d)->()")
def hausdorff(
    x: Float[Array, "*batch n d"], y: Float[Array, "*batch m d"]
) -> Float[Array, "*batch"]:
    """Two-sided Hausdorff distance between the token sets (sees merges and splits)."""
    dist = pairwise_distances(x, y)
    return jnp.maximum(jnp.max(jnp.min(dist, axis=1)), jnp.max(jnp.min(dist, axis=0)))


@_batched("(n,d),(m,d)->()")
def one_sided_distance(
    x: Float[Array, "*batch n d"], c: Float[Array, "*batch m d"]
) -> Float[Array, "*batch"]:
    """The paper's metric `D = max_i min_c |x_i − c|` (one-sided: blind to merging)."""
    return jnp.max(jnp.min(pairwise_distances(x, c), axis=1))


def divergence(
    x: Float[Array, "*#batch n d"], y: Float[Array, "*#batch n d"]
) -> Float[Array, "*#batch"]:
    """`e = max_i |x_i − y_i|` between two runs (same token order), over leading axes
    (which broadcast, e.g. one reference run against a batch of perturbed ones).

    It compares whatever it is given: two rescaled solutions hold `z = e^{−tV}x`, and a
    LoRA on V gives the two runs two different V, so `divergence(sol.xs, sol_lora.xs)`
    compares two different frames (the divergence of the rescaled variables, as in
    Koubbi–Boussard–Hernandez); `divergence(sol.to_x(f), sol_lora.to_x(f_lora))` is the
    distance between the tokens themselves."""
    if jnp.ndim(x) < 2 or jnp.ndim(y) < 2 or jnp.shape(x)[-2:] != jnp.shape(y)[-2:]:
        raise ValueError(
            f"divergence compares two runs of the same (n, d) tokens, got shapes "
            f"{tuple(jnp.shape(x))} and {tuple(jnp.shape(y))}"
        )
    diff = x - y
    return jnp.max(jnp.sqrt(jnp.sum(diff * diff, axis=-1)), axis=-1)


@_batched("(T),(T),()->(),()")
def approach_departure(
    ts: Float[Array, "*batch T"],
    dist: Float[Array, "*batch T"],
    delta: ScalarLike | Float[Array, "*batch"],
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"]]:
    """First time `dist ≤ delta` (approach) and first later time `dist > delta`
    (departure); `inf` when it never happens. A NaN in `dist` up to the decision gives NaN
    (jittable form; see `approach_departure_times` for the checked one)."""
    finite = jnp.isfinite(dist)
    near = finite & (dist <= delta)
    idx = jnp.arange(ts.shape[0])
    big = ts.shape[0]
    i_app = jnp.min(jnp.where(near, idx, big))
    far = (idx > i_app) & ~near
    i_dep = jnp.min(jnp.where(far, idx, big))
    bad_before = lambda i: jnp.any(~finite & (idx <= i))
    inf = jnp.asarray(jnp.inf, ts.dtype)
    nan = jnp.asarray(jnp.nan, ts.dtype)
    t_app = jnp.where(i_app < big, ts[jnp.minimum(i_app, big - 1)], inf)
    t_dep = jnp.where(i_dep < big, ts[jnp.minimum(i_dep, big - 1)], inf)
    t_app = jnp.where(bad_before(jnp.minimum(i_app, big - 1)), nan, t_app)
    t_dep = jnp.where(bad_before(jnp.minimum(i_dep, big - 1)), nan, t_dep)
    return t_app, t_dep


def cluster_distance(
    xs: Float[Array, "*batch T n d"],
    centres: Float[Array, "*batch m d"],
    *,
    metric: str = "hausdorff",
) -> Float[Array, "*batch T"]:
    """Distance of the token set at each time to reference cluster centres:
    `"hausdorff"` (two-sided, default) or `"paper"` (one-sided `max_i min_c`).
    Batched `centres` have one set per trajectory (no time axis)."""
    if metric not in ("hausdorff", "paper"):
        raise ValueError(f"unknown metric {metric!r}; choose hausdorff or paper")
    fn = hausdorff if metric == "hausdorff" else one_sided_distance
    return fn(xs, jnp.expand_dims(centres, -3))


def approach_departure_times(
    ts: Float[ArrayLike, " T"],
    xs: Float[ArrayLike, "T n d"],
    centres: Float[ArrayLike, "m d"],
    delta: ScalarLike,
    *,
    metric: str = "hausdorff",
) -> tuple[float, float]:
    """Eager, checked: approach and departure times of trajectory `xs (T, n, d)` relative
    to reference `centres (m, d)` at tolerance `delta`. Raises on NaN/inf tokens."""
    _require_finite(xs, "trajectory")
    _require_finite(centres, "reference centres")
    dist = cluster_distance(jnp.asarray(xs), jnp.asarray(centres), metric=metric)
    t_app, t_dep = approach_departure(jnp.asarray(ts), dist, delta)
    return float(t_app), float(t_dep)


@_batched("(n,m)->()")
def booleanness(P: Float[Array, "*batch n m"]) -> Float[Array, "*batch"]:
    """`max_ij min(P_ij, 1 − P_ij)`: 0 exactly when P is a 0/1 matrix."""
    return jnp.max(jnp.minimum(P, 1.0 - P))


@_batched("(n,m)->(m)")
def leaders(P: Float[Array, "*batch n m"]) -> Bool[Array, "*batch m"]:
    """Leaders `{j : max_i P_ij > 1/2}` (columns that some token mostly attends to)."""
    return jnp.max(P, axis=0) > 0.5


@_batched("(n,d),()->()")
def energy(
    x: Float[Array, "*batch n d"], beta: ScalarLike | Float[Array, "*batch"]
) -> Float[Array, "*batch"]:
    """`E = (1/(2βn²)) Σ_ij exp(β<x_i, x_j>)` (Q = K = V = I; see docs/theory.md,
    'Sphere dynamics')."""
    n = x.shape[0]
    return jnp.sum(jnp.exp(beta * (x @ x.T))) / (2.0 * beta * n * n)


@_batched("(n,d),(m,d)->(m)")
def support(
    x: Float[Array, "*batch n d"], w: Float[Array, "*batch m d"]
) -> Float[Array, "*batch m"]:
    """Support function of the convex hull, `max_i <w_k, x_i>` for each direction."""
    return jnp.max(w @ x.T, axis=-1)


@_batched("(n,d),()->()")
def fraction_close_pairs(
    x: Float[Array, "*batch n d"], delta: ScalarLike | Float[Array, "*batch"]
) -> Float[Array, "*batch"]:
    """Fraction of pairs `i < j` with `G_ij ≥ 1 − delta` (normalised tokens)."""
    n = x.shape[0]
    G = gram(x)
    iu = jnp.triu_indices(n, 1)
    return jnp.mean((G[iu] >= 1.0 - delta).astype(x.dtype))


@_batched("(n,d)->()")
def mean_cosine(x: Float[Array, "*batch n d"]) -> Float[Array, "*batch"]:
    """Mean pairwise cosine similarity over pairs `i ≠ j`."""
    n = x.shape[0]
    G = gram(x)
    return (jnp.sum(G) - jnp.trace(G)) / (n * (n - 1))
