"""Short term close, long term apart — the paper's LoRA-on-V figure.

n = 50 tokens in d = 2, `x0 ~ U[-5, 5]²`, rescaled dynamics, Q = K = V = I against
`Ṽ = diag(1, 1 − ε)` (the exact rank-1 LoRA `ΔV = −ε e₂e₂ᵀ`), RK4 with dt = 0.1 to T = 40.
Both runs are one vmapped solve over a stacked LoRA (ε = 0 and ε).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import cluster_count, divergence
from .._base import ExperimentConfig, check_output_dir, draw_uniform, write_json, write_npz
from .._bounds import bound_a_posteriori, bound_a_priori, bound_one_sided, certified_horizon
from .._model import LoRA, RescaledField
from .._simulate import simulate
from ._common import in_float64

NAME = "lora-divergence"
DESCRIPTION = "original vs LoRA run side by side, e(t) with the bounds, Q/K/V compared"
CLI_OPTIONS = ()


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the LoRA-divergence figure (defaults: the full run; `QUICK`: `--quick`)."""

    n: int = 50  #: tokens
    d: int = 2  #: token dimension
    low: float = -5.0  #: initial tokens ~ U[low, high]^d
    high: float = 5.0  #: upper bound of the initial tokens
    eps: float = 0.1  #: size of the LoRA (‖ΔV‖₂)
    t1: float = 40.0  #: end time
    dt: float = 0.1  #: solver step
    seed: int = 0  #: seed of the initial tokens
    solver: str = "rk4"  #: fixed-step solver (euler, heun, rk4)
    cluster_threshold: float = 0.1  #: distance under which tokens count as one cluster
    separation: float = 0.1  #: e(t) above this: the runs are apart
    eta: float = 0.1  #: certified horizon: largest t with bound ≤ eta
    short_t1: float = 0.5  #: end time of the fine short-time solve
    short_dt: float = 1e-3  #: its step
    gif_frames: int = 80  #: frames of trajectories.gif
    compare_seed: int = 1  #: seed of the random Q/K/V LoRA directions
    #: LoRA sizes ε of the horizon sweep: measured and certified horizons against ε
    #: (empty: no sweep)
    horizon_eps: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
    horizon_t1: float = 1.0  #: end of the sweep's bound grid (step short_dt)
    compare_targets: bool = True  #: also run the random Q, K and V LoRAs
    gif: bool = True  #: write trajectories.gif
    #: times of the snapshots in trajectories.png (None: 0, 2, 5, 10, 20, t1; 5 evenly
    #: spaced times when t1 < 20)
    snapshot_times: tuple[float, ...] | None = None

    def check(self) -> None:
        if self.snapshot_times is not None and (
            not self.snapshot_times or any(not 0 <= t <= self.t1 for t in self.snapshot_times)
        ):
            raise ValueError(
                f"snapshot_times must be times in [0, t1 = {self.t1:g}], got "
                f"{list(self.snapshot_times)}"
            )

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=20, t1=10.0, gif_frames=12, horizon_eps=(0.1, 0.01), horizon_t1=0.3
    )


def _horizon_sweep(cfg, base, x0, dtype, log) -> list[dict]:
    """Measured and certified horizons (one-sided and a-posteriori Grönwall bounds) of
    `e ≤ eta` for each ε of `cfg.horizon_eps`, on the fine grid (step `short_dt`) to
    `horizon_t1`; a measured horizon past it is read off the `dt` grid to `t1`."""
    rows = []
    f0 = base.with_lora(paper_lora(0.0, dtype))
    for k, eps in enumerate(cfg.horizon_eps):
        f1 = base.with_lora(paper_lora(eps, dtype))
        pair = base.with_lora(LoRA.stack([paper_lora(0.0, dtype), paper_lora(eps, dtype)]))
        fine = simulate(pair, x0, cfg.horizon_t1, solver=cfg.solver, dt=cfg.short_dt)
        fts, fe = np.asarray(fine.ts), np.asarray(divergence(fine.xs[0], fine.xs[1]))
        measured, censored = float(certified_horizon(fts, fe, cfg.eta)), False
        if fe.max() <= cfg.eta:  # not within the fine grid: the whole run
            whole = simulate(pair, x0, cfg.t1, solver=cfg.solver, dt=cfg.dt)
            we = np.asarray(divergence(whole.xs[0], whole.xs[1]))
            measured = float(certified_horizon(np.asarray(whole.ts), we, cfg.eta))
            censored = bool(we.max() <= cfg.eta)
        one = bound_one_sided(f0, f1, fts, np.asarray(x0))
        gr = bound_a_posteriori(f0, f1, fts, np.asarray(fine.xs[0]), np.asarray(fine.xs[1]))
        rows.append(
            {
                "eps": float(eps),
                "measured_horizon": measured,
                "measured_censored": censored,
                "certified_horizon": float(certified_horizon(fts, one.bound, cfg.eta)),
                "certified_censored": bool(np.all(one.bound <= cfg.eta)),
                "certified_horizon_gronwall": float(certified_horizon(fts, gr.bound, cfg.eta)),
                "bound_never_below": bool(np.all(fe <= one.bound)),
            }
        )
        r = rows[-1]
        log(
            f"      horizon sweep {k + 1}/{len(cfg.horizon_eps)}: ε = {eps:g}: measured "
            f"{'>' if censored else ''}{measured:.4g}, one-sided {r['certified_horizon']:.4g}, "
            f"Grönwall {r['certified_horizon_gronwall']:.4g}"
        )
    return rows


def paper_lora(eps: float, dtype) -> LoRA:
    """`ΔV = (α/r) B A = diag(0, −ε)` with A = e₂ᵀ, B = −ε e₂, α = r = 1."""
    return LoRA(jnp.asarray([[0.0, 1.0]], dtype), jnp.asarray([[0.0], [-eps]], dtype), 1.0, "V")


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the LoRA-divergence figure (module docstring) and write `trajectories.png`,
    `divergence.png`, `targets.png`, `trajectories.npz` and `summary.json` into `out_dir`;
    return the summary (the dict in `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()

    x0 = draw_uniform(jax.random.key(cfg.seed), (cfg.n, cfg.d), dtype, cfg.low, cfg.high)
    base = RescaledField(d=cfg.d, beta=1.0, dtype=dtype)
    pair = LoRA.stack([paper_lora(0.0, dtype), paper_lora(cfg.eps, dtype)])
    log(
        f"[1/4] solving original and LoRA runs together (n={cfg.n}, T={cfg.t1}, "
        f"dt={cfg.dt}, {cfg.solver}, {jnp.dtype(dtype).name}) ..."
    )
    t0 = time.perf_counter()
    sol = simulate(base.with_lora(pair), x0, cfg.t1, solver=cfg.solver, dt=cfg.dt)
    sol.xs.block_until_ready()
    solve_s = time.perf_counter() - t0
    if not sol.ok:
        raise RuntimeError(f"solve failed: {'; '.join(sol.messages())}")
    xs, xs_p = np.asarray(sol.xs[0]), np.asarray(sol.xs[1])
    ts = np.asarray(sol.ts)
    e = np.asarray(divergence(sol.xs[0], sol.xs[1]))

    log("[2/4] a fine short-time solve and the bounds (one-sided, Grönwall) ...")
    f0, f1 = base.with_lora(paper_lora(0.0, dtype)), base.with_lora(paper_lora(cfg.eps, dtype))
    post = bound_a_posteriori(f0, f1, ts, xs, xs_p)
    prior = bound_a_priori(f0, f1, ts, xs[0])
    short = simulate(base.with_lora(pair), x0, cfg.short_t1, solver=cfg.solver, dt=cfg.short_dt)
    sts = np.asarray(short.ts)
    se = np.asarray(divergence(short.xs[0], short.xs[1]))
    spost = bound_a_posteriori(f0, f1, sts, np.asarray(short.xs[0]), np.asarray(short.xs[1]))
    sprior = bound_a_priori(f0, f1, sts, xs[0])
    sone = bound_one_sided(f0, f1, sts, np.asarray(x0))
    h_one = float(certified_horizon(sts, sone.bound, cfg.eta))
    h_post = float(certified_horizon(sts, spost.bound, cfg.eta))
    h_prior = float(certified_horizon(sts, sprior.bound, cfg.eta))
    h_measured = float(certified_horizon(sts, se, cfg.eta))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.concatenate([e / post.bound, se / spost.bound, se / sone.bound])
    ratio = ratio[np.isfinite(ratio)]  # 0/0 at t = 0 and x/inf where the bound is vacuous

    above = e > cfg.separation
    first = np.nonzero(above)[0]
    t_first = round(float(ts[first[0]]), 9) if first.size else None
    t_sep = _stays_apart_from(ts, above)
    k0 = int(cluster_count(jnp.asarray(xs[-1]), cfg.cluster_threshold))
    k1 = int(cluster_count(jnp.asarray(xs_p[-1]), cfg.cluster_threshold))

    log("[3/4] random rank-1 LoRA of Q, of K and of V with the same operator norm ...")
    compare = {}
    for target in ("Q", "K", "V") if cfg.compare_targets else ():
        lo = LoRA.random(
            cfg.d,
            rank=1,
            norm=cfg.eps,
            target=target,
            key=jax.random.key(cfg.compare_seed),
            dtype=dtype,
        )
        ft = base.with_lora(lo)
        st = simulate(ft, x0, cfg.t1, solver=cfg.solver, dt=cfg.dt)
        et = np.asarray(divergence(sol.xs[0], st.xs))
        sh = simulate(ft, x0, cfg.short_t1, solver=cfg.solver, dt=cfg.short_dt)
        bt = bound_one_sided(f0, ft, sts, np.asarray(x0))
        above_t = et > cfg.separation
        compare[target] = {
            "e": et,
            "short_e": np.asarray(divergence(short.xs[0], sh.xs)),
            "bound": bt.bound,
            "final_divergence": float(et[-1]),
            "clusters": int(cluster_count(st.final, cfg.cluster_threshold)),
            "certified_horizon": float(certified_horizon(sts, bt.bound, cfg.eta)),
            "max_divergence": float(et.max()),
            "stays_apart_from": _stays_apart_from(ts, above_t),
        }

    sweep = _horizon_sweep(cfg, base, x0, dtype, log) if cfg.horizon_eps else []

    log("[4/4] figures and summary ...")
    from .. import plotting

    if cfg.snapshot_times is not None:
        times = list(cfg.snapshot_times)
    elif cfg.t1 >= 20:
        times = [0.0, 2.0, 5.0, 10.0, 20.0, cfg.t1]
    else:
        times = list(np.linspace(0, cfg.t1, 5))
    plotting.snapshots_side_by_side(
        ts,
        {"original V = I": xs, f"LoRA V = diag(1, {1 - cfg.eps:g})": xs_p},
        times,
        os.path.join(out_dir, "trajectories.png"),
        title=f"Rescaled dynamics, n = {cfg.n}: short term close, long term apart "
        "(z = exp(−tV)·x, the frame in which clusters stay put)",
        axis_labels=("z₁", "z₂"),
    )
    plotting.divergence_with_bounds(
        ts,
        e,
        {"a-posteriori bound": post.bound, "a-priori bound": prior.bound},
        os.path.join(out_dir, "divergence.png"),
        eta=cfg.eta,
        zoom=(
            sts,
            se,
            {
                "one-sided bound": sone.bound,
                "Grönwall, a posteriori": spost.bound,
                "Grönwall, a priori": sprior.bound,
            },
        ),
        horizon=h_one,
        title=f"Divergence e(t) and the stability bounds (ε = {cfg.eps:g})",
    )
    if compare:
        plotting.target_comparison(
            ts,
            {k: v["e"] for k, v in compare.items()},
            sts,
            {k: (v["short_e"], v["bound"]) for k, v in compare.items()},
            os.path.join(out_dir, "targets.png"),
            eta=cfg.eta,
            title=f"Random rank-1 LoRA with ‖ΔW‖₂ = {cfg.eps:g} on Q, K or V",
        )
    if sweep:
        plotting.horizon_sweep(
            sweep,
            os.path.join(out_dir, "horizon_vs_eps.png"),
            eta=cfg.eta,
            title=f"Horizons of e ≤ {cfg.eta:g} against ε (n = {cfg.n}, V = I vs diag(1, 1 − ε))",
        )
    if cfg.gif:
        plotting.animate_side_by_side(
            ts,
            {"original": xs, "LoRA": xs_p},
            os.path.join(out_dir, "trajectories.gif"),
            frames=cfg.gif_frames,
        )
    write_npz(
        os.path.join(out_dir, "trajectories.npz"),
        ts=ts,
        xs=xs,
        xs_lora=xs_p,
        e=e,
        bound_post=post.bound,
        bound_prior=prior.bound,
        short_ts=sts,
        short_e=se,
        short_bound_one_sided=sone.bound,
    )
    summary = {
        "experiment": "lora-divergence",
        "quick": quick,
        "config": cfg.to_dict(),
        "dtype": jnp.dtype(dtype).name,
        "clusters_original": k0,
        "clusters_lora": k1,
        "separation_time": t_sep,
        "first_time_above_separation": t_first,
        "final_divergence": float(e[-1]),
        "certified_horizon": h_one,
        "measured_horizon": h_measured,
        "certified_horizon_a_posteriori": h_post,
        "certified_horizon_a_priori": h_prior,
        "max_measured_over_bound": float(ratio.max()) if ratio.size else None,
        "targets": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("e", "short_e", "bound")}
            for k, v in compare.items()
        },
        "horizon_vs_eps": sweep,
        "solve_seconds_incl_compile": round(solve_s, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "notes": "times in units of depth; null = never happened. separation_time: start "
        "of the final stretch with e(t) > separation (the runs stay apart from "
        "then on); first_time_above_separation: first t with e(t) > separation. "
        "Horizons: largest t with bound(s) <= eta for all s <= t (short-time grid); "
        "certified_horizon: the one-sided bound's, the _a_posteriori and _a_priori ones: "
        "the Grönwall bounds'; measured_horizon: the same for e(t) itself. horizon_vs_eps: "
        "per ε, the measured horizon (fine grid to horizon_t1, then the dt grid to t1; "
        "measured_censored: e never exceeded eta up to t1) and the certified ones on the "
        "fine grid to horizon_t1 (certified_censored: the one-sided bound stayed below "
        "eta to horizon_t1).",
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    log(
        f"done in {summary['wall_seconds']:.1f} s: clusters {k0} (original) vs {k1} (LoRA), "
        f"separation > {cfg.separation} at t = {t_sep}, certified horizon {h_one:.3g} "
        f"(measured {h_measured:.3g}; Grönwall {h_post:.3g})"
    )
    return summary


def _stays_apart_from(ts, above) -> float | None:
    """Start of the final stretch during which the runs stay apart (None if they end close)."""
    if not above[-1]:
        return None
    close = np.nonzero(~above)[0]
    return round(float(ts[close[-1] + 1] if close.size else ts[0]), 9)
