"""Low-rank attention: clusters when `A = QᵀK` has low rank, and a LoRA that changes the
rank.

Rescaled dynamics, V = I, β = 1, d = 3, tokens `x0 ~ N(0, I)`, RK4 with a
fixed step. Weights (all in one batched solve):

- `A = e₁e₁ᵀ` (Q = K = e₁e₁ᵀ): the paper's rank-1 example;
- `A = 0` (Q = 0, or K = 0): uniform attention, every token moves toward the mean;
- random rank r = 1..d, three families: `psd` (Q = K = G_r, so A = G_rᵀG_r ⪰ 0), `gen`
  (Q = G_r, K = H_r independent, A indefinite and non-symmetric), where `G_r`, `H_r` are
  the best rank-r approximations (truncated SVD) of Gaussian matrices, and `proj`
  (Q = K = A = the orthogonal projection on a random r-dimensional subspace; r = d gives
  A = I). Within one weight seed the subspaces are nested, so the rank is the only thing
  that changes; `proj` separates the rank from the conditioning of A.

`simulate` batches over weights through stacked full-rank "LoRAs" on a zero base
(`ΔQ = Q_m`, `ΔK = K_m`), and over initial conditions through `x0 (seeds, n, d)`: one
jitted call for all members × seeds.

The LoRA part: base `Q = I, K = e₁e₁ᵀ` (A = e₁e₁ᵀ, rank 1) and a rank-2 LoRA of K with
explicit factors `A_lora = [e₂ᵀ; e₃ᵀ]`, `B_lora = [s₂e₂, s₃e₃]`, α = 2 (so `ΔK =
diag(0, s₂, s₃)`), for several (s₂, s₃): it raises the rank of A to 2 or 3 and splits the
two rank-1 clusters into more. One batched solve over the stacked LoRA.

Cluster statistics at t1 (summary.json and clusters.csv), computed by the library's
`token_set_stats` on the final tokens of both studies: cluster count (`cluster_count` at
`cluster_threshold`), Booleanness of `field.attention(t1, z(t1))`, leaders, rank of that
attention matrix, and whether the cluster centres are vertices of their convex hull. The
checks of the A = 0 and rank-1 predictions use the library functions next to it
(`offset_from_initial_mean`, `distance_from_uniform`, `leaders_at_extremes`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import cluster_count, divergence
from .._base import (
    ExperimentConfig,
    check_output_dir,
    draw_normal,
    write_atomic,
    write_json,
    write_npz,
)
from .._model import LoRA, RescaledField
from .._simulate import simulate
from ._clusters import (
    TokenSetStats,
    attention_matrices,
    cluster_counts_by_rank,
    distance_from_uniform,
    final_motion,
    first_time_above,
    hull_directions,
    leaders_at_extremes,
    offset_from_initial_mean,
    token_set_stats,
)
from ._common import in_float64

NAME = "low-rank"
DESCRIPTION = (
    "rank-1, zero and random rank-r A = QᵀK — cluster counts, "
    "Booleanness, leaders; a LoRA of K that raises the rank of A"
)
CLI_OPTIONS = ()


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Options of the rank study and the LoRA study (rescaled dynamics, V = I)."""

    #: tokens per initial condition
    n: int = 32
    #: token dimension (≥ 3: the LoRA acts on e₂, e₃)
    d: int = 3
    #: initial conditions x0 ~ N(0, I), solved as one batch
    seeds: int = 8
    #: independent draws of the random rank-r weights (psd, gen, proj)
    weight_seeds: int = 3
    #: seed of the initial tokens, the weights and the hull directions
    seed: int = 0
    #: inverse temperature β
    beta: float = 1.0
    #: final time
    t1: float = 20.0
    #: fixed step
    dt: float = 0.1
    #: fixed-step solver
    solver: str = "rk4"
    #: tokens within this distance are one cluster
    cluster_threshold: float = 1e-3
    #: (s₂, s₃) of the LoRA ΔK = diag(0, s₂, s₃); (0, 0) first makes it the reference
    lora_scales: tuple[tuple[float, float], ...] = (
        (0.0, 0.0),
        (0.01, 0.01),
        (0.1, 0.1),
        (1.0, 0.0),
        (1.0, 1.0),
    )
    #: distance from the rank-1 run that counts as a departure
    separation: float = 0.1
    #: solve the rank study again at dt / 2 and compare the cluster counts
    dt_check: bool = True
    #: directions tested for convex-hull vertices
    n_dirs: int = 20000

    QUICK: ClassVar[dict[str, Any]] = dict(
        n=16,
        seeds=3,
        weight_seeds=1,
        t1=15.0,
        dt_check=False,
        n_dirs=4000,
        lora_scales=((0.0, 0.0), (0.1, 0.1), (1.0, 0.0), (1.0, 1.0)),
    )


# -- weights -------------------------------------------------------------------------
def truncate(M: np.ndarray, r: int) -> np.ndarray:
    """Best rank-r approximation of M (truncated SVD)."""
    U, s, Vt = np.linalg.svd(M)
    return (U[:, :r] * s[:r]) @ Vt[:r]


def weight_members(d: int, weight_seeds: int, seed: int) -> list[dict]:
    """The (Q, K) pairs of the rank study, with labels; see the module docstring."""
    E = np.zeros((d, d))
    E[0, 0] = 1.0
    Z, I = np.zeros((d, d)), np.eye(d)
    members = [
        {"label": "A = e1e1ᵀ", "family": "e1", "weight_seed": None, "Q": E, "K": E},
        {"label": "A = 0 (Q = 0)", "family": "zero", "weight_seed": None, "Q": Z, "K": I},
        {"label": "A = 0 (K = 0)", "family": "zero", "weight_seed": None, "Q": I, "K": Z},
    ]
    for w in range(weight_seeds):
        rng = np.random.default_rng(1000 * seed + w)
        G = rng.standard_normal((d, d)) / np.sqrt(d)
        H = rng.standard_normal((d, d)) / np.sqrt(d)
        for r in range(1, d + 1):
            Gr = truncate(G, r)
            members.append(
                {
                    "label": f"psd rank {r} (w{w})",
                    "family": "psd",
                    "weight_seed": w,
                    "Q": Gr,
                    "K": Gr,
                }
            )
        for r in range(1, d + 1):
            members.append(
                {
                    "label": f"gen rank {r} (w{w})",
                    "family": "gen",
                    "weight_seed": w,
                    "Q": truncate(G, r),
                    "K": truncate(H, r),
                }
            )
        U = np.linalg.qr(rng.standard_normal((d, d)))[0]
        for r in range(1, d + 1):
            Pr = U[:, :r] @ U[:, :r].T
            members.append(
                {
                    "label": f"proj rank {r} (w{w})",
                    "family": "proj",
                    "weight_seed": w,
                    "Q": Pr,
                    "K": Pr,
                }
            )
    for m in members:
        A = m["Q"].T @ m["K"]
        m["A"] = A
        m["rank_A"] = int(np.linalg.matrix_rank(A, tol=1e-10))
    return members


def stacked_weights_field(members, beta, dtype) -> RescaledField:
    """One field whose stacked (full-rank, α = d) LoRAs on a zero base give Q_m, K_m."""
    d = members[0]["Q"].shape[0]
    Qs = np.stack([m["Q"] for m in members])
    Ks = np.stack([m["K"] for m in members])
    eye = np.broadcast_to(np.eye(d), Qs.shape)
    lora_q = LoRA(jnp.asarray(eye, dtype), jnp.asarray(Qs, dtype), float(d), "Q")
    lora_k = LoRA(jnp.asarray(eye, dtype), jnp.asarray(Ks, dtype), float(d), "K")
    zero = np.zeros((d, d))
    return RescaledField(zero, zero, None, beta=beta, lora=[lora_q, lora_k], dtype=dtype)


def rank_lora(scales, dtype) -> LoRA:
    """Stacked rank-2 LoRA of K with explicit factors: `ΔK = diag(0, s₂, s₃)` per (s₂, s₃).

    `A_lora = [e₂ᵀ; e₃ᵀ]` (2×3), `B_lora = [[0, 0], [s₂, 0], [0, s₃]]` (3×2), α = r = 2.
    """
    A = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    Bs = np.stack([np.array([[0.0, 0.0], [s2, 0.0], [0.0, s3]]) for s2, s3 in scales])
    As = np.broadcast_to(A, (len(scales),) + A.shape)
    return LoRA(jnp.asarray(As, dtype), jnp.asarray(Bs, dtype), 2.0, "K")


def _every(ts, per_unit: int = 2) -> int:
    """Stride that keeps about `per_unit` saved frames per unit of time."""
    dt = float(ts[1] - ts[0]) if ts.size > 1 else 1.0
    return max(1, round(1.0 / (per_unit * dt)))


# -- run -----------------------------------------------------------------------------
@in_float64
def run(out_dir, quick: bool = False, log=print, **overrides) -> dict:
    """Run the rank study and the LoRA study; write `cases.png`, `cluster_counts.png`,
    `lora.png`, `low_rank.npz`, `clusters.csv` and `summary.json` into `out_dir`, and
    return the summary."""
    cfg = Config.build(quick, **overrides)
    if cfg.d < 3:
        raise ValueError(f"low-rank needs d >= 3 (the LoRA acts on e2, e3), got {cfg.d}")
    out_dir = check_output_dir(out_dir)
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    t_start = time.perf_counter()
    n, d, S = cfg.n, cfg.d, cfg.seeds
    x0 = draw_normal(jax.random.key(cfg.seed), (S, n, d), dtype)

    # 1. rank study: all weight members × all seeds in one solve
    members = weight_members(d, cfg.weight_seeds, cfg.seed)
    M = len(members)
    field = stacked_weights_field(members, cfg.beta, dtype)
    log(
        f"[1/4] rank study: {M} weight pairs × {S} initial conditions, n={n}, d={d}, "
        f"rescaled, V=I, T={cfg.t1}, dt={cfg.dt} ({cfg.solver}) ..."
    )
    t0 = time.perf_counter()
    sol = _solve(field, x0, cfg, "rank-study solve")
    solve_s = time.perf_counter() - t0
    ts, xs = np.asarray(sol.ts), np.asarray(sol.xs)  # (M, S, T, n, d)

    # 2. LoRA study: base Q = I, K = e1e1ᵀ with the stacked rank-2 LoRA of K
    scales = list(cfg.lora_scales)
    E = np.zeros((d, d))
    E[0, 0] = 1.0
    base = RescaledField(np.eye(d), E, None, beta=cfg.beta, dtype=dtype)
    lora = rank_lora(scales, dtype) if d == 3 else _rank_lora_d(scales, d, dtype)
    log(
        f"[2/4] LoRA of K raising rank(A) from 1: ΔK = diag(0, s2, s3) for (s2, s3) in {scales} ..."
    )
    lxs = np.asarray(_solve(base.with_lora(lora), x0, cfg, "LoRA solve").xs)  # (L, S, T, n, d)
    K_eff = E[None] + np.asarray(lora.delta())  # (L, d, d): K + ΔK

    # 3. library analysis of both studies' final tokens, in a few compiled calls
    log("[3/4] statistics and checks ...")
    Qs, Ks = (np.stack([m[w] for m in members]) for w in "QK")
    allQ = np.concatenate([Qs, np.broadcast_to(np.eye(d), K_eff.shape)])
    allK = np.concatenate([Ks, K_eff])
    finals = np.concatenate([xs[:, :, -1], lxs[:, :, -1]])  # (M + L, S, n, d)
    P = attention_matrices(allQ, allK, finals, ts[-1], beta=cfg.beta, dtype=dtype)
    dirs = hull_directions(d, cfg.n_dirs, seed=cfg.seed)
    stats = token_set_stats(
        finals.reshape(-1, n, d), P.reshape(-1, n, n), cfg.cluster_threshold, dirs
    )
    runs = _per_run(stats)
    for mi, m in enumerate(members):
        m["stats"] = runs[mi * S : (mi + 1) * S]
    lora_runs = [runs[(M + li) * S : (M + li + 1) * S] for li in range(len(scales))]
    dt_check = _dt_check(field, x0, cfg, xs[:, :, -1], stats.clusters[: M * S], log)
    ref = 0 if scales[0] == (0.0, 0.0) else None  # the rank-1 LoRA run, if there is one
    lora_out, e_all = _lora_members(ts, lxs, K_eff, E, lora_runs, ref, cfg)
    rank1_ref = next(i for i, m in enumerate(members) if m["family"] == "e1")
    lora_zero_matches = float(np.max(np.abs(lxs[ref] - xs[rank1_ref]))) if ref is not None else None
    motion = final_motion(ts, xs)
    leader_masks = stats.leaders[: M * S].reshape(M, S, n)
    checks, zero = _checks(members, xs, P[:M], np.asarray(x0), leader_masks, d)
    checks.update(_convergence_checks(motion, lora_zero_matches, dt_check))
    by_family = {fam: _counts_by_rank(members, fam, d) for fam in ("psd", "gen", "proj")}
    summary = _summary(cfg, quick, dtype, checks, members, rank1_ref, zero, by_family)
    summary.update(
        lora=_lora_summary(lora_out, lora_zero_matches),
        final_motion_last_unit=motion,
        dt_check=dt_check,
        solve_seconds_incl_compile=round(solve_s, 3),
        notes=NOTES.format(n_dirs=cfg.n_dirs),
    )

    # 4. outputs
    log("[4/4] figures, data and summary ...")
    from .. import plotting

    path = lambda name: os.path.join(out_dir, name)
    step = _every(ts, 4)
    plotting.low_rank_cases(xs, members, path("cases.png"), step=step, n=cfg.n, t1=cfg.t1)
    plotting.low_rank_cluster_counts(members, path("cluster_counts.png"), d=cfg.d)
    plotting.low_rank_lora(
        ts, lxs, scales, lora_out, e_all, path("lora.png"), step=step, separation=cfg.separation
    )
    _write_npz(out_dir, ts, xs, lxs, np.asarray(x0), members, P, K_eff, scales, e_all)
    _write_csv(path("clusters.csv"), _csv_rows(members, lora_out, lora_runs, scales))
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    write_json(path("summary.json"), summary)
    failed = [c for c, v in checks.items() if not v]
    log(
        f"done in {summary['wall_seconds']:.1f} s: A = e1e1ᵀ → clusters "
        f"{summary['e1e1']['clusters']}; projection A, mean clusters by rank "
        f"{[by_family['proj'][r]['clusters_mean'] for r in by_family['proj']]}; "
        f"LoRA clusters {[lo['clusters'] for lo in lora_out]}; "
        f"{len(checks) - len(failed)}/{len(checks)} checks pass"
        + (f" (FAILED: {', '.join(failed)})" if failed else "")
    )
    return summary


# -- orchestration helpers of run() ---------------------------------------------------
def _solve(field, x0, cfg: Config, what: str):
    sol = simulate(field, x0, cfg.t1, solver=cfg.solver, dt=cfg.dt)
    sol.xs.block_until_ready()
    if not sol.ok:
        raise RuntimeError(f"{what} failed: {'; '.join(sol.messages())}")
    return sol


def _per_run(stats: TokenSetStats) -> list[dict]:
    """`token_set_stats` as one dict per run (the rows of clusters.csv and the figures)."""
    out = []
    for b in range(stats.clusters.shape[0]):
        ld = np.nonzero(stats.leaders[b])[0]
        out.append(
            {
                "clusters": int(stats.clusters[b]),
                "clusters_10x_threshold": int(stats.clusters_coarse[b]),
                "leaders": ld.tolist(),
                "n_leaders": int(ld.size),
                "booleanness": float(stats.booleanness[b]),
                "rank_P": int(stats.rank_P[b]),
                "centres_on_hull": int(stats.centres_on_hull[b]),
                "centres": stats.centres[b][stats.centre_mask[b]],
            }
        )
    return out


def _dt_check(field, x0, cfg: Config, final, clusters, log) -> dict | None:
    """With `cfg.dt_check`, the rank study again at dt / 2: same cluster counts?"""
    if not cfg.dt_check:
        return None
    log(f"[3b] the rank study again at dt = {cfg.dt / 2:g} (convergence in dt) ...")
    sol2 = simulate(field, x0, cfg.t1, solver=cfg.solver, dt=cfg.dt / 2)
    fin2 = np.asarray(sol2.final)
    counts2 = np.asarray(cluster_count(jnp.asarray(fin2), cfg.cluster_threshold)).reshape(-1)
    return {
        "dt_half": cfg.dt / 2,
        "max_final_difference": float(np.max(np.abs(fin2 - final))),
        "same_cluster_counts": bool(np.array_equal(counts2, clusters)),
    }


def _lora_members(ts, lxs, K_eff, E, lora_runs, ref, cfg: Config) -> tuple[list[dict], list]:
    """Per LoRA scale: rank of A = K + ΔK, cluster statistics and, with a reference run
    `ref` (scale (0, 0)), the divergence from it and when that first exceeds `separation`."""
    out, e_all = [], []
    for li, (sc, runs) in enumerate(zip(cfg.lora_scales, lora_runs)):
        entry = {
            "s2_s3": sc,
            "delta_K_norm": float(np.linalg.norm(K_eff[li] - E, 2)),
            "rank_A": int(np.linalg.matrix_rank(K_eff[li], tol=1e-10)),  # A = IᵀK_eff
            "clusters": [st["clusters"] for st in runs],
            "leaders": [st["n_leaders"] for st in runs],
            "booleanness": [st["booleanness"] for st in runs],
        }
        if ref is not None:
            e = np.asarray(divergence(jnp.asarray(lxs[li]), jnp.asarray(lxs[ref])))  # (S, T)
            e_all.append(e)
            entry["final_divergence_from_rank1"] = e[:, -1].tolist()
            entry["first_time_divergence_above_separation"] = [
                first_time_above(ts, es, cfg.separation) for es in e
            ]
        out.append(entry)
    return out, e_all


def _checks(members, xs, P, x0, leader_masks, d) -> tuple[dict, dict]:
    """The predictions for A = 0, rank-1 and full-rank PSD A, checked on every run."""
    zero_idx = [mi for mi, m in enumerate(members) if m["family"] == "zero"]
    zero = [members[mi] for mi in zero_idx]
    centre0 = lambda m: np.stack([st["centres"][0] for st in m["stats"]])  # token 0's cluster
    mean_err = max(float(np.max(offset_from_initial_mean(centre0(m), x0))) for m in zero)
    uniform_err = max(float(np.max(distance_from_uniform(P[mi]))) for mi in zero_idx)
    rank1 = [m for m in members if m["rank_A"] == 1]
    rank1_psd_idx = [
        mi
        for mi, m in enumerate(members)
        if m["rank_A"] == 1 and m["family"] in ("e1", "psd", "proj")
    ]
    rank1_psd = [members[mi] for mi in rank1_psd_idx]
    full_psd = [m for m in members if m["family"] in ("psd", "proj") and m["rank_A"] == d]
    lead_extreme = all(
        leaders_at_extremes(members[mi]["A"], xs[mi, s, -1], leader_masks[mi, s])
        for mi in rank1_psd_idx
        for s in range(xs.shape[1])
    )
    runs = lambda ms: [st for m in ms for st in m["stats"]]
    checks = {
        "zero_one_cluster_at_the_mean": bool(
            all(st["clusters"] == 1 for st in runs(zero)) and mean_err < 1e-6
        ),
        "zero_uniform_attention_no_leaders": bool(
            uniform_err < 1e-12 and all(st["n_leaders"] == 0 for st in runs(zero))
        ),
        "rank1_psd_at_most_2_clusters": all(st["clusters"] <= 2 for st in runs(rank1_psd)),
        "rank1_psd_leaders_are_extreme_along_a": bool(lead_extreme),
        "rank1_any_at_most_2_clusters": all(st["clusters"] <= 2 for st in runs(rank1)),
        "full_rank_psd_centres_are_hull_vertices": all(
            st["centres_on_hull"] == st["clusters"] for st in runs(full_psd)
        ),
        "nonzero_A_boolean_attention": all(
            st["booleanness"] < 1e-6 for st in runs(m for m in members if m["family"] != "zero")
        ),
    }
    zero_summary = {
        "members": [_member_summary(m) for m in zero],
        "max_centre_minus_initial_mean": mean_err,
        "max_abs_P_minus_1_over_n": uniform_err,
    }
    return checks, zero_summary


def _convergence_checks(motion, lora_zero_matches, dt_check) -> dict:
    """Converged at t1; the LoRA with s = (0, 0) is the rank-1 run; dt / 2 agrees."""
    checks = {"converged_at_t1": bool(motion < 1e-4)}
    if lora_zero_matches is not None:
        checks["lora_zero_reproduces_rank1_run"] = bool(lora_zero_matches < 1e-10)
    if dt_check is not None:
        checks["dt_halved_same_clusters"] = dt_check["same_cluster_counts"]
    return checks


def _counts_by_rank(members, family: str, d: int) -> dict:
    ms = [m for m in members if m["family"] == family]
    ranks = [m["rank_A"] for m in ms for _ in m["stats"]]
    return cluster_counts_by_rank(ranks, [st["clusters"] for m in ms for st in m["stats"]], d)


def _summary(cfg: Config, quick, dtype, checks, members, rank1_ref, zero, by_family) -> dict:
    return {
        "experiment": NAME,
        "quick": quick,
        "config": cfg.to_dict(),
        "dtype": jnp.dtype(dtype).name,
        "dynamics": "rescaled, V = I",
        "checks": checks,
        "all_checks_pass": bool(all(checks.values())),
        "e1e1": _member_summary(members[rank1_ref]),
        "zero": zero,
        "rank1_all_families_clusters_max": int(
            max(st["clusters"] for m in members if m["rank_A"] == 1 for st in m["stats"])
        ),
        "clusters_by_rank": by_family,
        "members": [_member_summary(m) for m in members],
    }


def _lora_summary(lora_out, lora_zero_matches) -> dict:
    return {
        "base": "Q = I, K = e1e1ᵀ (A = e1e1ᵀ)",
        "target": "K",
        "rank": 2,
        "alpha": 2.0,
        "factors": "A_lora = [e2ᵀ; e3ᵀ], B_lora = [[0,0],[s2,0],[0,s3]]",
        "members": lora_out,
        "max_difference_s0_vs_rank1_run": lora_zero_matches,
    }


NOTES = (
    "clusters: connected components at distance <= cluster_threshold of z(t1); "
    "leaders: {{j : max_i P_ij > 1/2}}; booleanness: max_ij min(P_ij, 1 - P_ij) of "
    "P = field.attention(t1, z(t1)) (0 = a 0/1 matrix; 1/n for uniform attention); "
    "centres_on_hull: cluster centres that are vertices of their convex hull "
    "(tested on {n_dirs} directions). Per-run rows are in clusters.csv. "
    "final_motion_last_unit: max |z(t1) - z(t1 - 1)|. t1 is chosen so that tokens "
    "have converged (motion ~1e-8) but are still resolved in float64: at t ~ 40 "
    "the tokens of one cluster coincide to the last bit and attention splits "
    "evenly between them, which would make Booleanness 1/2 for numerical reasons."
)


def _write_npz(out_dir, ts, xs, lxs, x0, members, P, K_eff, scales, e_all) -> None:
    """Trajectories of x0 seed 0 only (every seed's start and end are kept): docs-sized."""
    k = _every(ts)
    M = len(members)
    write_npz(
        os.path.join(out_dir, "low_rank.npz"),
        ts=ts[::k],
        t1=ts[-1],
        xs_seed0=xs[:, 0, ::k],
        final=xs[:, :, -1],
        x0=x0,
        Q=np.stack([m["Q"] for m in members]),
        K=np.stack([m["K"] for m in members]),
        labels=np.array([m["label"] for m in members]),
        P_final_seed0=P[:M, 0],
        lora_scales=np.array(scales),
        lora_K=K_eff,
        lora_xs_seed0=lxs[:, 0, ::k],
        lora_final=lxs[:, :, -1],
        lora_divergence=np.array(e_all)[:, :, ::k] if e_all else np.zeros((0,)),
        lora_P_final_seed0=P[M:, 0],
    )


def _csv_rows(members, lora_out, lora_runs, scales) -> list[list]:
    """One row per run (rank study, then LoRA study) in the columns of `_write_csv`."""
    keys = ("clusters", "clusters_10x_threshold", "n_leaders", "booleanness", "rank_P")
    cols = lambda st: [st[k] for k in (*keys, "centres_on_hull")]
    rows = [
        [mi, m["label"], m["family"], m["rank_A"], m["weight_seed"], s, *cols(st)]
        for mi, m in enumerate(members)
        for s, st in enumerate(m["stats"])
    ]
    for li, (sc, lo, stats) in enumerate(zip(scales, lora_out, lora_runs)):
        label = f"LoRA K s=({sc[0]:g},{sc[1]:g})"
        rows += [
            [f"lora{li}", label, "lora", lo["rank_A"], None, s, *cols(st)]
            for s, st in enumerate(stats)
        ]
    return rows


def _rank_lora_d(scales, d, dtype) -> LoRA:
    """`rank_lora` for d > 3: the same e₂, e₃ directions embedded in R^d."""
    A = np.zeros((2, d))
    A[0, 1] = A[1, 2] = 1.0
    Bs = np.zeros((len(scales), d, 2))
    for i, (s2, s3) in enumerate(scales):
        Bs[i, 1, 0], Bs[i, 2, 1] = s2, s3
    As = np.broadcast_to(A, (len(scales),) + A.shape)
    return LoRA(jnp.asarray(As, dtype), jnp.asarray(Bs, dtype), 2.0, "K")


def _member_summary(m) -> dict:
    st = m["stats"]
    return {
        "label": m["label"],
        "family": m["family"],
        "weight_seed": m["weight_seed"],
        "rank_A": m["rank_A"],
        "A": m["A"],
        "clusters": [s["clusters"] for s in st],
        "n_leaders": [s["n_leaders"] for s in st],
        "booleanness": [s["booleanness"] for s in st],
        "rank_P": [s["rank_P"] for s in st],
        "centres_on_hull": [s["centres_on_hull"] for s in st],
    }


def _write_csv(path, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "member",
            "label",
            "family",
            "rank_A",
            "weight_seed",
            "x0_seed",
            "clusters",
            "clusters_10x_threshold",
            "leaders",
            "booleanness",
            "rank_P",
            "centres_on_hull",
        ]
    )
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])

    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())

    write_atomic(path, _w)
