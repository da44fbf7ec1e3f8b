"""Mean-field attention dynamics: initial measures, ladders in n, measure-level divergence.

As n → ∞ the empirical measure `μⁿ_t = (1/n) Σ δ_{x_i(t)}` of the tokens follows the
continuity equation `∂_t μ + div(μ X[μ]) = 0` with the attention field
`X[μ](x) = ∫ e^{β⟨Qx, Ky⟩} V y dμ(y) / ∫ e^{β⟨Qx, Ky⟩} dμ(y)` (Geshkovski, Letrouit,
Polyanskiy, Rigollet, arXiv 2312.10794; Koubbi, Boussard, Hernandez, arXiv 2402.15415).
A finite system is that equation started from an empirical measure, so the package's
fields and `simulate` are already its particle discretisation. This module adds what is
needed to compare runs as measures: i.i.d. samples of one initial measure that are nested
in n (`InitialMeasure`), a ladder of simulations over n (`simulate_ladder`), and
Wasserstein distances along time between ladders or between an original and a
LoRA-perturbed flow (`ladder_distances`, `measure_divergence`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .._base import Array, ArrayLike, Float, PRNGKeyArray, ScalarLike, check_choice, draw
from .._model import AbstractField
from .._simulate import simulate
from .wasserstein import sinkhorn_divergence, sliced_wasserstein2, wasserstein2

MEASURES = ("uniform", "gaussian", "sphere", "mixture")
DISTANCES = ("exact", "sliced", "sinkhorn")


class InitialMeasure(eqx.Module):
    """An initial measure μ₀ on `R^d` to draw tokens from.

    Point `i` of a sample is drawn from its own key `fold_in(key, i)`, so the sample of
    size n is exactly the first n points of the sample of size m > n: runs at different
    n start from i.i.d. samples of the same μ₀, nested, and the same key gives the same
    numbers (to the last bit: XLA may round a vectorised norm differently by size).

    Build one with `InitialMeasure.uniform(d, low, high)` (the box `[low, high]^d`),
    `.gaussian(d, mean, std)`, `.sphere(d)` (uniform on `S^{d−1}`) or
    `.mixture(components, weights)`.
    """

    kind: str = eqx.field(static=True)
    d: int = eqx.field(static=True)
    params: tuple = eqx.field(static=True)
    components: tuple = ()
    weights: tuple = eqx.field(static=True, default=())

    @classmethod
    def uniform(cls, d: int, low: float = -1.0, high: float = 1.0) -> InitialMeasure:
        d = _check_dim(d)
        low, high = float(low), float(high)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"uniform measure needs finite low < high, got {low}, {high}")
        return cls("uniform", d, (low, high))

    @classmethod
    def gaussian(
        cls,
        d: int,
        mean: ScalarLike | Float[ArrayLike, " d"] | Sequence[float] = 0.0,
        std: float = 1.0,
    ) -> InitialMeasure:
        d = _check_dim(d)
        mean = np.broadcast_to(np.asarray(mean, np.float64), (d,))
        if not np.all(np.isfinite(mean)):
            raise ValueError("gaussian mean must be finite")
        std = float(std)
        if not (np.isfinite(std) and std > 0):
            raise ValueError(f"gaussian std must be finite and > 0, got {std}")
        return cls("gaussian", d, (tuple(float(m) for m in mean), std))

    @classmethod
    def sphere(cls, d: int) -> InitialMeasure:
        d = _check_dim(d)
        return cls("sphere", d, ())

    @classmethod
    def mixture(
        cls,
        components: Sequence[InitialMeasure],
        weights: Float[ArrayLike, " k"] | Sequence[float] | None = None,
    ) -> InitialMeasure:
        components = tuple(components)
        if not components or not all(isinstance(c, InitialMeasure) for c in components):
            raise ValueError("a mixture needs a non-empty sequence of InitialMeasure")
        dims = {c.d for c in components}
        if len(dims) > 1:
            raise ValueError(f"mixture components have different dimensions {sorted(dims)}")
        w = (
            np.full(len(components), 1.0 / len(components))
            if weights is None
            else np.asarray(weights, np.float64)
        )
        if (
            w.shape != (len(components),)
            or not np.all(np.isfinite(w))
            or np.any(w < 0)
            or abs(w.sum() - 1.0) > 1e-9
        ):
            raise ValueError(
                f"mixture weights must be {len(components)} non-negative numbers "
                f"summing to 1, got {np.asarray(weights).tolist()}"
            )
        return cls("mixture", dims.pop(), (), components, tuple(float(v) for v in w))

    def _point(self, key, dtype):
        if self.kind == "uniform":
            low, high = self.params
            return jax.random.uniform(key, (self.d,), dtype, low, high)
        if self.kind == "gaussian":
            mean, std = self.params
            return jnp.asarray(mean, dtype) + std * jax.random.normal(key, (self.d,), dtype)
        if self.kind == "sphere":
            g = jax.random.normal(key, (self.d,), dtype)
            return g / jnp.linalg.norm(g)
        k_pick, k_point = jax.random.split(key)
        pick = jax.random.choice(k_pick, len(self.components), p=jnp.asarray(self.weights, dtype))
        points = jnp.stack([c._point(k_point, dtype) for c in self.components])
        return points[pick]

    def sample(
        self, key: PRNGKeyArray, n: int, dtype: DTypeLike | None = None
    ) -> Float[Array, "n d"]:
        """`n` i.i.d. points; the first `k` points do not depend on `n` (to the last bit)."""
        if isinstance(n, bool) or int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        dtype = dtype or jnp.result_type(float)

        def points(key, dt):
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(int(n)))
            return jax.vmap(lambda k: self._point(k, dt))(keys)

        # drawn in float64 and cast: a seed names the same points in either dtype
        return draw(points, key, dtype)


def _check_dim(d) -> int:
    if isinstance(d, bool) or int(d) != d or int(d) < 1:
        raise ValueError(f"dimension d must be a positive integer, got {d!r}")
    return int(d)


def _check_ns(ns) -> list[int]:
    ns = [int(n) for n in ns]
    if not ns or any(n < 1 for n in ns) or sorted(set(ns)) != ns:
        raise ValueError(f"ns must be increasing positive sizes, got {ns}")
    return ns


def simulate_ladder(
    field: AbstractField,
    measure: InitialMeasure,
    ns: Sequence[int],
    t1: ScalarLike,
    *,
    key: PRNGKeyArray,
    ts: Float[ArrayLike, " T"] | Sequence[float] | None,
    dtype: DTypeLike | None = None,
    progress: Callable[[int], object] | None = None,
    **simulate_kw,
) -> dict[int, Float[np.ndarray, "T _n d"]]:
    """Simulate the same dynamics from nested samples of `measure` at each size in `ns`.

    **Arguments:**

    - `field`: the dynamics (any package field; use `kernel="blockwise"` or `"auto"` for
      large n).
    - `measure`: the initial measure; the run at size n starts from
      `measure.sample(key, n)` (a prefix of the largest sample).
    - `ns`: increasing sizes, e.g. `[2**k for k in range(6, 17)]`.
    - `t1`, `ts`, and `**simulate_kw` (solver, dt, …): passed to `simulate`.
    - `progress`: optional callable `progress(n)` called before each size.

    **Returns:** `{n: tokens (T, n, d)}` as float64 NumPy arrays.
    """
    ns = _check_ns(ns)
    if measure.d != field.d:
        raise ValueError(f"measure has d = {measure.d} but the field has d = {field.d}")
    dtype = dtype or field.V.dtype
    x_all = measure.sample(key, ns[-1], dtype)
    out = {}
    for n in ns:
        if progress is not None:
            progress(n)
        sol = simulate(field, x_all[:n], t1, ts=ts, dtype=dtype, **simulate_kw)
        if not sol.ok:
            raise RuntimeError(f"the solve at n = {n} failed: {'; '.join(sol.messages())}")
        out[n] = np.asarray(sol.xs, np.float64)
    return out


def _distance_fn(
    distance: str, *, key=None, n_projections=128, epsilon=None, cost="euclidean", **kw
):
    distance = check_choice(distance, "distance", DISTANCES)
    if distance == "exact":
        return lambda x, y: wasserstein2(x, y, cost=cost)
    if distance == "sliced":
        if cost != "euclidean":
            raise ValueError("sliced W2 uses the Euclidean cost")
        key = jax.random.key(0) if key is None else key
        return jax.jit(lambda x, y: sliced_wasserstein2(x, y, n_projections=n_projections, key=key))
    return lambda x, y: jnp.sqrt(
        jnp.maximum(sinkhorn_divergence(x, y, epsilon=epsilon, cost=cost, **kw), 0.0)
    )


def measure_divergence(
    xs: Float[ArrayLike, "T n d"], ys: Float[ArrayLike, "T m d"], *, distance: str = "exact", **kw
) -> Float[np.ndarray, " T"]:
    """`W(μ_t, ν_t)` at each saved time between two runs (tokens `(T, n, d)`, `(T, m, d)`).

    `distance`: `"exact"` (`wasserstein2`, equal sizes), `"sliced"`
    (`sliced_wasserstein2`, keyword `key`, `n_projections`) or `"sinkhorn"`
    (`sqrt(S_ε)`, keywords `epsilon`, `threshold`, …); `cost` as in `wasserstein2`.

    **Returns:** `(T,)` float64 distances (unlike the token metric `max_i |x_i − y_i|`, they
    ignore labels and compare runs at different n).
    """
    xa = np.asarray(xs, np.float64)
    ya = np.asarray(ys, np.float64)
    if xa.ndim != 3 or ya.ndim != 3 or xa.shape[0] != ya.shape[0]:
        raise ValueError(
            f"give two trajectories (T, n, d) with the same T, got {xa.shape} and {ya.shape}"
        )
    fn = _distance_fn(distance, **kw)
    return np.asarray([float(fn(jnp.asarray(a), jnp.asarray(b))) for a, b in zip(xa, ya)])


def ladder_distances(
    ladder: dict[int, Float[np.ndarray, "T _n d"]],
    *,
    reference: int | None = None,
    distance: str = "sliced",
    **kw,
) -> tuple[list[int], Float[np.ndarray, "k T"]]:
    """`W(μⁿ_t, μ^{N}_t)` for each size n of a ladder against the reference size N
    (default: the largest), at every saved time.

    **Returns:** `(ns, W)` with `ns` the sizes below N and `W` of shape `(len(ns), T)`.
    """
    N = max(ladder) if reference is None else int(reference)
    if N not in ladder:
        raise ValueError(f"reference size {N} is not in the ladder {sorted(ladder)}")
    ns = sorted(n for n in ladder if n < N)
    return ns, np.stack(
        [measure_divergence(ladder[n], ladder[N], distance=distance, **kw) for n in ns]
    ) if ns else np.zeros((0, ladder[N].shape[0]))


# ------------------------------------------------------------------ result records
# What the mean-field studies (`mean-field`, `mean-field-large`) compute and their figures
# draw: typed dictionaries of NumPy arrays.


class Clusters(TypedDict):
    """Cluster statistics at the last time of a ladder."""

    ns: list[int]
    count: np.ndarray  #: (seeds, len(ns)) number of clusters
    masses: list[list[np.ndarray]]  #: per seed, per n: cluster masses, descending


class Ladder(TypedDict):
    """Part 1 for one dimension: sliced W₂ to the largest run, exact W₂ between seeds."""

    ns: list[int]
    ts: np.ndarray
    N: int
    sliced: np.ndarray  #: (seeds, len(ns) − 1, T)
    exact_ns: list[int]
    exact: np.ndarray  #: (pairs, len(exact_ns), T)
    pairs: list[tuple[int, int]]
    clusters: Clusters
    sim_seconds: float
    exact_seconds: float
    ladders: list[dict[int, np.ndarray]]  #: per seed: tokens (T, n, d) by n


class LoraW2(TypedDict):
    """Part 3: W₂ divergence and departures, arrays (len(ns), len(eps), ...)."""

    eps: np.ndarray  #: descending
    ts: np.ndarray
    ns: list[int]
    W: np.ndarray
    D_W: np.ndarray
    t_app_W: np.ndarray
    t_dep_W: np.ndarray
    t_app_tok: np.ndarray
    t_dep_tok: np.ndarray
    fits: list[dict[str, Any]]
    fits_token: list[dict[str, Any]]


class BoundCheck(TypedDict):
    """Part 4: measured W₂ and the bound, arrays (len(eps), T)."""

    ts: np.ndarray
    eps: np.ndarray
    measured: np.ndarray
    bound: np.ndarray
    dobrushin: np.ndarray
    coupling: np.ndarray
    worst_ratio: float
    certified_horizon: list[float]


class LargeLadder(TypedDict):
    """Part 1: sliced W₂ of each rung to the largest, slopes per saved time."""

    ns: list[int]
    ts: np.ndarray
    N: int
    sliced: np.ndarray  #: (len(ns) − 1, T)
    fits: dict[str, dict[str, Any]]  #: `loglog_fit` by saved time
    seconds: dict[int, float]  #: solve time by n


class Departures(TypedDict):
    """Part 2: departures in W₂ (and token Hausdorff), arrays (len(ns), seeds, len(eps))."""

    eps: np.ndarray  #: descending
    ns: list[int]
    t_dep: np.ndarray
    t_dep_tok: np.ndarray
    prefactor: np.ndarray  #: T_dep·ε
    stats: list[dict[str, Any]]  #: per n: prefactor mean, sd, counts, slope over ε
