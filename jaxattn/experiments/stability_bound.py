"""Stability bound: measured divergence against the one-sided and Grönwall bounds, over ε,
for Q, K, V.

Rescaled dynamics, Q = K = V = I, β = 1, tokens `U[−1, 1]^d`. For each target weight, a
random rank-1 direction is scaled to operator norms `ε` (a stacked LoRA), and one vmapped
solve covers every (ε, initial condition) pair. For each pair we compute `e(t)`, the
one-sided bound (`bound_one_sided`, the default) and the a-posteriori Grönwall bound on
the same grid, the ratios measured/bound (must be ≤ 1), the certified horizons for
`e ≤ η` and the measured one (the last grid time before `e` first exceeds `η`, or `t1`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import divergence
from .._base import ExperimentConfig, check_output_dir, write_json, write_npz
from .._bounds import bound_a_posteriori, bound_one_sided, certified_horizon
from .._model import LoRA, RescaledField
from .._simulate import simulate
from ._common import default_dtype, in_float64, uniform_tokens

NAME = "stability-bound"
DESCRIPTION = "divergence vs the one-sided and Grönwall bounds over ε for Q, K, V; horizons"
CLI_OPTIONS = ("eps",)


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the stability-bound study (defaults: the full run; `QUICK`: `--quick`)."""

    n: int = 16  #: tokens per initial condition
    d: int = 2  #: token dimension
    low: float = -1.0  #: initial tokens ~ U[low, high]^d
    high: float = 1.0  #: upper bound of the initial tokens
    n_ic: int = 16  #: random initial conditions
    eps: tuple[float, ...] = tuple(float(v) for v in np.logspace(-5, -0.5, 10))  #: ‖ΔW‖₂ values
    t1: float = 2.0  #: end time
    dt: float = 0.01  #: solver step
    eta: float = 0.1  #: certified horizon: largest t with bound ≤ eta
    seed: int = 0  #: seed of the initial conditions
    direction_seed: int = 7  #: seed of the random LoRA direction (+0, +1, +2 for Q, K, V)
    probe_times: tuple[float, ...] = (0.1, 0.5, 1.0)  #: times of the bound-vs-ε figure

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=6, n_ic=4, eps=(1e-4, 1e-2, 1e-1), t1=0.5, probe_times=(0.1, 0.5)
    )


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the bound-against-measurement study (module docstring) and write
    `bound_vs_eps.png`, `horizon_vs_eps.png`, `stability_bound.npz` and `summary.json` into
    `out_dir`; return the summary (the dict in `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = default_dtype()
    t_start = time.perf_counter()
    eps = np.asarray(cfg.eps, np.float64)
    x0 = uniform_tokens(cfg.seed, cfg.n_ic, cfg.n, cfg.d, cfg.low, cfg.high, dtype)
    base = RescaledField(d=cfg.d, dtype=dtype)
    log(f"[1/3] base runs: {cfg.n_ic} initial conditions, n={cfg.n}, t1={cfg.t1}")
    sol0 = simulate(base, x0, cfg.t1, dt=cfg.dt)
    ts = np.asarray(sol0.ts)
    xs0 = np.asarray(sol0.xs)
    probe_idx = [int(np.argmin(np.abs(ts - t))) for t in cfg.probe_times]

    results = {}
    worst, ratios_all = 0.0, []
    for i, target in enumerate(("Q", "K", "V")):
        log(
            f"[2/3] LoRA on {target}: {eps.size} sizes × {cfg.n_ic} initial conditions "
            "in one solve, then bounds ..."
        )
        lora = LoRA.random(
            cfg.d,
            rank=1,
            norm=eps,
            target=target,
            key=jax.random.key(cfg.direction_seed + i),
            dtype=dtype,
        )
        sol = simulate(base.with_lora(lora), x0, cfg.t1, dt=cfg.dt)
        if not sol.ok:
            raise RuntimeError(f"solve failed for target {target}: {sol.messages()}")
        xs = np.asarray(sol.xs)  # (E, B, T, n, d)
        e = np.asarray(divergence(sol0.xs[None], sol.xs))  # (E, B, T)
        bounds, gronwall = np.empty_like(e), np.empty_like(e)
        x0_np = np.asarray(x0)
        for k in range(eps.size):
            single = base.with_lora(LoRA(lora.A[k], lora.B[k], float(lora.alpha), target))
            gronwall[k] = bound_a_posteriori(base, single, ts, xs0, xs[k]).bound
            bounds[k] = bound_one_sided(base, single, ts, x0_np).bound  # all ICs at once
        ratio, gratio = _ratios(e, bounds), _ratios(e, gronwall)
        finite = ratio[..., 1:][np.isfinite(bounds[..., 1:])]
        ratios_all.append(finite)
        worst = max(worst, float(finite.max()), float(np.nanmax(gratio[..., 1:])))
        horizon = certified_horizon(ts, bounds, cfg.eta)  # (E, B)
        g_horizon = certified_horizon(ts, gronwall, cfg.eta)
        measured = certified_horizon(ts, e, cfg.eta)  # the last grid time with e ≤ η so far
        med_h = np.nanmedian(horizon, axis=1)
        fit = _horizon_fit(eps, med_h)
        with np.errstate(divide="ignore", invalid="ignore"):
            over = measured / horizon
            g_over = measured / g_horizon
        results[target] = {
            "e_probe": e[..., probe_idx],
            "bound_probe": bounds[..., probe_idx],
            "gronwall_probe": gronwall[..., probe_idx],
            "horizon": horizon,
            "gronwall_horizon": g_horizon,
            "measured_horizon": measured,
            "median_horizon": med_h,
            "median_gronwall_horizon": np.nanmedian(g_horizon, axis=1),
            "median_measured_horizon": np.median(measured, axis=1),
            "measured_over_certified": over,
            "measured_over_gronwall": g_over,
            "fit": fit,
            "worst_ratio": float(finite.max()),
            "median_ratio": float(np.median(finite)),
        }

    log("[3/3] figures and summary ...")
    from .. import plotting

    plotting.bound_vs_eps(eps, ts[probe_idx], results, os.path.join(out_dir, "bound_vs_eps.png"))
    plotting.horizon_vs_eps(
        eps, results, os.path.join(out_dir, "horizon_vs_eps.png"), eta=cfg.eta, t_end=cfg.t1
    )
    write_npz(
        os.path.join(out_dir, "stability_bound.npz"),
        eps=eps,
        ts_probe=ts[probe_idx],
        **{
            f"{k}_{name}": v[name]
            for k, v in results.items()
            for name in (
                "e_probe",
                "bound_probe",
                "gronwall_probe",
                "horizon",
                "gronwall_horizon",
                "measured_horizon",
            )
        },
    )
    allr = np.concatenate(ratios_all)
    over = np.concatenate([v["measured_over_certified"].ravel() for v in results.values()])
    g_over = np.concatenate([v["measured_over_gronwall"].ravel() for v in results.values()])
    summary = {
        "experiment": NAME,
        "quick": quick,
        "dtype": jnp.dtype(dtype).name,
        "config": cfg.to_dict(),
        "worst_measured_over_bound": worst,
        "median_measured_over_bound": float(np.median(allr)),
        "bound_holds": bool(worst <= 1.0),
        "median_measured_over_certified_horizon": _median_or_none(over),
        "median_measured_over_gronwall_horizon": _median_or_none(g_over),
        "targets": {
            k: {
                "worst_ratio": v["worst_ratio"],
                "median_ratio": v["median_ratio"],
                "median_certified_horizon": v["median_horizon"],
                "median_gronwall_horizon": v["median_gronwall_horizon"],
                "median_measured_horizon": v["median_measured_horizon"],
                "median_measured_over_certified_horizon": _median_or_none(
                    v["measured_over_certified"]
                ),
                "horizon_vs_log_inv_eps": v["fit"],
            }
            for k, v in results.items()
        },
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "notes": "bound = the one-sided bound (bound_one_sided); ratios measured/bound over "
        "every grid time t > 0 where the bound is finite, all ε and initial conditions "
        "(worst_measured_over_bound covers the Grönwall bound too); horizon = largest grid "
        "t with bound ≤ eta (null if already above eta at the first step); measured "
        "horizon = largest grid t with e ≤ eta so far (t1 if e never exceeds eta).",
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(
        f"done in {summary['wall_seconds']} s: worst measured/bound = {worst:.3g}, "
        f"median = {summary['median_measured_over_bound']:.3g}"
    )
    return summary


def _ratios(e, bounds):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bounds > 0, e / bounds, np.where(e > 0, np.inf, 0.0))


def _median_or_none(x):
    """Median over the defined entries (an infinite ratio counts: it is a horizon of 0)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    m = float(np.median(x)) if x.size else np.nan
    return m if np.isfinite(m) else None


def _horizon_fit(eps, med_h):
    """Fit horizon = a + b·log(1/ε) (least squares) where the horizon is defined."""
    x = np.log(1.0 / eps)
    ok = np.isfinite(med_h)
    if ok.sum() < 2:
        return None
    b, a = np.polyfit(x[ok], med_h[ok], 1)
    return {"intercept": float(a), "per_unit_log_inv_eps": float(b)}
