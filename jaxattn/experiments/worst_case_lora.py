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
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._bounds import bound_a_posteriori
from .._fields import make_field
from .._io import check_output_dir, write_json, write_npz
from .._metrics import divergence
from .._sensitivity import (
    ResponseOperator,
    linear_response,
    perturbed,
    random_directions,
    smallest_cluster_change,
    worst_case,
)
from .._simulate import simulate
from ._config import ExperimentConfig

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
    dynamics: Literal["plain", "rescaled", "sphere", "usa"] = "rescaled"
    beta: float = 1.0
    low: float = -1.0  #: initial tokens uniform on [low, high]^d
    high: float = 1.0
    times: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)  #: depths T
    dt: float = 0.05  #: RK4 step
    seeds: int = 5  #: initial conditions
    targets: tuple[Target, ...] = ("Q", "K", "V")
    n_random: int = 64  #: random unit directions compared with the worst one
    rank: int = 1  #: rank of the structured (LoRA) directions
    eig_iters: int = 30  #: LOBPCG iterations for the top singular pair
    power_iters: int = 60
    eps: tuple[float, ...] = (1e-1, 1e-2, 1e-3)  #: ε of the linear-response check
    cluster_threshold: float = 0.1
    cluster_steps: int = 30
    cluster_bisections: int = 7
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
    Q = jax.random.normal(kq, (d, d), dtype) / np.sqrt(d) + jnp.eye(d, dtype=dtype)
    K = jax.random.normal(kk, (d, d), dtype) / np.sqrt(d) + jnp.eye(d, dtype=dtype)
    return Q, K, None


def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    cfg = Config.build(quick, **overrides)
    out_dir = check_output_dir(out_dir)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()
    times = np.asarray(cfg.times, np.float64)
    t1 = float(times[-1])
    solve: dict[str, Any] = dict(solver="rk4", dt=cfg.dt)
    data: dict[str, np.ndarray] = {"times": times}
    summary_settings = {}
    plots = {}

    for si, sname in enumerate(cfg.settings):
        setting = _setting(cfg, sname)
        n, d = setting.n, setting.d
        Q, K, V = _weights(setting, cfg.weight_seed, dtype)
        field = make_field(cfg.dynamics, Q, K, V, beta=cfg.beta, d=d, dtype=dtype)
        x0s = [
            jax.random.uniform(jax.random.key(s), (n, d), dtype, cfg.low, cfg.high)
            for s in range(cfg.seeds)
        ]
        S, T, G = cfg.seeds, len(times), len(cfg.targets)
        sig = np.zeros((S, G, T))
        sig_r = np.zeros((S, G, T))
        rnd = np.zeros((S, G, cfg.n_random, T))
        rnd_r = np.zeros((S, G, cfg.n_random, T))
        dirs = np.zeros((G, T, d, d))
        resp = np.zeros((G, T, n, d))
        base = None
        brute = None
        log(
            f"[{sname}] n={n}, d={d}, {cfg.dynamics}, T up to {t1}, {S} initial "
            f"conditions, targets {', '.join(cfg.targets)}"
        )
        for g, target in enumerate(cfg.targets):
            t0 = time.perf_counter()
            op = ResponseOperator(field, x0s[0], t1, cfg.times, target, **solve)
            R = random_directions(jax.random.key(1000 + g), cfg.n_random, d)
            Rr = random_directions(jax.random.key(2000 + g), cfg.n_random, d, rank=cfg.rank)
            for s in range(S):
                op.set_x0(x0s[s])
                wc = worst_case(op, method="lobpcg", iters=cfg.eig_iters, key=jax.random.key(s))
                wr = worst_case(
                    op,
                    rank=cfg.rank,
                    iters=cfg.eig_iters,
                    power_iters=cfg.power_iters,
                    tol=1e-8,
                    key=jax.random.key(s),
                )
                sig[s, g], sig_r[s, g] = wc.sigma, wr.sigma
                rnd[s, g] = np.linalg.norm(op.apply_all(R).reshape(R.shape[0], T, -1), axis=-1)
                rnd_r[s, g] = np.linalg.norm(op.apply_all(Rr).reshape(Rr.shape[0], T, -1), axis=-1)
                if s == 0:
                    dirs[g], resp[g] = wc.directions, wc.response
                    if base is None:
                        base = op.base()
                if s == 0 and g == 0 and si == 0:
                    brute = _brute_force(field, x0s[0], t1, times, target, solve, wc, wr, d)
            log(
                f"  target {target}: worst/random (mean over directions) at T = "
                f"{', '.join(f'{t:g}' for t in times)}: "
                f"{', '.join(f'{v:.2f}' for v in (sig[:, g] / rnd[:, g].mean(1)).mean(0))} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        assert base is not None  # set at the first target (seeds, targets ≥ 1)
        ratio = sig / rnd.mean(axis=2)
        ratio_r = sig_r / rnd_r.mean(axis=2)
        ratio_max = sig / rnd.max(axis=2)
        data.update(
            {
                f"{sname}_sigma": sig,
                f"{sname}_sigma_rank": sig_r,
                f"{sname}_random": rnd,
                f"{sname}_random_rank": rnd_r,
                f"{sname}_directions": dirs,
                f"{sname}_response": resp,
                f"{sname}_base": base,
                f"{sname}_x0": np.asarray(x0s[0]),
            }
        )
        summary_settings[sname] = {
            "n": n,
            "d": d,
            "weights": setting.weights,
            "targets": {
                t: {
                    "ratio_worst_over_mean_random": {
                        "mean_over_T_and_x0": float(ratio[:, g].mean()),
                        "min": float(ratio[:, g].min()),
                        "max": float(ratio[:, g].max()),
                        "by_T_mean_over_x0": ratio[:, g].mean(0).round(4).tolist(),
                    },
                    "ratio_worst_over_max_random": float(ratio_max[:, g].mean()),
                    "ratio_rank1_worst_over_mean_random_rank1": float(ratio_r[:, g].mean()),
                    "rank1_over_full_worst": float((sig_r[:, g] / sig[:, g]).mean()),
                    "sigma_worst_by_T_mean_over_x0": sig[:, g].mean(0).round(6).tolist(),
                    "worst_direction_singular_values_at_T_last": np.linalg.svd(
                        dirs[g, -1], compute_uv=False
                    )
                    .round(4)
                    .tolist(),
                }
                for g, t in enumerate(cfg.targets)
            },
        }
        if brute is not None:
            summary_settings[sname]["brute_force_check"] = brute
        plots[sname] = dict(
            sig=sig, sig_r=sig_r, rnd=rnd, rnd_r=rnd_r, dirs=dirs, resp=resp, base=base, d=d, n=n
        )

    # -- linear response vs measured divergence vs bound (first setting, seed 0)
    sname = cfg.settings[0]
    setting = _setting(cfg, sname)
    Q, K, V = _weights(setting, cfg.weight_seed, dtype)
    field = make_field(cfg.dynamics, Q, K, V, beta=cfg.beta, d=setting.d, dtype=dtype)
    x0 = jax.random.uniform(jax.random.key(0), (setting.n, setting.d), dtype, cfg.low, cfg.high)
    tv = "V" if "V" in cfg.targets else cfg.targets[0]
    g = list(cfg.targets).index(tv)
    k_mid = len(times) // 2
    dW = plots[sname]["dirs"][g, k_mid]
    log(
        f"[linear response] worst {tv}-direction at T = {times[k_mid]:g}, ε = "
        f"{', '.join(f'{e:g}' for e in cfg.eps)}"
    )
    lr = linear_response(field, x0, t1, dW, tv, **solve)
    lin = np.max(np.linalg.norm(lr.dxs, axis=-1), axis=-1)
    lin_res = {}
    for eps in cfg.eps:
        fe = perturbed(field, tv, jnp.asarray(eps * dW, dtype))
        sol = simulate(fe, x0, t1, **solve)
        e = np.asarray(divergence(jnp.asarray(lr.xs), sol.xs))
        b = bound_a_posteriori(field, fe, lr.ts, lr.xs, np.asarray(sol.xs)).bound
        rem = np.max(np.linalg.norm(np.asarray(sol.xs) - lr.xs - eps * lr.dxs, axis=-1), axis=-1)
        lin_res[eps] = dict(e=e, bound=b, remainder=rem)
    eps_list = list(cfg.eps)
    rems = [float(lin_res[e]["remainder"].max()) for e in eps_list]
    orders = [
        float(np.log(rems[i] / rems[i + 1]) / np.log(eps_list[i] / eps_list[i + 1]))
        for i in range(len(eps_list) - 1)
    ]
    viol = [float(np.max(lin_res[e]["e"] - lin_res[e]["bound"])) for e in eps_list]
    data.update(
        {
            "lr_ts": lr.ts,
            "lr_dx_max": lin,
            **{f"lr_e_{e:g}": lin_res[e]["e"] for e in eps_list},
            **{f"lr_bound_{e:g}": lin_res[e]["bound"] for e in eps_list},
        }
    )

    # -- smallest cluster-changing LoRA
    log(
        f"[cluster change] smallest rank-{cfg.rank} LoRA of {tv} changing the clusters at "
        f"T = {t1:g} (threshold {cfg.cluster_threshold})"
    )
    t0 = time.perf_counter()
    cc = smallest_cluster_change(
        field,
        x0,
        t1,
        tv,
        rank=cfg.rank,
        threshold=cfg.cluster_threshold,
        steps=cfg.cluster_steps,
        bisections=cfg.cluster_bisections,
        init_direction=plots[sname]["dirs"][g, -1],
        log=log,
        **solve,
    )
    cc_s = time.perf_counter() - t0
    fc = perturbed(field, tv, jnp.asarray(cc.norm * cc.direction, dtype))
    x_after = np.asarray(simulate(fc, x0, t1, **solve).final)
    x_before = np.asarray(simulate(field, x0, t1, **solve).final)
    data.update(
        {
            "cluster_direction": cc.direction,
            "cluster_x_before": x_before,
            "cluster_x_after": x_after,
            "cluster_labels_before": cc.labels_before,
            "cluster_labels_after": cc.labels_after,
        }
    )
    # First-order estimate of the same norm: needed displacement / |J_T u| (max over tokens).
    lr_cc = linear_response(field, x0, t1, cc.direction, tv, **solve)
    first_order = float(
        cc.needed_displacement / max(np.max(np.linalg.norm(lr_cc.dxs[-1], axis=-1)), 1e-300)
    )

    log("[figures] ...")
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
        lr.ts,
        lin,
        {e: (lin_res[e]["e"], lin_res[e]["bound"]) for e in eps_list},
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
    write_npz(os.path.join(out_dir, "worst_case_lora.npz"), **data)
    summary = {
        "experiment": NAME,
        "quick": quick,
        "config": cfg.to_dict(),
        "dtype": jnp.dtype(dtype).name,
        "settings": summary_settings,
        "linear_response": {
            "target": tv,
            "direction_time": float(times[k_mid]),
            "eps": eps_list,
            "max_remainder": rems,
            "remainder_order_in_eps": orders,
            "max_e_over_eps": [float(lin_res[e]["e"].max() / e) for e in eps_list],
            "max_linear_response": float(lin.max()),
            "max_measured_minus_bound": viol,
            "bound_holds": bool(all(v <= 1e-8 for v in viol)),
        },
        "cluster_change": {
            "target": tv,
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
            "seconds": round(cc_s, 2),
        },
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "notes": "norms of ΔW are Frobenius (= operator norm for rank 1); |δx(T)| is the "
        "Frobenius norm over all tokens. ratio_worst_over_mean_random: top singular "
        "value of J_T over the mean |J_T R| of random unit Gaussian R, averaged over "
        "T and initial conditions. bound_norm: smallest norm along the found "
        "direction at which the a-priori Grönwall bound allows the displacement "
        "needed to change the partition (a certified lower bound for that "
        "direction); norm_found is an upper estimate of the true minimum.",
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    first = summary_settings[cfg.settings[0]]["targets"][tv]["ratio_worst_over_mean_random"]
    log(
        f"done in {summary['wall_seconds']:.1f} s: worst/random ({cfg.settings[0]}, {tv}) "
        f"= {first['mean_over_T_and_x0']:.2f}; cluster change at ‖ΔW‖ = {cc.norm:.3g} "
        f"(bound needs ≥ {cc.bound_norm:.3g})"
    )
    return summary


def _brute_force(field, x0, t1, times, target, solve, wc, wr, d) -> dict:
    """Full Jacobian by forward mode (d² JVPs), SVD; rank-1 grid search when d = 2."""
    op_fn = lambda w: (
        simulate(perturbed(field, target, w), x0, t1, ts=times, adjoint="forward", **solve).xs
    )
    J = np.asarray(jax.jacfwd(op_fn)(jnp.zeros((d, d), field.V.dtype)))  # (T, n, d, d, d)
    J = J.reshape(J.shape[0], -1, d * d)
    out = {"sigma_svd": [], "sigma_lobpcg": wc.sigma.tolist(), "alignment": []}
    for k in range(J.shape[0]):
        _, s, Wt = np.linalg.svd(J[k])
        out["sigma_svd"].append(float(s[0]))
        out["alignment"].append(float(abs(Wt[0] @ wc.directions[k].ravel())))
    out["max_rel_sigma_error"] = float(
        np.max(np.abs(np.asarray(out["sigma_svd"]) - wc.sigma) / np.asarray(out["sigma_svd"]))
    )
    if d == 2:
        a = np.linspace(0.0, np.pi, 181)
        b = np.linspace(0.0, 2 * np.pi, 361)
        u = np.stack([np.cos(a), np.sin(a)], -1)
        v = np.stack([np.cos(b), np.sin(b)], -1)
        M = np.einsum("ai,bj->abij", u, v).reshape(-1, 4)  # unit rank-1 matrices
        best = np.max(np.linalg.norm(np.einsum("knm,gm->kgn", J, M), axis=-1), axis=-1)
        out["rank1_grid_best"] = best.tolist()
        out["rank1_power"] = wr.sigma.tolist()
    return out
