"""The smallest LoRA that changes the cluster partition at time T: optax on a smooth
surrogate of "the partition changed", bisection on the LoRA norm, and the norm the
Grönwall bound says is needed (`smallest_cluster_change`, `bound_needed_norm`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._base import Array, ArrayLike, Float, Int, PRNGKeyArray, check_choice
from .._model import TARGETS, AbstractField
from .._simulate import simulate
from .gradients import check_status, final_state, solve_options
from .response import perturbed


def _pair_distances(x):
    diff = x[:, None, :] - x[None, :, :]
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1) + 1e-30)


def change_margins(
    x: Float[Array, "n d"], labels: np.ndarray, threshold: float
) -> Float[Array, " m"]:
    """Margins whose positivity each *proves* the cluster partition of `x` (connected
    components at `threshold`) differs from `labels`:

    - merge: `threshold − |x_i − x_j|` for `i, j` in different clusters (they connect);
    - split: `min_{j ~ i} |x_i − x_j| − threshold` for `i` in a cluster of ≥ 2 (token
      `i` loses every link to its cluster).
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    dist = _pair_distances(x)
    same = labels[:, None] == labels[None, :]
    iu = np.triu_indices(n, 1)
    diff_pairs = ~same[iu]
    merge = threshold - dist[iu][np.nonzero(diff_pairs)[0]]
    mates = same & ~np.eye(n, dtype=bool)
    has = mates.any(axis=1)
    big = jnp.asarray(1e6, x.dtype)
    nearest = jnp.min(jnp.where(jnp.asarray(mates), dist, big), axis=1)
    split = nearest[np.nonzero(has)[0]] - threshold
    return jnp.concatenate([merge, split])


def change_score(x, labels, threshold, temperature) -> Float[Array, ""]:
    """Smooth maximum (`τ·logsumexp(m/τ)`) of `change_margins`: the differentiable
    surrogate. It is ≥ the largest margin, so the optimiser aims at a positive score and
    every candidate is then checked with the discrete `cluster_labels`."""
    m = change_margins(x, labels, threshold)
    return temperature * jax.nn.logsumexp(m / temperature)


@dataclasses.dataclass
class ClusterChange:
    """Result of `smallest_cluster_change` (norms are Frobenius = operator for rank 1)."""

    norm: float  # smallest norm found that changes the partition (upper estimate)
    direction: Float[np.ndarray, "d d"]  # unit ΔW
    labels_before: Int[np.ndarray, " n"]
    labels_after: Int[np.ndarray, " n"]
    clusters_before: int
    clusters_after: int
    kind: str  # "merge", "split" or "both"
    needed_displacement: float  # min over pairs of |d_ij − threshold| / 2
    bound_norm: float  # smallest norm along `direction` at which the bound reaches it
    bound_horizon: float  # at `norm`: last t up to which the bound certifies e ≤ needed
    history: dict[str, list]


def _labels(x, threshold, sphere):
    from .._analysis import cluster_labels

    return np.asarray(cluster_labels(jnp.asarray(x), threshold, sphere=sphere))


def _canon(labels):
    _, inv = np.unique(labels, return_inverse=True)
    return inv


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])))


def smallest_cluster_change(
    field: AbstractField,
    x0: Float[ArrayLike, "n d"],
    t1: float,
    target: str = "V",
    *,
    rank: int = 1,
    threshold: float = 0.1,
    temperature: float | None = None,
    steps: int = 40,
    lr: float = 0.05,
    bisections: int = 8,
    grow: float = 1.6,
    max_norm: float = 10.0,
    key: PRNGKeyArray | None = None,
    init_direction: Float[ArrayLike, "d d"] | None = None,
    log: Callable[[str], object] | None = None,
    **solve,
) -> ClusterChange:
    """Smallest LoRA of `W_target` (rank `rank`, by Frobenius norm) whose run has a
    different cluster partition at `t1` than the unperturbed run.

    For a norm `s`, Adam (optax) maximises the surrogate `change_score` of
    `x(t1; W + s·B A/|B A|_F)` over the factors `(A, B)` for `steps` steps (warm-started
    from the previous norm; first from `init_direction`, e.g. the worst-case direction).
    `s` grows by `grow` until the discrete partition changes, then `bisections` bisection
    steps shrink it. The result is an upper estimate of the true minimum (a local search).

    `bound_norm` is the norm along the found direction below which the a-priori Grönwall
    bound (`bound_a_priori`; docs/theory.md, 'Stability bound') certifies `e(t1)`
    smaller than
    `needed_displacement` — the smallest movement that can change the partition (a pair
    distance must cross `threshold`, and each moves by at most `2e`). The bound being
    rigorous, `bound_norm ≤ norm` must hold.
    """
    import optax

    temperature = 0.05 * threshold if temperature is None else float(temperature)
    log = log or (lambda *_: None)
    target = check_choice(target, "target", TARGETS)
    dtype = field.V.dtype
    d = field.d
    sphere = field.on_sphere
    x0 = jnp.asarray(x0, dtype)
    kw = solve_options(solve, "checkpoint", None)
    x_base, status = final_state(field, x0, t1, **kw)
    check_status(status)
    x_base = np.asarray(x_base)
    labels0 = _labels(x_base, threshold, sphere)
    dist0 = np.asarray(_pair_distances(jnp.asarray(x_base)))
    iu = np.triu_indices(x_base.shape[0], 1)
    needed = float(np.min(np.abs(dist0[iu] - threshold)) / 2.0)

    key = jax.random.key(0) if key is None else key
    if init_direction is not None:
        U, sv, Wt = np.linalg.svd(np.asarray(init_direction, np.float64))
        B0 = U[:, :rank] * sv[None, :rank]
        A0 = Wt[:rank]
    else:
        ka, kb = jax.random.split(key)
        A0 = np.asarray(jax.random.normal(ka, (rank, d), jnp.float64))
        B0 = np.asarray(jax.random.normal(kb, (d, rank), jnp.float64))
    theta = {"A": jnp.asarray(A0, dtype), "B": jnp.asarray(B0, dtype)}

    def unit(th):
        M = th["B"] @ th["A"]
        return M / jnp.sqrt(jnp.sum(M * M))

    def final(th, s):
        fld = perturbed(field, target, s * unit(th))
        return final_state(fld, x0, t1, **kw)[0]

    def loss(th, s):
        return -change_score(final(th, s), labels0, threshold, temperature)

    opt = optax.adam(lr)

    @jax.jit
    def step(th, state, s):
        val, g = jax.value_and_grad(loss)(th, s)
        # optax mixes its int32 step count with Python floats (bias correction), which
        # strict dtype promotion rejects; the update itself is float throughout.
        with jax.numpy_dtype_promotion("standard"):
            upd, state = opt.update(g, state, th)
            th = optax.apply_updates(th, upd)
        return th, state, val

    final_jit = jax.jit(final)
    hist = {"norm": [], "score": [], "changed": []}

    def attempt(th, s):
        """Optimise at norm s; return (changed?, best θ, labels)."""
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(th)
        s_arr = jnp.asarray(s, dtype)
        best = None
        for i in range(steps + 1):
            x = np.asarray(final_jit(th, s_arr))
            lab = _labels(x, threshold, sphere)
            if np.all(np.isfinite(x)) and not _same_partition(lab, labels0):
                best = (th, lab)
                break
            if i == steps:
                break
            th, state, _val = step(th, state, s_arr)
        score = float(-loss(th, s_arr))
        hist["norm"].append(float(s))
        hist["score"].append(score)
        hist["changed"].append(best is not None)
        log(
            f"  norm {s:.4g}: surrogate {score:+.3g}, partition "
            f"{'changed' if best is not None else 'unchanged'}"
        )
        return (best is not None), th, (best[1] if best else None)

    # Initial scale: first order, |J u| s ≈ needed displacement (cheap guess, never < 1e-4).
    s = max(1e-4, needed)
    lo, hi, th_hi, lab_hi = 0.0, None, theta, None
    while s <= max_norm:
        ok, theta, lab = attempt(theta, s)
        if ok:
            hi, th_hi, lab_hi = s, theta, lab
            break
        lo = s
        s *= grow
    if hi is None:
        raise RuntimeError(f"no LoRA of norm ≤ {max_norm} changed the clusters at t = {t1}")
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        ok, th, lab = attempt(th_hi, mid)
        if ok:
            hi, th_hi, lab_hi = mid, th, lab
        else:
            lo = mid
    assert lab_hi is not None  # set together with hi
    direction = np.asarray(unit(th_hi))
    x_new = np.asarray(final_jit(th_hi, jnp.asarray(hi, dtype)))
    m = np.asarray(change_margins(jnp.asarray(x_new), labels0, threshold))
    n_merge = int(np.sum(~(labels0[iu[0]] == labels0[iu[1]])))
    kinds = {"merge" if i < n_merge else "split" for i in np.nonzero(m > 0)[0]}
    kind = "both" if len(kinds) == 2 else (kinds.pop() if kinds else "other")

    # Norm the bound needs along this direction (the a-priori bound grows with the norm).
    bound_norm, bound_horizon = bound_needed_norm(
        field, target, direction, x0, t1, needed, hi, solve=solve
    )
    return ClusterChange(
        norm=float(hi),
        direction=direction,
        labels_before=_canon(labels0),
        labels_after=_canon(lab_hi),
        clusters_before=int(np.unique(labels0).size),
        clusters_after=int(np.unique(lab_hi).size),
        kind=kind,
        needed_displacement=needed,
        bound_norm=bound_norm,
        bound_horizon=bound_horizon,
        history=hist,
    )


def bound_needed_norm(
    field: AbstractField,
    target: str,
    direction,
    x0,
    t1: float,
    needed: float,
    s_max: float,
    *,
    solve: dict[str, Any] | None = None,
) -> tuple[float, float]:
    """What the Grönwall stability bound says about `W_target ← W_target + s·direction`.

    **Returns:** `(s_bound, horizon)`. `s_bound`: the smallest `s ≤ s_max` at which the
    a-posteriori Grönwall bound at `t1` reaches `needed` (geometric bisection; below it
    the bound certifies `e(t1) < needed`); `nan` if it stays below up to `s_max`
    (which would contradict a change at `s_max`), `0.0` if it is reached for every
    representable `s > 0` (the bound is vacuous at `t1`). `horizon`: at `s = s_max`, the
    last output time up to which the bound certifies `e ≤ needed`.
    """
    from .._bounds import bound_a_posteriori, certified_horizon

    kw = {k: v for k, v in (solve or {}).items() if k not in ("ts", "adjoint", "progress")}
    direction = np.asarray(direction, np.float64)
    base = simulate(field, x0, t1, **kw)
    ts, xs = np.asarray(base.ts), np.asarray(base.xs)

    def bound(s: float) -> np.ndarray:
        fp = perturbed(field, target, jnp.asarray(s * direction, field.V.dtype))
        xp = np.asarray(simulate(fp, x0, t1, **kw).xs)
        if not np.all(np.isfinite(xp)):
            return np.full(ts.shape, np.inf)
        return bound_a_posteriori(field, fp, ts, xs, xp).bound

    b_max = bound(s_max)
    horizon = float(certified_horizon(ts, b_max, needed))
    reaches = lambda s: bool(bound(s)[-1] >= needed)
    if not b_max[-1] >= needed:
        return float("nan"), horizon
    hi = lo = float(s_max)
    while reaches(lo):
        hi, lo = lo, lo / 10.0
        if lo < 1e-300:
            return 0.0, horizon
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi, horizon
