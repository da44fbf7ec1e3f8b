"""Mean-field limit of the attention dynamics: convergence in n, measure-level LoRA
divergence, departure times in W₂, and the W₂ stability bound.

Rescaled dynamics, Q = K = V = I, β = 1, μ₀ uniform on `[−1, 1]^d` (the setting of the
departure-time experiment). Four parts:

1. **Convergence in n.** For each seed, one nested sample of μ₀ and a ladder of runs
   n = 2^a … 2^b; `W(μⁿ_t, μ^{N}_t)` against the largest run N (sliced W₂, any sizes),
   and the exact W₂ between the runs of two independent seeds at the same n (which
   estimates twice the distance to the limit up to a constant). Log-log slopes with a
   bootstrap 95 % interval over seeds, compared with the rates n^(−1/2) and n^(−1/d).
2. **Clusters against n:** number of clusters and the cluster masses at the last time.
3. **LoRA in W₂:** `Ṽ = diag(1, …, 1 − ε)` from the same tokens; `W₂(μ_t, μ̃_t)` over t for
   several ε and n; departure time in W₂: the first time after the approach at which
   `W₂(μ̃_t, μ_{T_ref}) > δ` (reference clusters = the original run at T_ref), against ε.
4. **Bound:** `wasserstein_bound` beside the measured `W₂(μ_t, μ̃_t)` on a fine grid.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import (
    BoundCheck,
    Clusters,
    InitialMeasure,
    Ladder,
    LoraW2,
    approach_departure,
    cluster_labels,
    hausdorff,
    measure_divergence,
    simulate_ladder,
)
from .._base import ExperimentConfig, check_output_dir, write_json, write_npz
from .._bounds import wasserstein_bound
from .._model import LoRA, RescaledField
from .._simulate import simulate
from ._common import default_dtype, in_float64, loglog_fit, nanmedian, perturbation

NAME = "mean-field"
DESCRIPTION = (
    "mean-field limit: W2 convergence rate in n, clusters vs n, LoRA divergence "
    "and departure times in W2, W2 stability bound"
)
CLI_OPTIONS = ("eps",)


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of `mean-field`: the measure and dynamics, then the ladder (part 1–2), the
    LoRA runs (part 3) and the bound (part 4)."""

    dims: tuple[int, ...] = (2, 3)  #: dimensions of the ladder
    low: float = -1.0  #: μ₀ uniform on [low, high]^d
    high: float = 1.0  #: upper bound of μ₀'s support
    beta: float = 1.0  #: inverse temperature β
    dt: float = 0.2  #: step of the ladder solves
    seeds: int = 3  #: independent samples of μ₀ per ladder
    ladder_ns: tuple[int, ...] = tuple(2**k for k in range(6, 13))  #: n of the ladder
    ladder_ts: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)  #: saved times of the ladder
    exact_max_n: int = 2048  #: largest n of the exact W₂ between seeds
    n_projections: int = 256  #: projections of the sliced W₂
    fit_max_frac: float = 0.125  #: slope fitted over n ≤ fit_max_frac·N
    cluster_delta: float = 0.1  #: cluster threshold
    cluster_max_n: int = 4096  #: largest n of the cluster statistics
    lora_ns: tuple[int, ...] = (64, 256, 512)  #: n of the LoRA runs
    eps: tuple[float, ...] = (0.2, 0.1, 0.05, 0.025, 0.0125)  #: LoRA sizes ε
    lora_t1: float = 100.0  #: end time of the LoRA runs
    lora_dt: float = 0.1  #: RK4 step of the LoRA runs
    lora_every: float = 1.0  #: saved-time spacing of the LoRA runs
    t_ref: float = 20.0  #: time of the reference clusters (a saved time)
    delta: float = 0.1  #: departure threshold in W₂
    bound_n: int = 64  #: tokens of the bound check
    bound_t1: float = 2.0  #: end time of the bound check
    bound_every: float = 0.02  #: saved-time spacing of the bound check (step: a fifth)

    QUICK: ClassVar[dict[str, Any]] = dict(
        dims=(2,),
        seeds=2,
        ladder_ns=(16, 32, 64),
        ladder_ts=(0.0, 2.0),
        exact_max_n=64,
        n_projections=64,
        fit_max_frac=0.5,
        cluster_max_n=64,
        lora_ns=(16, 32),
        eps=(0.1, 0.05),
        lora_t1=30.0,
        lora_every=1.0,
        t_ref=20.0,
        bound_n=8,
        bound_t1=1.0,
        bound_every=0.05,
    )


def _progress(total, desc):
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _ladder_part(cfg: Config, d: int, dtype, log) -> Ladder:
    """Ladders for every seed; sliced W vs the largest run, exact W₂ between seeds."""
    field = RescaledField(d=d, beta=cfg.beta, dtype=dtype, kernel="auto")
    measure = InitialMeasure.uniform(d, cfg.low, cfg.high)
    ns, ts = list(cfg.ladder_ns), np.asarray(cfg.ladder_ts, np.float64)
    N = ns[-1]
    ladders: list[dict[int, np.ndarray]] = []
    sim_seconds = 0.0
    bar = _progress(cfg.seeds * len(ns), f"ladder d={d}")
    for s in range(cfg.seeds):
        t0 = time.perf_counter()
        lad = simulate_ladder(
            field,
            measure,
            ns,
            float(ts[-1]),
            key=jax.random.key(s),
            ts=ts,
            dt=cfg.dt,
            progress=(lambda n: bar.update(1)) if bar else None,
        )
        sim_seconds += time.perf_counter() - t0
        ladders.append(lad)
        log(f"  d={d} seed {s}: ladder n = {ns[0]}…{N} in {time.perf_counter() - t0:.1f} s")
    if bar:
        bar.close()
    key = jax.random.key(12345)
    sliced = np.stack(
        [
            [
                measure_divergence(
                    lad[n], lad[N], distance="sliced", key=key, n_projections=cfg.n_projections
                )
                for n in ns[:-1]
            ]
            for lad in ladders
        ]
    )  # (S, n, T)
    exact_ns = [n for n in ns if n <= cfg.exact_max_n]
    pairs = [(i, j) for i in range(cfg.seeds) for j in range(i + 1, cfg.seeds)]
    t0 = time.perf_counter()
    exact = np.stack(
        [
            [measure_divergence(ladders[i][n], ladders[j][n], distance="exact") for n in exact_ns]
            for i, j in pairs
        ]
    )  # (P, n, T)
    exact_seconds = time.perf_counter() - t0
    clusters = _cluster_stats(
        ladders, [n for n in ns if n <= cfg.cluster_max_n], cfg.cluster_delta, dtype
    )
    return Ladder(
        ns=ns,
        ts=ts,
        N=N,
        sliced=sliced,
        exact_ns=exact_ns,
        exact=exact,
        pairs=pairs,
        clusters=clusters,
        sim_seconds=sim_seconds,
        exact_seconds=exact_seconds,
        ladders=ladders,
    )


def _cluster_stats(
    ladders: list[dict[int, np.ndarray]], ns: list[int], delta: float, dtype
) -> Clusters:
    """Cluster count and masses (sorted, descending) at the last time, per seed and n."""
    labels_fn = jax.jit(lambda x: cluster_labels(x, delta))
    count: list[list[int]] = []
    masses_all: list[list[np.ndarray]] = []
    for lad in ladders:
        counts, masses = [], []
        for n in ns:
            lab = np.asarray(labels_fn(jnp.asarray(lad[n][-1], dtype)))
            _, sizes = np.unique(lab, return_counts=True)
            counts.append(int(sizes.size))
            masses.append(np.sort(sizes)[::-1] / n)
        count.append(counts)
        masses_all.append(masses)
    return Clusters(ns=ns, count=np.asarray(count), masses=masses_all)


def _fit(ns, curves, max_n):
    """Log-log fit of the median over groups of `curves (G, len(ns))`, bootstrap over G."""
    ns = np.asarray(ns, np.float64)
    keep = ns <= max_n
    return loglog_fit(ns[keep], nanmedian(curves[:, keep], axis=0), groups=curves[:, keep])


_LORA_ARRAYS = ("W", "D_W", "t_app_W", "t_dep_W", "t_app_tok", "t_dep_tok")


def lora_departures(cfg: Config, dtype, log, seed: int = 0) -> LoraW2:
    """W₂(μ_t, μ̃_t) and departure in W₂ for each n and ε (original run: V = I); the
    tokens are the first n of one sample of μ₀ (key `seed`)."""
    d = 2
    eps = np.sort(np.asarray(cfg.eps, np.float64))[::-1]
    field = RescaledField(d=d, beta=cfg.beta, dtype=dtype)
    measure = InitialMeasure.uniform(d, cfg.low, cfg.high)
    ts = np.arange(0.0, cfg.lora_t1 + 1e-9, cfg.lora_every)
    if np.min(np.abs(ts - cfg.t_ref)) > 1e-9:
        raise ValueError(
            f"t_ref = {cfg.t_ref} must be a multiple of lora_every "
            f"= {cfg.lora_every} within lora_t1 = {cfg.lora_t1}"
        )
    ns = list(cfg.lora_ns)
    acc: dict[str, list[np.ndarray]] = {k: [] for k in _LORA_ARRAYS}
    x_all = measure.sample(jax.random.key(seed), max(ns), dtype)
    for n in ns:
        t0 = time.perf_counter()
        x0 = x_all[:n]
        # One stacked solve: the original flow (a zero LoRA) and every ε.
        sol = simulate(
            field.with_lora(perturbation(np.concatenate([[0.0], eps]), dtype)),
            x0,
            float(ts[-1]),
            dt=cfg.lora_dt,
            ts=ts,
        )
        if not sol.ok:
            raise RuntimeError(f"a LoRA solve failed at n = {n}: {sol.messages()}")
        xo, xp = np.asarray(sol.xs[0]), np.asarray(sol.xs[1:])  # (T, n, d), (E, T, n, d)
        # Reference clusters: the original tokens at T_ref (a grid time).
        centres = xo[int(np.argmin(np.abs(ts - cfg.t_ref)))]
        W = np.stack([measure_divergence(xo, xp[e]) for e in range(eps.size)])
        D_W = np.stack(
            [
                measure_divergence(np.broadcast_to(centres, xp[e].shape), xp[e])
                for e in range(eps.size)
            ]
        )
        # Token metric, one time at a time (lax.map): memory O(n²), not O(E·T·n²).
        tok = np.stack(
            [
                np.asarray(
                    jax.lax.map(lambda x: hausdorff(x, jnp.asarray(centres)), jnp.asarray(xp[e]))
                )
                for e in range(eps.size)
            ]
        )
        tsj = jnp.asarray(ts, dtype)
        app_w, dep_w = jax.vmap(lambda D: approach_departure(tsj, D, cfg.delta))(
            jnp.asarray(D_W, dtype)
        )
        app_t, dep_t = jax.vmap(lambda D: approach_departure(tsj, D, cfg.delta))(
            jnp.asarray(tok, dtype)
        )
        for k, v in zip(_LORA_ARRAYS, (W, D_W, app_w, dep_w, app_t, dep_t)):
            acc[k].append(np.asarray(v))
        log(
            f"  n={n}: {eps.size} values of ε to t = {ts[-1]:g} in "
            f"{time.perf_counter() - t0:.1f} s; departure in W2: "
            + ", ".join(f"ε={e:g}: {t:.1f}" for e, t in zip(eps, np.asarray(dep_w)))
        )
    st = {k: np.stack(v) for k, v in acc.items()}  # (n, E, ...)
    return LoraW2(
        eps=eps,
        ts=ts,
        ns=ns,
        W=st["W"],
        D_W=st["D_W"],
        t_app_W=st["t_app_W"],
        t_dep_W=st["t_dep_W"],
        t_app_tok=st["t_app_tok"],
        t_dep_tok=st["t_dep_tok"],
        # T_dep ≈ c·ε^s for each n (points where a departure was seen).
        fits=[loglog_fit(eps, st["t_dep_W"][i]) for i in range(len(ns))],
        fits_token=[loglog_fit(eps, st["t_dep_tok"][i]) for i in range(len(ns))],
    )


def _bound_part(cfg: Config, dtype) -> BoundCheck:
    """Measured W₂(μ_t, μ̃_t) against `wasserstein_bound` on a fine grid, per ε."""
    d = 2
    eps = np.sort(np.asarray(cfg.eps, np.float64))[::-1]
    field = RescaledField(d=d, beta=cfg.beta, dtype=dtype)
    x0 = InitialMeasure.uniform(d, cfg.low, cfg.high).sample(jax.random.key(0), cfg.bound_n, dtype)
    ts = np.arange(0.0, cfg.bound_t1 + 1e-9, cfg.bound_every)
    xo = np.asarray(simulate(field, x0, float(ts[-1]), dt=cfg.bound_every / 5, ts=ts).xs)
    acc: dict[str, list[np.ndarray]] = {
        k: [] for k in ("measured", "bound", "dobrushin", "coupling")
    }
    for e in eps:
        fp = field.with_lora(
            LoRA(jnp.asarray([[0.0, 1.0]], dtype), jnp.asarray([[0.0], [-e]], dtype), 1.0, "V")
        )
        xp = np.asarray(simulate(fp, x0, float(ts[-1]), dt=cfg.bound_every / 5, ts=ts).xs)
        b = wasserstein_bound(field, fp, ts, xo, xp)
        acc["measured"].append(measure_divergence(xo, xp))
        for k in ("bound", "dobrushin", "coupling"):
            acc[k].append(getattr(b, k))
    st = {k: np.stack(v) for k, v in acc.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(st["bound"] > 0, st["measured"] / st["bound"], 0.0)
    ok = np.cumprod(st["bound"] <= cfg.delta, axis=1).astype(bool)
    return BoundCheck(
        ts=ts,
        eps=eps,
        measured=st["measured"],
        bound=st["bound"],
        dobrushin=st["dobrushin"],
        coupling=st["coupling"],
        worst_ratio=float(np.nanmax(ratio[:, 1:])),
        certified_horizon=[float(ts[max(int(r.sum()) - 1, 0)]) for r in ok],
    )


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the four mean-field parts (module docstring) and write `convergence.png`,
    `clusters.png`, `lora_w2.png`, `departure_w2.png`, `bound.png`, `lora_w2.npz`,
    `bound.npz` and `summary.json` into `out_dir`; return the summary (the dict in
    `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = default_dtype()
    t_start = time.perf_counter()
    summary: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "dtype": jnp.dtype(dtype).name,
        "config": cfg.to_dict(),
    }

    ladders: dict[int, Ladder] = {}
    for _i, d in enumerate(cfg.dims):
        log(
            f"[1/3] ladder d = {d}: n = {cfg.ladder_ns[0]} … {cfg.ladder_ns[-1]}, "
            f"{cfg.seeds} seeds, t ∈ {list(cfg.ladder_ts)} ..."
        )
        lad = _ladder_part(cfg, d, dtype, log)
        ladders[d] = lad
        N = lad["N"]
        max_n = cfg.fit_max_frac * N
        fits = {}
        for k, t in enumerate(lad["ts"]):
            fits[f"{t:g}"] = {
                "sliced_vs_largest": _fit(lad["ns"][:-1], lad["sliced"][:, :, k], max_n),
                "exact_between_seeds": _fit(lad["exact_ns"], lad["exact"][:, :, k], np.inf),
            }
        cl = lad["clusters"]
        summary[f"d{d}"] = {
            "ns": lad["ns"],
            "reference_n": N,
            "ts": lad["ts"],
            "sliced_w2_vs_largest_median": nanmedian(lad["sliced"], axis=0),
            "exact_w2_between_seeds_median": nanmedian(lad["exact"], axis=0),
            "exact_ns": lad["exact_ns"],
            "fits": fits,
            "rates_compared": {"n^-1/2": -0.5, "n^-1/d": -1.0 / d},
            "clusters": {
                "ns": cl["ns"],
                "count_per_seed": cl["count"],
                "largest_masses_seed0": [m[:6] for m in cl["masses"][0]],
            },
            "simulation_seconds": round(lad["sim_seconds"], 1),
            "exact_w2_seconds": round(lad["exact_seconds"], 1),
        }
        write_npz(
            os.path.join(out_dir, f"ladder_d{d}.npz"),
            ns=np.asarray(lad["ns"]),
            ts=lad["ts"],
            sliced=lad["sliced"],
            exact=lad["exact"],
            exact_ns=np.asarray(lad["exact_ns"]),
            cluster_count=cl["count"],
        )

    log(f"[2/3] LoRA in W2: n ∈ {list(cfg.lora_ns)}, ε ∈ {list(cfg.eps)}, t ≤ {cfg.lora_t1} ...")
    lora = lora_departures(cfg, dtype, log)
    write_npz(
        os.path.join(out_dir, "lora_w2.npz"),
        eps=lora["eps"],
        ts=lora["ts"],
        ns=np.asarray(lora["ns"]),
        W=lora["W"],
        D_W=lora["D_W"],
        t_departure_w2=lora["t_dep_W"],
        t_departure_token=lora["t_dep_tok"],
    )
    log("[3/3] bound against measured W2 ...")
    bound = _bound_part(cfg, dtype)
    summary["lora"] = {
        "eps": lora["eps"],
        "ns": lora["ns"],
        "w2_at_times": {
            f"{t:g}": lora["W"][:, :, i]
            for t in (5.0, 10.0, 20.0, lora["ts"][-1])
            for i in [int(np.argmin(np.abs(lora["ts"] - t)))]
        },
        "t_approach_w2": lora["t_app_W"],
        "t_departure_w2": lora["t_dep_W"],
        "t_departure_token_hausdorff": lora["t_dep_tok"],
        "departure_fit_w2": {str(n): f for n, f in zip(lora["ns"], lora["fits"])},
        "departure_fit_token": {str(n): f for n, f in zip(lora["ns"], lora["fits_token"])},
        "delta": cfg.delta,
        "t_ref": cfg.t_ref,
    }
    summary["bound"] = {
        "n": cfg.bound_n,
        "eps": bound["eps"],
        "worst_measured_over_bound": bound["worst_ratio"],
        "bound_holds": bool(bound["worst_ratio"] <= 1.0),
        "certified_horizon_w2_le_delta": bound["certified_horizon"],
    }
    write_npz(
        os.path.join(out_dir, "bound.npz"),
        **{k: np.asarray(v) for k, v in bound.items() if k not in ("worst_ratio",)},
    )
    log("figures and summary ...")
    from .. import plotting

    plotting.mean_field_convergence(ladders, summary, os.path.join(out_dir, "convergence.png"))
    plotting.mean_field_clusters(
        ladders, os.path.join(out_dir, "clusters.png"), cluster_delta=cfg.cluster_delta
    )
    plotting.mean_field_lora_w2(lora, os.path.join(out_dir, "lora_w2.png"))
    plotting.mean_field_departure(lora, os.path.join(out_dir, "departure_w2.png"), delta=cfg.delta)
    plotting.mean_field_bound(
        bound, os.path.join(out_dir, "bound.png"), delta=cfg.delta, n=cfg.bound_n
    )
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    summary["notes"] = (
        "sliced_vs_largest: sliced W2 (random projections, fixed key) between the run at n "
        "and the largest run of the same seed (nested samples); fitted over n ≤ "
        "fit_max_frac·N. exact_between_seeds: exact W2 between the runs of two independent "
        "seeds at the same n. Slopes: least squares in log-log on the median over "
        "seeds/pairs, 95 % interval by bootstrap over seeds/pairs. Departure in W2: first "
        "time after the approach with W2(μ̃_t, μ_{T_ref}) > delta (inf: none before the end; "
        "null in JSON)."
    )
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(f"done in {summary['wall_seconds']} s")
    return summary
