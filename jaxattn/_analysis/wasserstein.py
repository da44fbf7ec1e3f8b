"""Distances between weighted token clouds (empirical measures).

A cloud is `x (n, d)` with weights `a (n,)` (non-negative, summing to 1; `None` means
uniform `1/n`), i.e. the measure `μ = Σ_i a_i δ_{x_i}`. Every function acts on one pair
of clouds and is jittable and vmappable (batches come from `jax.vmap`); values are
checked only when concrete (inside `jit`/`vmap` they are skipped, shapes still checked).

- `wasserstein2`: exact `W₂` between two clouds of the same size with uniform weights.
  The optimal assignment σ is found on the host by SciPy's `linear_sum_assignment`
  (through `jax.pure_callback`); the value `sqrt(mean_i c(x_i, y_σ(i)))` is then computed
  in JAX, so its gradient in x and y is exact wherever the optimal assignment is unique
  (envelope theorem: the assignment is locally constant) — almost everywhere.
- `wasserstein2_line`: exact `W₂` on the line for any sizes and weights, fully in JAX,
  from the quantile functions (sorting).
- `sliced_wasserstein2`: the root mean square of line `W₂` over random directions
  (Bonneel et al. 2015); cheap for large n, a lower bound on `W₂` up to the sampling of
  directions (`SW₂ ≤ W₂`).
- `entropic_ot` and `sinkhorn_divergence`: entropic optimal transport for any sizes and
  weights, solved by OTT-JAX (Cuturi et al. 2022). The debiased Sinkhorn divergence
  `S_ε(μ, ν) = OT_ε(μ, ν) − ½OT_ε(μ, μ) − ½OT_ε(ν, ν)` is ≥ 0, zero iff μ = ν, and tends
  to `W₂²` as ε → 0 (Feydy et al. 2019). Gradients in the points by the envelope theorem
  (the dual potentials held fixed: exact at convergence, no backpropagation through
  the Sinkhorn loop).
`cost="euclidean"` uses `|x − y|²`; `cost="geodesic"` uses the squared great-circle
distance `θ(x, y)² = (2·atan2(|x − y|, |x + y|))²` between points of the unit sphere
(the arc-length form of `arccos⟨x, y⟩`, accurate for nearby points).
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from .._base import (
    Array,
    ArrayLike,
    Float,
    Int,
    PRNGKeyArray,
    ScalarLike,
    check_choice,
    check_int,
    check_memory,
    draw_normal,
)

COSTS = ("euclidean", "geodesic")
# Above this many cost entries n·m, the Sinkhorn geometry is evaluated in row blocks
# (memory O(block·m) instead of n·m), like the attention kernel's "auto" switch.
SINKHORN_DENSE_MAX = 2048 * 2048
# Rows per block of OTT's online cost evaluation. Measured for one entropic OT, n = m = 8192,
# d = 2, float32, on the 2-core CPU (second call, another job running): 32 rows 12.9 s,
# 64 rows 12.2 s, 128 rows 12.7 s, 256 rows 21.8 s, 512 rows 31.8 s, 2048 rows 88 s.
SINKHORN_BLOCK = 128
# Exact W2 solves an assignment problem on the host, O(n³): SciPy took 1.2 s at n = 2000,
# 4.2 s at 4000 and 21 s at 8000 (random points in d = 2, the 2-core CPU). Larger clouds
# are refused unless `max_points` is raised; sliced or entropic transport serves there.
EXACT_MAX_POINTS = 10_000
# Projections per group in `sliced_wasserstein2`: a group sorts `group × (n + m)` values,
# with about a dozen arrays of that size alive; groups are run one after another.
SLICED_GROUP_ENTRIES = 1 << 24


# -- validation -----------------------------------------------------------------------
def _concrete(*xs) -> bool:
    return not any(isinstance(x, Tracer) for x in xs)


def _as_cloud(x, name: str) -> Array:
    """Points as a float32/float64 array: integers and booleans are converted; complex
    numbers (whose imaginary part a cast would drop) and half precisions are refused."""
    if isinstance(x, jax.Array):
        arr = x
        if not (
            jnp.issubdtype(arr.dtype, jnp.integer)
            or jnp.issubdtype(arr.dtype, jnp.bool_)
            or jnp.issubdtype(arr.dtype, jnp.floating)
        ):
            raise ValueError(f"{name} must be a real array of points, got dtype {arr.dtype}")
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"{name} must be a numeric array of points, got dtype {arr.dtype}")
        arr = jnp.asarray(arr, dtype=jnp.result_type(float))
    if jnp.issubdtype(arr.dtype, jnp.floating) and jnp.finfo(arr.dtype).bits < 32:
        raise ValueError(
            f"{name} has dtype {arr.dtype}; the transport distances need float32 or float64"
        )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a cloud of points of shape (n, d), got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is an empty cloud (no points)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has points of dimension 0")
    if _concrete(arr) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _as_weights(a, n: int, name: str, cloud: str, dtype) -> Array:
    if a is None:
        return jnp.full((n,), 1.0 / n, dtype)
    a = a if isinstance(a, jax.Array) else jnp.asarray(np.asarray(a, np.float64))
    a = a.astype(dtype)
    if a.shape != (n,):
        raise ValueError(
            f"weights {name} must have shape ({n},) like the points of "
            f"{cloud}, got {tuple(a.shape)}"
        )
    if _concrete(a):
        v = np.asarray(a, np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"weights {name} contain NaN or inf")
        if np.any(v < 0):
            raise ValueError(f"weights {name} have a negative entry ({v.min():.3g})")
        total = float(v.sum())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights {name} sum to {total:.6g}, not 1 (normalise them)")
    return a


def _check_exact(x: Array, y: Array, max_points: int) -> None:
    """Exact transport between same-size clouds, within its size and memory limits."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"exact W2 needs clouds of the same size with uniform weights, got "
            f"n = {x.shape[0]} and m = {y.shape[0]} (use sinkhorn_divergence, "
            "wasserstein2_line or sliced_wasserstein2)"
        )
    n, d = x.shape
    max_points = check_int(max_points, "max_points", 1)
    if n > max_points:
        raise ValueError(
            f"exact W2 of {n} points needs an O(n³) assignment (about 20 s at 8000 "
            f"points on 2 CPU cores, ×8 per doubling), over max_points = {max_points}; "
            "raise max_points, or use sliced_wasserstein2 or sinkhorn_divergence"
        )
    # the differences (n, n, d) and the cost matrix in the dtype, its float64 copy on
    # the host, and SciPy's own float64 copy
    item = x.dtype.itemsize
    check_memory(float(n) * n * ((d + 1) * item + 16), f"exact W2 of {n} points in d = {d}")


def _largest_norm(p: np.ndarray) -> float:
    """`max_i |p_i|` without overflow in the squares (scaled by the largest entry)."""
    m = float(np.max(np.abs(p)))
    return m * float(np.max(np.linalg.norm(p / m, axis=-1))) if m > 0 else 0.0


def _check_pair(x, y, a, b, cost: str):
    x = _as_cloud(x, "x")
    y = _as_cloud(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y are clouds of different dimensions: d = {x.shape[1]} and d = {y.shape[1]}"
        )
    if x.dtype != y.dtype:
        dtype = jnp.promote_types(x.dtype, y.dtype)
        x, y = x.astype(dtype), y.astype(dtype)
    cost = check_choice(cost, "cost", COSTS)
    if cost == "geodesic":
        for arr, name in ((x, "x"), (y, "y")):
            if _concrete(arr):
                r = np.linalg.norm(np.asarray(arr, np.float64), axis=-1)
                if np.max(np.abs(r - 1.0)) > 1e-6:
                    raise ValueError(
                        f"the geodesic cost needs points on the unit sphere; "
                        f"{name} has norms in [{r.min():.6g}, {r.max():.6g}]"
                    )
    elif _concrete(x, y):
        # |x_i − y_j|² ≤ (max|x| + max|y|)²: beyond the dtype's largest number the costs
        # overflow (SciPy then calls the problem infeasible, Sinkhorn returns NaN).
        r = sum(_largest_norm(np.asarray(p, np.float64)) for p in (x, y))
        if r > math.sqrt(float(jnp.finfo(x.dtype).max)):
            raise ValueError(
                f"the squared distances between x and y overflow {x.dtype} (points of norm "
                f"up to {r:.3g}); rescale the clouds"
            )
    a = _as_weights(a, x.shape[0], "a", "x", x.dtype)
    b = _as_weights(b, y.shape[0], "b", "y", y.dtype)
    return x, y, a, b, cost


# -- ground costs ---------------------------------------------------------------------
def _safe_sqrt(s: Array) -> Array:
    """`√s` with a finite gradient at 0 (rounding may leave `s` slightly below 0: 0). A
    NaN stays NaN: a distance is never 0 for input it could not measure."""
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), jnp.where(jnp.isnan(s), s, 0.0))


def _safe_norm(v: Array) -> Array:
    """|v| along the last axis with gradient 0 (not NaN) at v = 0; NaN for NaN."""
    return _safe_sqrt(jnp.sum(v * v, axis=-1))


def geodesic_distance(
    x: Float[Array, "*#batch d"], y: Float[Array, "*#batch d"]
) -> Float[Array, "*#batch"]:
    """Great-circle distance `arccos⟨x, y⟩ ∈ [0, π]` between unit vectors, computed as
    `2·atan2(|x − y|, |x + y|)` (exact for unit vectors, stable near 0 and π). The batch
    axes broadcast (`cost_matrix` pairs `(n, 1, d)` with `(1, m, d)`)."""
    return 2.0 * jnp.arctan2(_safe_norm(x - y), _safe_norm(x + y))


def cost_matrix(
    x: Float[Array, "n d"], y: Float[Array, "m d"], cost: str = "euclidean"
) -> Float[Array, "n m"]:
    """Ground cost `c(x_i, y_j)`: `|x_i − y_j|²` (from differences, no cancellation) or
    the squared geodesic distance on the sphere."""
    cost = check_choice(cost, "cost", COSTS)
    if cost == "geodesic":
        return geodesic_distance(x[:, None, :], y[None, :, :]) ** 2
    diff = x[:, None, :] - y[None, :, :]
    return jnp.sum(diff * diff, axis=-1)


def _ott():
    """OTT-JAX modules (imported on first use: `import jaxattn` stays light)."""
    from jax.interpreters import batching

    if not hasattr(batching, "is_vmappable"):
        # OTT-JAX 0.6.0's row-blocked ("online") point clouds flatten their arguments with
        # `is_leaf=jax.interpreters.batching.is_vmappable`, which JAX 0.10 removed. For
        # arrays it always answered False (it recognised only JAX's internal ragged
        # type), so this restores its answer for every input OTT passes.
        batching.is_vmappable = lambda x: False  # pyright: ignore[reportAttributeAccessIssue] (the shim restores a removed name)
    from ott.geometry import costs, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn
    from ott.tools import sinkhorn_divergence as sdiv

    return costs, pointcloud, linear_problem, sinkhorn, sdiv


_GEODESIC_COST = None


def _geodesic_cost():
    """An OTT `CostFn` for the squared geodesic distance on the sphere (built once)."""
    global _GEODESIC_COST
    if _GEODESIC_COST is None:
        costs = _ott()[0]

        @jtu.register_pytree_node_class
        class SphereGeodesicSq(costs.CostFn):
            """`c(x, y) = θ(x, y)²`, θ the great-circle distance on the unit sphere."""

            def __call__(self, x, y):
                return geodesic_distance(x, y) ** 2

        _GEODESIC_COST = SphereGeodesicSq()
    return _GEODESIC_COST


@contextlib.contextmanager
def _ott_promotion():
    """OTT mixes Python ints into float arithmetic and broadcasts by rank: let it promote
    as it was written for, also when the caller runs JAX with strict promotion."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def _promoting(fn):
    """`fn(x, y, a, b)` (built on OTT) run under `_ott_promotion`, its reverse-mode
    derivative too: the backward pass, which JAX traces after the forward one has
    returned, re-enters the context through a custom VJP."""

    @jax.custom_vjp
    def call(x, y, a, b):
        with _ott_promotion():
            return fn(x, y, a, b)

    def fwd(x, y, a, b):
        with _ott_promotion():
            return fn(x, y, a, b), (x, y, a, b)

    def bwd(args, ct):
        with _ott_promotion():
            _, vjp = jax.vjp(fn, *args)
            return vjp(ct)

    call.defvjp(fwd, bwd)
    return call


def _ott_cost(cost: str):
    costs = _ott()[0]
    return costs.SqEuclidean() if cost == "euclidean" else _geodesic_cost()


# -- exact W2 -------------------------------------------------------------------------
def _lsa_host(C: Float[ArrayLike, "*batch n n"]) -> Int[np.ndarray, "*batch n"]:
    """Optimal assignment (row i → column σ(i)) for each matrix of a batch, on the host.
    (`jax.pure_callback` passes `C` as a `jax.Array` on the host, not a NumPy array.)"""
    from scipy.optimize import linear_sum_assignment

    C = np.asarray(C, np.float64)
    flat = C.reshape((-1,) + C.shape[-2:])
    out = np.empty(flat.shape[:-1], np.int32)
    for k in range(flat.shape[0]):
        if not np.all(np.isfinite(flat[k])):
            # A NaN or infinite point (seen only under jit/vmap: eagerly it is refused)
            # makes its whole row or column non-finite, and every row and column is
            # matched: any matching gives the value NaN or inf. SciPy would raise
            # "cost matrix is infeasible" from inside the callback.
            out[k] = np.arange(flat.shape[-1])
            continue
        _, cols = linear_sum_assignment(flat[k])
        out[k] = cols
    return out.reshape(C.shape[:-1])


def _assign(C: Array) -> Array:
    shape = jax.ShapeDtypeStruct(C.shape[:-1], jnp.int32)
    return jax.pure_callback(
        _lsa_host, shape, jax.lax.stop_gradient(C), vmap_method="broadcast_all"
    )


def optimal_assignment(
    x: Float[Array, "n d"],
    y: Float[Array, "n d"],
    *,
    cost: str = "euclidean",
    max_points: int = EXACT_MAX_POINTS,
) -> Int[Array, " n"]:
    """Optimal matching `σ` between two clouds of the same size with uniform weights:
    `x_i ↔ y_σ(i)` minimises `Σ_i c(x_i, y_σ(i))`. Computed on the host by SciPy's
    `linear_sum_assignment` (a shortest-augmenting-path solver, O(n³)); jittable and
    vmappable through `jax.pure_callback`, not differentiable (it is piecewise constant).
    Clouds above `max_points` points, or whose cost matrix does not fit in memory
    (`JAXATTN_MAX_MEMORY`), are refused before anything is allocated.
    """
    x, y, _, _, cost = _check_pair(x, y, None, None, cost)
    _check_exact(x, y, max_points)
    return _assign(cost_matrix(x, y, cost))


def wasserstein2(
    x: Float[Array, "n d"],
    y: Float[Array, "n d"],
    *,
    cost: str = "euclidean",
    max_points: int = EXACT_MAX_POINTS,
) -> Float[Array, ""]:
    """Exact `W₂(μ, ν)` between `μ = (1/n) Σ δ_{x_i}` and `ν = (1/n) Σ δ_{y_j}`.

    For equal sizes and uniform weights an optimal plan is a permutation (Birkhoff), so
    `W₂² = min_σ (1/n) Σ_i c(x_i, y_σ(i))`.

    **Arguments:**

    - `x`, `y`: clouds `(n, d)` of the same size.
    - `cost`: `"euclidean"` (`c = |x − y|²`) or `"geodesic"` (squared great-circle
      distance; points on the unit sphere).
    - `max_points`: larger clouds are refused (the assignment is O(n³); see
      `EXACT_MAX_POINTS`), as are clouds whose n × n cost matrix does not fit in memory.

    **Returns:** `W₂` (not squared), a scalar. The assignment is found on the host
    (`optimal_assignment`); the value and its gradient are JAX (the gradient is exact
    where the optimal assignment is unique, and 0 at `x = y`).
    """
    x, y, _, _, cost = _check_pair(x, y, None, None, cost)
    _check_exact(x, y, max_points)
    C = cost_matrix(x, y, cost)
    sigma = _assign(C)
    matched = jnp.take_along_axis(C, sigma[:, None], axis=1)[:, 0]
    return _safe_sqrt(jnp.mean(matched))


# -- the line, and slices ---------------------------------------------------------------
def _w2sq_line(x: Array, a: Array, y: Array, b: Array) -> Array:
    """`W₂²` between 1-D measures: `∫₀¹ |F⁻¹(u) − G⁻¹(u)|² du`. The quantile functions are
    step functions; between consecutive breakpoints of the merged cumulative weights both
    are constant, so the integral is an exact finite sum."""
    ix, iy = jnp.argsort(x), jnp.argsort(y)
    xs, ys = x[ix], y[iy]
    ca, cb = jnp.cumsum(a[ix]), jnp.cumsum(b[iy])
    # Guard the last breakpoint against rounding: both totals are 1.
    ca = ca.at[-1].set(1.0)
    cb = cb.at[-1].set(1.0)
    u = jax.lax.stop_gradient(jnp.sort(jnp.concatenate([ca, cb])))
    du = jnp.diff(jnp.concatenate([jnp.zeros((1,), u.dtype), u]))
    mid = u - 0.5 * du
    i = jnp.clip(jnp.searchsorted(jax.lax.stop_gradient(ca), mid), 0, x.shape[0] - 1)
    j = jnp.clip(jnp.searchsorted(jax.lax.stop_gradient(cb), mid), 0, y.shape[0] - 1)
    diff = xs[i] - ys[j]
    return jnp.sum(du * diff * diff)


def wasserstein2_line(
    x: Float[ArrayLike, " n *one"] | Sequence[float],
    y: Float[ArrayLike, " m *one"] | Sequence[float],
    a: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
) -> Float[Array, ""]:
    """Exact `W₂` between two weighted measures on the line (any sizes), fully in JAX.

    **Arguments:**

    - `x`, `y`: points `(n,)` or `(n, 1)`, `(m,)` or `(m, 1)`.
    - `a`, `b`: weights (default uniform).

    **Returns:** `W₂`, from the sorted points (quantile functions); differentiable in the
    positions.
    """
    x, y = (
        (p[:, None] if p.ndim == 1 else p)
        if isinstance(p, (jax.Array, np.ndarray))
        else np.asarray(p, np.float64).reshape(-1, 1)
        for p in (x, y)
    )
    x, y, a, b, _ = _check_pair(x, y, a, b, "euclidean")
    if x.shape[1] != 1:
        raise ValueError(
            f"wasserstein2_line needs points on the line (d = 1), got d = "
            f"{x.shape[1]} (use sliced_wasserstein2)"
        )
    return _safe_sqrt(_w2sq_line(x[:, 0], a, y[:, 0], b))


def _unit_directions(key, n: int, d: int, dtype=None) -> Float[Array, "n d"]:
    """`n` directions uniform on the unit sphere `S^{d−1}` (normalised Gaussians)."""
    dtype = dtype or jnp.result_type(float)
    g = draw_normal(key, (n, d), dtype)  # in float64, cast: the same directions in either dtype
    return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def sliced_wasserstein2(
    x: Float[Array, "n d"],
    y: Float[Array, "m d"],
    a: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
    *,
    n_projections: int = 128,
    key: PRNGKeyArray,
) -> Float[Array, ""]:
    """Sliced `W₂`: `SW₂² = E_θ W₂²(θ#μ, θ#ν)` over directions θ uniform on the sphere,
    estimated with `n_projections` random directions drawn from `key`.

    Cost O(P·(n + m) log(n + m)) for P projections, so it serves at any n. It is a
    different metric from `W₂`: `SW₂ ≤ W₂`, and both vanish together. The projections
    are sorted in groups of about `SLICED_GROUP_ENTRIES / (n + m)` (all at once for
    small clouds), so memory stays O(n + m) beside the clouds at any `n_projections`.

    **Returns:** the estimate of `SW₂` (not squared).
    """
    x, y, a, b, _ = _check_pair(x, y, a, b, "euclidean")
    n_projections = check_int(n_projections, "n_projections", 1)
    (n, d), m = x.shape, y.shape[0]
    group = max(1, min(n_projections, SLICED_GROUP_ENTRIES // (n + m)))
    check_memory(
        x.dtype.itemsize * (n + m) * (d + 12.0 * group),
        f"sliced W2 of {n} and {m} points ({group} projections at a time)",
    )
    theta = _unit_directions(key, n_projections, d, x.dtype)

    def per(t):  # W₂² of the projections on directions `t (k, d)`
        return jax.vmap(lambda u, v: _w2sq_line(u, a, v, b), in_axes=(1, 1))(x @ t.T, y @ t.T)

    if group >= n_projections:
        per_direction = per(theta)
    else:
        per_direction = jax.lax.map(lambda t: per(t[None])[0], theta, batch_size=group)
    return _safe_sqrt(jnp.mean(per_direction))


# -- entropic OT through OTT-JAX --------------------------------------------------------
# Gradients by the envelope theorem (Danskin): the cost's gradient in the points is that
# of the cost at the optimal dual potentials, held fixed. Exact at convergence, and no
# differentiation through the Sinkhorn loop.
_DANSKIN = {"use_danskin": True, "implicit_diff": None}


def _geometry(pointcloud, x, y, cost, epsilon, batch_size):
    n, m = x.shape[0], y.shape[0]
    if batch_size is None and n * m > SINKHORN_DENSE_MAX:
        batch_size = SINKHORN_BLOCK
    return pointcloud.PointCloud(
        x, y, cost_fn=_ott_cost(cost), epsilon=epsilon, batch_size=batch_size
    )


def _check_sinkhorn_memory(what: str, n: int, m: int, d: int, item: int, batch_size) -> None:
    """Sinkhorn holds the n × m cost and kernel (dense), or one block of rows of them
    (`batch_size`), beside the points and the dual potentials."""
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", 1)
    rows = n if batch_size is None and n * m <= SINKHORN_DENSE_MAX else batch_size or SINKHORN_BLOCK
    check_memory(
        item * (3.0 * min(rows, n) * m + (n + m) * (d + 4)),
        f"{what} of {n} and {m} points in d = {d}",
    )


def _progress_fn(what: str):
    """OTT's progress callback: one line to stderr each time Sinkhorn measures its
    marginal error (every 10 iterations)."""
    import sys

    from ott import utils

    stream: typing.Any = sys.stderr  # OTT annotates io.TextIOBase
    return utils.default_progress_fn(
        fmt=what + ": iteration {iter} of at most {max_iter}, marginal error {error:.3g}",
        stream=stream,
    )


def _check_solver_args(epsilon, threshold, max_iterations):
    if epsilon is not None and not isinstance(epsilon, Tracer):
        e = float(epsilon)
        if not (math.isfinite(e) and e > 0):
            raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    if not (math.isfinite(float(threshold)) and float(threshold) > 0):
        raise ValueError(f"threshold must be finite and > 0, got {threshold!r}")
    check_int(max_iterations, "max_iterations", 1)


def _warn_unconverged(value: Array, max_iterations: int) -> Array:
    """Sinkhorn's NaN for a solve that did not converge, said out loud when the value is
    concrete (under `jit` the NaN alone carries it)."""
    if _concrete(value) and bool(jnp.isnan(value)):
        import warnings

        warnings.warn(
            f"Sinkhorn did not converge within max_iterations = {max_iterations} (the "
            "result is NaN): raise max_iterations, epsilon or threshold",
            RuntimeWarning,
            stacklevel=3,
        )
    return value


def entropic_ot(
    x: Float[Array, "n d"],
    y: Float[Array, "m d"],
    a: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
    *,
    epsilon: ScalarLike | None = None,
    cost: str = "euclidean",
    threshold: float = 1e-3,
    max_iterations: int = 2000,
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Array, ""]:
    """Entropic optimal transport cost `OT_ε(μ, ν)` solved by OTT-JAX's Sinkhorn.

    **Arguments:**

    - `x`, `y`, `a`, `b`: clouds and weights (any sizes).
    - `epsilon`: entropic regularisation, in units of the cost (squared length); `None`
      takes OTT's default (1/20 of the mean cost).
    - `cost`: `"euclidean"` or `"geodesic"` (squared distances).
    - `threshold`, `max_iterations`: Sinkhorn's stopping rule (marginal error in ℓ1).
    - `batch_size`: evaluate the cost in row blocks (memory O(batch·m)); chosen
      automatically above 2048² entries. The memory is checked before the solve
      (`JAXATTN_MAX_MEMORY`); the time is not bounded: each iteration evaluates all n·m
      costs (4·10¹⁰ at n = m = 2·10⁵).
    - `progress`: print the iteration and the marginal error to stderr every 10
      iterations (for long solves).

    **Returns:** OTT's regularised cost `⟨P, C⟩ + ε KL(P | a⊗b)`; NaN if Sinkhorn did not
    converge within `max_iterations` (with a `RuntimeWarning` when called outside `jit`).
    """
    x, y, a, b, cost = _check_pair(x, y, a, b, cost)
    _check_solver_args(epsilon, threshold, max_iterations)
    (n, d), m = x.shape, y.shape[0]
    _check_sinkhorn_memory("entropic OT", n, m, d, x.dtype.itemsize, batch_size)
    _, pointcloud, linear_problem, sinkhorn, _ = _ott()

    def solve(x, y, a, b):
        geom = _geometry(pointcloud, x, y, cost, epsilon, batch_size)
        solver = sinkhorn.Sinkhorn(
            threshold=threshold,
            max_iterations=int(max_iterations),
            progress_fn=_progress_fn("entropic OT") if progress else None,
            **_DANSKIN,
        )
        out = solver(linear_problem.LinearProblem(geom, a, b))
        return jnp.where(out.converged, out.reg_ot_cost, jnp.nan).astype(x.dtype)

    return _warn_unconverged(_promoting(solve)(x, y, a, b), max_iterations)


def sinkhorn_divergence(
    x: Float[Array, "n d"],
    y: Float[Array, "m d"],
    a: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
    *,
    epsilon: ScalarLike | None = None,
    cost: str = "euclidean",
    threshold: float = 1e-3,
    max_iterations: int = 2000,
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Array, ""]:
    """Debiased Sinkhorn divergence `S_ε(μ, ν) = OT_ε(μ, ν) − ½OT_ε(μ, μ) − ½OT_ε(ν, ν)`,
    through `ott.tools.sinkhorn_divergence`.

    `S_ε ≥ 0`, `S_ε(μ, μ) = 0`, and `S_ε → W₂²` as ε → 0 (with the squared cost), so
    `sqrt(S_ε)` is the entropic stand-in for `W₂` between clouds of any sizes and weights.
    Arguments as `entropic_ot`; the same ε is used in the three problems.

    **Returns:** `S_ε` (in squared-length units); NaN if a Sinkhorn solve did not converge
    (with a `RuntimeWarning` when called outside `jit`).
    """
    x, y, a, b, cost = _check_pair(x, y, a, b, cost)
    _check_solver_args(epsilon, threshold, max_iterations)
    _, pointcloud, _, _, sdiv = _ott()
    (n, d), m = x.shape, y.shape[0]
    if batch_size is None and max(n, m) ** 2 > SINKHORN_DENSE_MAX:
        batch_size = SINKHORN_BLOCK
    k = max(n, m)  # the largest of its three problems
    _check_sinkhorn_memory("a Sinkhorn divergence", k, k, d, x.dtype.itemsize, batch_size)

    def solve(x, y, a, b):
        value, out = sdiv.sinkhorn_divergence(
            pointcloud.PointCloud,
            x,
            y,
            a=a,
            b=b,
            cost_fn=_ott_cost(cost),
            epsilon=epsilon,
            batch_size=batch_size,
            solve_kwargs={
                "threshold": threshold,
                "max_iterations": int(max_iterations),
                "progress_fn": _progress_fn("Sinkhorn divergence") if progress else None,
                **_DANSKIN,
            },
        )
        ok = jnp.all(jnp.asarray([c for c in out.converged if c is not None]))
        return jnp.where(ok, value, jnp.nan).astype(x.dtype)

    return _warn_unconverged(_promoting(solve)(x, y, a, b), max_iterations)
