"""The worst-case LoRA direction, the linear response, the smallest cluster change.

For each setting (the paper's rescaled dynamics with Q = K = V = I in d = 2, and a d = 6
case with random Q, K) and each target Q, K, V:

1. the linear map `J_T : ΔW ↦ δx(T)` at several depths T, over several initial
   conditions; its top singular value (LOBPCG on `J_TᵀJ_T` with JVPs and VJPs) is the
   first-order divergence of the worst unit-norm direction, compared with random unit
   directions (Gaussian, and random rank-1 LoRAs) — the worst-vs-random ratio;
   the best rank-1 direction too (truncated power iteration);
2. a brute-force check on the first case (full Jacobian by `jax.jacfwd`, SVD);
3. the linear response `δx(t)` against the measured divergence at ε = 1e-1 … 1e-3 and the
   Grönwall bound (docs/theory.md, 'Stability bound');
4. the smallest rank-1 LoRA of V that changes the cluster partition at the last T
   (optax on a smooth surrogate, bisection on the norm) against the norm the bound needs.

The analysis is library code: `jaxattn._sensitivity_checks` (`worst_vs_random`,
`brute_force_check`, `linear_response_check`, `first_order_norm`, `direction_spectrum`)
on top of the sensitivity API; this module builds the problems, calls it, draws the
figures and writes the data and summary.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._base import (
    ExperimentConfig,
    check_output_dir,
    draw_normal,
    draw_uniform,
    write_json,
    write_npz,
)
from .._model import make_field
from .._sensitivity import ResponseOperator, perturbed, random_directions, smallest_cluster_change
from .._simulate import simulate
from ._common import in_float64
from ._sensitivity_checks import (
    JacobianCheck,
    LinearResponseCheck,
    WorstVsRandom,
    brute_force_check,
    direction_spectrum,
    first_order_norm,
    linear_response_check,
    worst_vs_random,
)

NAME = "worst-case-lora"
DESCRIPTION = "worst-case vs random LoRA directions, linear response, smallest cluster change"
CLI_OPTIONS = ()

Setting = Literal["paper", "random-qk"]
Target = Literal["Q", "K", "V"]


@dataclasses.dataclass(frozen=True)
class _Setting:
    n: int
    d: int
    weights: Literal["identity", "random"]


SETTINGS: dict[str, _Setting] = {
    "paper": _Setting(n=20, d=2, weights="identity"),
    "random-qk": _Setting(n=24, d=6, weights="random"),
}


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of `worst-case-lora`: the settings and dynamics, the depths T, the targets,
    and the sizes of the worst-case, linear-response and cluster-change searches."""

    settings: tuple[Setting, ...] = ("paper", "random-qk")  #: cases of `SETTINGS` to run
    dynamics: Literal["plain", "rescaled", "sphere", "usa"] = "rescaled"  #: the dynamics
    beta: float = 1.0  #: inverse temperature β
    low: float = -1.0  #: initial tokens uniform on [low, high]^d
    high: float = 1.0  #: upper bound of the initial tokens
    times: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)  #: depths T
    dt: float = 0.05  #: RK4 step
    seeds: int = 5  #: initial conditions
    targets: tuple[Target, ...] = ("Q", "K", "V")  #: perturbed weights
    n_random: int = 64  #: random unit directions compared with the worst one
    rank: int = 1  #: rank of the structured (LoRA) directions
    eig_iters: int = 30  #: LOBPCG iterations for the top singular pair
    power_iters: int = 60  #: power iterations for the best rank-1 direction
    eps: tuple[float, ...] = (1e-1, 1e-2, 1e-3)  #: ε of the linear-response check
    cluster_threshold: float = 0.1  #: tokens within this distance are one cluster
    cluster_steps: int = 30  #: Adam steps per norm in the cluster-change search
    cluster_bisections: int = 7  #: bisection steps on the norm of the cluster change
    weight_seed: int = 123  #: key of the random Q, K
    n: int | None = None  #: tokens in every setting (None: each setting's own n)

    QUICK: ClassVar[dict[str, Any]] = dict(
        settings=("paper",),
        times=(0.5, 1.0, 2.0),
        seeds=2,
        targets=("V",),
        n_random=8,
        power_iters=20,
        eps=(1e-1, 1e-2),
        cluster_steps=8,
        cluster_bisections=2,
        n=8,
    )


def _setting(cfg: Config, name: str) -> _Setting:
    setting = SETTINGS[name]
    return setting if cfg.n is None else dataclasses.replace(setting, n=cfg.n)


def _weights(setting: _Setting, seed: int, dtype):
    d = setting.d
    if setting.weights == "identity":
        return None, None, None
    kq, kk = jax.random.split(jax.random.key(seed))
    Q = draw_normal(kq, (d, d), dtype) / np.sqrt(d) + jnp.eye(d, dtype=dtype)
    K = draw_normal(kk, (d, d), dtype) / np.sqrt(d) + jnp.eye(d, dtype=dtype)
    return Q, K, None


@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the worst-case, response and cluster-change parts (module docstring) and write
    `linear_response.png`, `cluster_change.png`, `worst_case_lora.npz` and `summary.json`
    into `out_dir`; return the summary (the dict in `summary.json`).

    `quick`: the small `--quick` form (`QUICK`); `overrides`: any `Config` field
    (checked by `Config.build` before anything runs); `log`: where progress lines go.
    """
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()
    times = np.asarray(cfg.times, np.float64)
    t1 = float(times[-1])
    solve: dict[str, Any] = dict(solver="rk4", dt=cfg.dt)
    data: dict[str, np.ndarray] = {"times": times}
    summary_settings, plots = {}, {}
    for si, sname in enumerate(cfg.settings):
        setting = _setting(cfg, sname)
        field, x0s = _problem(cfg, setting, dtype)
        log(
            f"[{sname}] n={setting.n}, d={setting.d}, {cfg.dynamics}, T up to {t1}, "
            f"{cfg.seeds} initial conditions, targets {', '.join(cfg.targets)}"
        )
        results = _worst_vs_random(cfg, field, x0s, setting.d, times, solve, log)
        plots[sname] = _stacked(results, setting)
        data.update({f"{sname}_{k}": v for k, v in _setting_arrays(plots[sname]).items()})
        data[f"{sname}_x0"] = np.asarray(x0s[0])
        summary_settings[sname] = dict(
            n=setting.n, d=setting.d, weights=setting.weights, targets=_targets_summary(results)
        )
        if si == 0:
            field0, x0 = field, x0s[0]
            r = results[cfg.targets[0]]
            chk = brute_force_check(
                field, x0, t1, times, cfg.targets[0], r.worst, r.worst_rank, **solve
            )
            summary_settings[sname]["brute_force_check"] = _brute_summary(chk)

    # -- linear response vs measured divergence vs bound (first setting, seed 0)
    sname = cfg.settings[0]
    tv = "V" if "V" in cfg.targets else cfg.targets[0]
    g, k_mid = list(cfg.targets).index(tv), len(times) // 2
    log(
        f"[linear response] worst {tv}-direction at T = {times[k_mid]:g}, ε = "
        f"{', '.join(f'{e:g}' for e in cfg.eps)}"
    )
    lrc = linear_response_check(
        field0, x0, t1, plots[sname]["dirs"][g, k_mid], tv, cfg.eps, **solve
    )
    data.update({"lr_ts": lrc.response.ts, "lr_dx_max": lrc.linear})
    data.update({f"lr_e_{e:g}": lrc.divergence[i] for i, e in enumerate(cfg.eps)})
    data.update({f"lr_bound_{e:g}": lrc.bound[i] for i, e in enumerate(cfg.eps)})

    # -- smallest cluster-changing LoRA, started from the worst direction at the last T
    cc, cc_s = _cluster_change(cfg, field0, x0, t1, tv, plots[sname]["dirs"][g, -1], solve, log)
    x_before, x_after = _final_tokens(field0, x0, t1, tv, cc, solve)
    data.update(_cluster_arrays(cc, x_before, x_after))
    first_order = first_order_norm(
        field0, x0, t1, cc.direction, cc.needed_displacement, tv, **solve
    )

    log("[figures] ...")
    _figures(out_dir, cfg, times, plots, lrc, cc, x_before, x_after, tv, k_mid)
    write_npz(os.path.join(out_dir, "worst_case_lora.npz"), **data)
    summary = {
        "experiment": NAME,
        "quick": quick,
        "config": cfg.to_dict(),
        "dtype": jnp.dtype(dtype).name,
        "settings": summary_settings,
        "linear_response": _linear_response_summary(lrc, tv, float(times[k_mid])),
        "cluster_change": _cluster_summary(cfg, cc, tv, t1, first_order, cc_s),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "notes": _NOTES,
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    first = summary_settings[cfg.settings[0]]["targets"][tv]["ratio_worst_over_mean_random"]
    log(
        f"done in {summary['wall_seconds']:.1f} s: worst/random ({cfg.settings[0]}, {tv}) "
        f"= {first['mean_over_T_and_x0']:.2f}; cluster change at ‖ΔW‖ = {cc.norm:.3g} "
        f"(bound needs ≥ {cc.bound_norm:.3g})"
    )
    return summary


_NOTES = (
    "norms of ΔW are Frobenius (= operator norm for rank 1); |δx(T)| is the "
    "Frobenius norm over all tokens. ratio_worst_over_mean_random: top singular "
    "value of J_T over the mean |J_T R| of random unit Gaussian R, averaged over "
    "T and initial conditions. bound_norm: smallest norm along the found "
    "direction at which the a-priori Grönwall bound allows the displacement "
    "needed to change the partition (a certified lower bound for that "
    "direction); norm_found is an upper estimate of the true minimum."
)


def _problem(cfg: Config, setting: _Setting, dtype):
    """The field of a setting and its `cfg.seeds` initial conditions (uniform tokens)."""
    Q, K, V = _weights(setting, cfg.weight_seed, dtype)
    field = make_field(cfg.dynamics, Q, K, V, beta=cfg.beta, d=setting.d, dtype=dtype)
    x0s = [
        draw_uniform(jax.random.key(s), (setting.n, setting.d), dtype, cfg.low, cfg.high)
        for s in range(cfg.seeds)
    ]
    return field, x0s


def _worst_vs_random(
    cfg: Config, field, x0s, d: int, times, solve, log
) -> dict[str, WorstVsRandom]:
    """`worst_vs_random` for each target, against `cfg.n_random` random unit directions
    (Gaussian and rank-`cfg.rank`, the same for every initial condition)."""
    results = {}
    for g, target in enumerate(cfg.targets):
        t0 = time.perf_counter()
        results[target] = r = worst_vs_random(
            ResponseOperator(field, x0s[0], float(times[-1]), cfg.times, target, **solve),
            x0s,
            random_directions(jax.random.key(1000 + g), cfg.n_random, d),
            random_directions(jax.random.key(2000 + g), cfg.n_random, d, cfg.rank),
            rank=cfg.rank,
            iters=cfg.eig_iters,
            power_iters=cfg.power_iters,
            tol=1e-8,
        )
        log(
            f"  target {target}: worst/random (mean over directions) at T = "
            f"{', '.join(f'{t:g}' for t in times)}: "
            f"{', '.join(f'{v:.2f}' for v in r.ratio_to_mean_random().mean(0))} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return results


def _cluster_change(cfg: Config, field, x0, t1: float, target, init, solve, log):
    """`smallest_cluster_change` with the config's options, and the seconds it took."""
    log(
        f"[cluster change] smallest rank-{cfg.rank} LoRA of {target} changing the clusters "
        f"at T = {t1:g} (threshold {cfg.cluster_threshold})"
    )
    t0 = time.perf_counter()
    cc = smallest_cluster_change(
        field,
        x0,
        t1,
        target,
        rank=cfg.rank,
        threshold=cfg.cluster_threshold,
        steps=cfg.cluster_steps,
        bisections=cfg.cluster_bisections,
        init_direction=init,
        log=log,
        **solve,
    )
    return cc, time.perf_counter() - t0


def _cluster_arrays(cc, x_before, x_after) -> dict[str, np.ndarray]:
    return {
        "cluster_direction": cc.direction,
        "cluster_x_before": x_before,
        "cluster_x_after": x_after,
        "cluster_labels_before": cc.labels_before,
        "cluster_labels_after": cc.labels_after,
    }


def _stacked(results: dict[str, WorstVsRandom], setting: _Setting) -> dict:
    """The per-target results stacked along a target axis (after the initial conditions),
    as the figures take them."""
    rs = list(results.values())
    f64 = lambda a: np.asarray(a, np.float64)
    return dict(
        sig=np.stack([r.sigma for r in rs], axis=1),
        sig_r=np.stack([r.sigma_rank for r in rs], axis=1),
        rnd=np.stack([r.random for r in rs], axis=1),
        rnd_r=np.stack([r.random_rank for r in rs], axis=1),
        dirs=f64(np.stack([r.worst.directions for r in rs])),
        resp=f64(np.stack([r.worst.response for r in rs])),
        base=rs[0].base,
        d=setting.d,
        n=setting.n,
    )


def _setting_arrays(p: dict) -> dict[str, np.ndarray]:
    keys = {"sig": "sigma", "sig_r": "sigma_rank", "rnd": "random", "rnd_r": "random_rank"}
    keys.update(dirs="directions", resp="response", base="base")
    return {name: p[k] for k, name in keys.items()}


def _targets_summary(results: dict[str, WorstVsRandom]) -> dict:
    return {t: _target_summary(r) for t, r in results.items()}


def _target_summary(r: WorstVsRandom) -> dict:
    ratio = r.ratio_to_mean_random()
    return {
        "ratio_worst_over_mean_random": {
            "mean_over_T_and_x0": float(ratio.mean()),
            "min": float(ratio.min()),
            "max": float(ratio.max()),
            "by_T_mean_over_x0": ratio.mean(0).round(4).tolist(),
        },
        "ratio_worst_over_max_random": float(r.ratio_to_max_random().mean()),
        "ratio_rank1_worst_over_mean_random_rank1": float(r.rank_ratio_to_mean_random().mean()),
        "rank1_over_full_worst": float(r.rank_over_full().mean()),
        "sigma_worst_by_T_mean_over_x0": r.sigma.mean(0).round(6).tolist(),
        "worst_direction_singular_values_at_T_last": direction_spectrum(
            np.asarray(r.worst.directions[-1], np.float64)
        )
        .round(4)
        .tolist(),
    }


def _brute_summary(chk: JacobianCheck) -> dict:
    out = {
        "sigma_svd": chk.sigma_svd.tolist(),
        "sigma_lobpcg": chk.sigma.tolist(),
        "alignment": chk.alignment.tolist(),
        "max_rel_sigma_error": chk.max_rel_sigma_error,
    }
    if chk.rank1_grid is not None and chk.rank1 is not None:
        out.update(rank1_grid_best=chk.rank1_grid.tolist(), rank1_power=chk.rank1.tolist())
    return out


def _linear_response_summary(lrc: LinearResponseCheck, target: str, at: float) -> dict:
    viol = lrc.max_measured_minus_bound()
    return {
        "target": target,
        "direction_time": at,
        "eps": [float(e) for e in lrc.eps],
        "max_remainder": lrc.max_remainder(),
        "remainder_order_in_eps": lrc.remainder_order(),
        "max_e_over_eps": lrc.max_divergence_over_eps(),
        "max_linear_response": float(lrc.linear.max()),
        "max_measured_minus_bound": viol,
        "bound_holds": lrc.bound_holds(1e-8),
    }


def _cluster_summary(cfg: Config, cc, target: str, t1: float, first_order: float, secs) -> dict:
    return {
        "target": target,
        "rank": cfg.rank,
        "T": t1,
        "threshold": cfg.cluster_threshold,
        "norm_found": cc.norm,
        "kind": cc.kind,
        "clusters_before": cc.clusters_before,
        "clusters_after": cc.clusters_after,
        "needed_displacement": cc.needed_displacement,
        "bound_norm": cc.bound_norm,
        "bound_certified_horizon_at_norm_found": cc.bound_horizon,
        "found_over_bound": (cc.norm / cc.bound_norm if cc.bound_norm > 0 else None),
        "first_order_estimate": first_order,
        "evaluations": len(cc.history["norm"]),
        "seconds": round(secs, 2),
    }


def _final_tokens(field, x0, t1, target, cc, solve):
    """Tokens at t1 without and with the cluster-changing LoRA `cc.norm · cc.direction`."""
    dW = jnp.asarray(cc.norm * cc.direction, field.V.dtype)
    x_after = np.asarray(simulate(perturbed(field, target, dW), x0, t1, **solve).final)
    x_before = np.asarray(simulate(field, x0, t1, **solve).final)
    return x_before, x_after


def _figures(out_dir, cfg: Config, times, plots, lrc, cc, x_before, x_after, tv, k_mid):
    from .. import plotting

    for name, pdata in plots.items():
        plotting.worst_vs_random(
            times,
            pdata,
            cfg.targets,
            os.path.join(out_dir, f"worst_vs_random_{name}.png"),
            title=f"{SETTINGS[name].weights} Q, K (n = {pdata['n']}, "
            f"d = {pdata['d']}): worst vs random unit ΔW",
        )
        plotting.direction_structure(
            times, pdata, cfg.targets, os.path.join(out_dir, f"worst_direction_{name}.png")
        )
    plotting.linear_response_figure(
        lrc.response.ts,
        lrc.linear,
        {e: (lrc.divergence[i], lrc.bound[i]) for i, e in enumerate(cfg.eps)},
        os.path.join(out_dir, "linear_response.png"),
        title=f"Linear response to the worst {tv}-direction (T = {times[k_mid]:g})",
    )
    plotting.cluster_change_figure(
        x_before,
        x_after,
        cc.labels_before,
        cc.labels_after,
        os.path.join(out_dir, "cluster_change.png"),
        title=f"Smallest rank-{cfg.rank} LoRA of {tv} found: ‖ΔW‖ = "
        f"{cc.norm:.3g} ({cc.clusters_before} → "
        f"{cc.clusters_after} clusters, {cc.kind}); bound certifies "
        f"no change up to t = {cc.bound_horizon:.3g}",
    )
