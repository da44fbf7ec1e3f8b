"""The forgetting study: depths × seeds, LoRA ranks, spectra, particles (background:
docs/theory.md, 'Modular-arithmetic forgetting').

Every model uses the same hyper-parameters; only `depth` (and the seed) change. Each run
lives in `out/runs/d{depth}_s{seed}/{pretrain, finetune_r{rank}}` and is resumable, so an
interrupted study restarted with the same command continues where it stopped (finished
runs are re-read, not re-trained). Figures are drawn at the end from the runs' metrics.

Particle-model connection (docs/theory.md, 'Residual layers as Euler steps'): with one
head and no LayerNorm, one layer of the
model is one Euler step (h = 1) of `x_i' = Σ_j P_ij V_eff x_j`, `V_eff = O V`,
`β = 1/√d`. We embed addition prompts, run the particle dynamics to `T = depth` with the
pre-trained and with the LoRA-perturbed weights (`V → V + (α/r) B A`), and compare the
divergence `e(T) = max_i |x_i(T) − x̃_i(T)|` (mean over prompts) with the forgetting
measured for that model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .._base import ArrayLike, Int, check_output_dir, write_json, write_text
from ._config import ModularConfig, pretrain_fingerprint
from ._data import all_pairs
from ._finetune import finetune, finetune_fingerprint
from ._model import ModularTransformer
from ._train import check_pretrained, check_resume, pretrain


def run_dir(out_dir: str, depth: int, seed: int) -> str:
    return os.path.join(out_dir, "runs", f"d{depth}_s{seed}")


def study_jobs(config: ModularConfig) -> list[ModularConfig]:
    """The study's runs, one config each: every depth × seed at `config.rank`, then the
    ranks at `rank_depth` (each built, hence validated, here)."""
    keys = [(d, s, config.rank) for d in config.depths for s in config.seeds]
    keys += [
        (config.rank_depth, s, r)
        for r in config.ranks
        for s in config.seeds
        if (config.rank_depth, s, r) not in keys
    ]
    return [config.replace(depth=d, seed=s, rank=r) for d, s, r in keys]


def capacity_configs(config: ModularConfig) -> list[ModularConfig]:
    """The capacity runs: `capacity_depth` with the first seed at every width × lr."""
    return [
        config.replace(
            depth=config.capacity_depth,
            seed=config.seeds[0],
            lr=lr,
            d_model=width,
            stop_at_target=False,
        )
        for width in config.capacity_widths
        for lr in config.capacity_lrs
    ]


def capacity_dir(out_dir: str, c: ModularConfig) -> str:
    return os.path.join(out_dir, "capacity", f"d{c.depth}_w{c.d_model}_lr{c.lr:g}")


def check_run(config: ModularConfig, action: str, out_dir: str) -> None:
    """Every check of a `pretrain`, `finetune` or `study` run into `out_dir` that can be
    made before anything is written: each run's config (the study's depths, ranks and
    capacity widths included), and each checkpoint already there (its format, its
    configuration, its step against the steps asked for). A refused run leaves nothing."""
    pre, base, ft = "pretrain", os.path.join("pretrain", "model.eqx"), "finetune"
    if action == "pretrain":
        runs = [(config, out_dir, pre, None)]
    elif action == "finetune":  # the pre-trained model must be there
        runs = [(config, out_dir, None, ft)]
    else:
        runs = [
            (c, run_dir(out_dir, c.depth, c.seed), pre, f"finetune_r{c.rank}")
            for c in study_jobs(config)
        ]
        runs += [(c, capacity_dir(out_dir, c), "", None) for c in capacity_configs(config)]
    for c, rd, pre_dir, ft_dir in runs:  # (config, run folder, its sub-folders)
        if pre_dir is not None:
            fp = pretrain_fingerprint(c)
            check_resume(os.path.join(rd, pre_dir), "pretrain", fp, c.max_steps, "max_steps")
        if ft_dir is not None and (action == "finetune" or os.path.exists(os.path.join(rd, base))):
            check_pretrained(c, os.path.join(rd, base))
            fp = finetune_fingerprint(c, os.path.join(rd, base))
            check_resume(os.path.join(rd, ft_dir), "finetune", fp, c.ft_steps, "ft_steps")


def particle_divergence(
    base: ModularTransformer,
    tuned: ModularTransformer,
    tokens: Int[ArrayLike, "m 4"],
    *,
    dtype: DTypeLike = jnp.float64,
) -> dict[str, float]:
    """Divergence at `T = depth` between the particle dynamics with the base and the
    LoRA-perturbed weights, from the embedded `tokens (m, 4)`; Euler with h = 1 (the
    model itself) and RK4 with h = 0.05 (the continuous-depth limit).

    Computed in float64 by default, whatever the model was trained in (64-bit JAX for
    this computation only): a trained `O V` has eigenvalues spread far enough that float32
    logits cannot resolve the slow directions at `T = depth`, which `simulate` would
    rightly warn about (`Float32PrecisionWarning`) for a step the user cannot change."""
    if jnp.dtype(dtype) == jnp.float64:
        with jax.enable_x64(True):
            return _particle_divergence(base, tuned, tokens, jnp.dtype(jnp.float64))
    return _particle_divergence(base, tuned, tokens, jnp.dtype(dtype))


def _particle_divergence(base, tuned, tokens, dtype) -> dict[str, float]:
    from .._analysis import divergence
    from .._model import PlainField
    from .._simulate import simulate

    x0 = jnp.asarray(base.embed, dtype)[jnp.asarray(tokens)] + jnp.asarray(base.pos, dtype)[None]
    T = float(base.depth)
    out = {}
    for name, solver, dt in (("euler", "euler", 1.0), ("rk4", "rk4", 0.05)):
        finals = []
        for m in (base, tuned):
            *weights, beta = m.particle_weights()
            Q, K, V = (jnp.asarray(w, dtype) for w in weights)
            f = PlainField(Q, K, V, beta=beta, dtype=dtype)
            sol = simulate(f, x0, T, solver=solver, dt=dt, ts=[T], dtype=dtype)
            finals.append(sol.xs[..., -1, :, :])
        e = divergence(finals[0], finals[1])
        scale = jnp.max(jnp.linalg.norm(finals[0], axis=-1), axis=-1)
        out[f"div_{name}"] = float(jnp.mean(e))
        out[f"rel_div_{name}"] = float(jnp.mean(e / scale))
    return out


def _stats(values) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    n_none = len(values) - len(v)
    if not v:
        return {
            "mean": None,
            "std": None,
            "min": None,
            "max": None,
            "n": 0,
            "censored": n_none,
            "values": list(values),
        }
    a = np.asarray(v, float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
        "censored": n_none,
        "values": list(values),
    }


def run_study(
    config: ModularConfig,
    out_dir: str,
    *,
    progress: bool = False,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Run (or resume) the whole study; write figures and `summary.json` in `out_dir`."""
    check_output_dir(out_dir)
    t_start = time.perf_counter()
    runs: dict[tuple[int, int, int], dict[str, Any]] = {}
    models = {}
    jobs = study_jobs(config)  # every run's config, validated before any work
    capacity_configs(config)
    prompts = _prompt_tokens(config)
    for c in jobs:
        depth, seed, rank = c.depth, c.seed, c.rank
        rd = run_dir(out_dir, depth, seed)
        t0 = time.perf_counter()
        base, pre_rows, pre = pretrain(c, os.path.join(rd, "pretrain"), progress=progress)
        tuned, ft_rows, ft = finetune(
            c,
            os.path.join(rd, f"finetune_r{rank}"),
            os.path.join(rd, "pretrain", "model.eqx"),
            progress=progress,
        )
        rec = {
            "depth": depth,
            "seed": seed,
            "rank": rank,
            "pretrain_steps": pre["steps"],
            "steps_to_target": pre["steps_to_target"],
            "reached_target": pre["reached_target"],
            "pre_test_acc": pre["final"]["test_acc"],
            "pre_train_acc": pre["final"]["train_acc"],
            "pre_all_acc": pre["final"].get("all_acc"),
            "at_sub_test_acc": ft["at_sub_test_acc"],
            "sub_test_acc_max": ft["sub_test_acc_max"],
            "ft_sub_train_acc": [r["train_acc"] for r in ft_rows],
            "add_acc_start": ft["add_acc_start"],
            "add_acc_end": ft["add_acc_end"],
            "half_life": ft["half_life"],
            "sub_test_acc": ft["sub_test_acc"],
            "sub_train_acc": ft["sub_train_acc"],
            "ft_steps": [r["step"] for r in ft_rows],
            "ft_add_acc": [r["add_all_acc"] for r in ft_rows],
            "ft_sub_test_acc": [r["test_acc"] for r in ft_rows],
            "pre_steps": [r["step"] for r in pre_rows],
            "pre_test_acc_curve": [r["test_acc"] for r in pre_rows],
            "pre_train_acc_curve": [r["train_acc"] for r in pre_rows],
            "pre_all_acc_curve": [r.get("all_acc") for r in pre_rows],
        }
        if c.heads == 1 and not c.layernorm:
            rec.update(particle_divergence(base, tuned, prompts))
        runs[(depth, seed, rank)] = rec
        models[(depth, seed, rank)] = tuned
        hl = "never" if rec["half_life"] is None else f"{rec['half_life']:.0f}"
        log(
            f"depth {depth} seed {seed} rank {rank}: pre-trained {pre['steps']} steps "
            f"(test acc {pre['final']['test_acc']:.3f}), add acc {rec['add_acc_start']:.3f}"
            f" → {rec['add_acc_end']:.3f}, half-life {hl}, sub test acc "
            f"{rec['sub_test_acc']:.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    spectra = _spectra(config, models)
    capacity = _capacity(config, out_dir, progress=progress, log=log)
    summary = _summarise(config, runs, spectra)
    summary["capacity"] = capacity
    summary["wall_s"] = time.perf_counter() - t_start
    write_json(os.path.join(out_dir, "summary.json"), summary)
    write_text(os.path.join(out_dir, "results.md"), results_table(summary))
    from ..plotting import modular_study_figures

    modular_study_figures(config, summary, out_dir)
    return summary


def _capacity(config: ModularConfig, out_dir: str, *, progress: bool, log) -> list[dict]:
    """Evidence for a depth that cannot fit the task: pre-train `capacity_depth` with
    seed 0 at every `capacity_lrs` × `capacity_widths` (same schedule and steps as the
    study) and keep the training-accuracy curves."""
    out = []
    for c in capacity_configs(config):
        width, lr = c.d_model, c.lr
        rd = capacity_dir(out_dir, c)
        _, rows, pre = pretrain(c, rd, progress=progress)
        out.append(
            {
                "depth": c.depth,
                "d_model": width,
                "lr": lr,
                "steps": [r["step"] for r in rows],
                "train_acc": [r["train_acc"] for r in rows],
                "final_train_acc": rows[-1]["train_acc"],
                "max_train_acc": max(r["train_acc"] for r in rows),
            }
        )
        log(
            f"capacity: depth {c.depth}, d_model {width}, lr {lr:g}: train acc "
            f"{out[-1]['final_train_acc']:.3f} after {pre['steps']} steps "
            f"(best {out[-1]['max_train_acc']:.3f})"
        )
    return out


def trend_test(depths: Sequence[int], values: Sequence[float | None]) -> dict[str, Any]:
    """Is a per-model quantity monotone in depth? Spearman's rank correlation (with
    its two-sided p-value) and the least-squares slope per layer with a 95 % interval,
    over the models whose value is known."""
    from scipy import stats

    pts = [(d, v) for d, v in zip(depths, values) if v is not None]
    if len(pts) < 3 or len({d for d, _ in pts}) < 2:
        return {
            "n": len(pts),
            "spearman_rho": None,
            "p_value": None,
            "slope": None,
            "slope_ci95": None,
        }
    d, v = np.asarray(pts, float).T
    if np.ptp(v) == 0:  # e.g. no model halved: ranks carry no information
        return {
            "n": len(pts),
            "spearman_rho": None,
            "p_value": None,
            "slope": 0.0,
            "slope_ci95": None,
        }
    # SciPy's result objects are typed as bare tuples: read them by name, as floats.
    sp: Any = stats.spearmanr(d, v)
    fit: Any = stats.linregress(d, v)
    slope, stderr = float(fit.slope), float(fit.stderr)
    half = float(stats.t.ppf(0.975, len(d) - 2)) * stderr
    return {
        "n": len(pts),
        "spearman_rho": float(sp.statistic),
        "p_value": float(sp.pvalue),
        "slope": slope,
        "slope_ci95": [slope - half, slope + half],
        "r2": float(fit.rvalue) ** 2,
    }


def _prompt_tokens(config: ModularConfig):
    tok, _ = all_pairs(config.p, "+")
    idx = np.linspace(0, tok.shape[0] - 1, min(config.particle_prompts, tok.shape[0]))
    return jnp.asarray(tok[idx.astype(int)])


def _spectra(config, models) -> dict[str, Any]:
    """Eigenvalues of V and of `V + (α/r) B A` (first block, first seed) per depth."""
    out = {}
    s0 = config.seeds[0]
    for d in config.depths:
        m = models.get((d, s0, config.rank))
        if m is None:
            continue
        V = np.asarray(m.block.V[0], np.float64)
        Vt = np.asarray(m.weight("V", 0), np.float64)
        ev, evt = np.linalg.eigvals(V), np.linalg.eigvals(Vt)
        out[str(d)] = {
            "V_real": ev.real.tolist(),
            "V_imag": ev.imag.tolist(),
            "Vlora_real": evt.real.tolist(),
            "Vlora_imag": evt.imag.tolist(),
            "delta_norm": float(np.linalg.norm(Vt - V, 2)),
            "rho_V": float(np.max(np.abs(ev))),
            "rho_Vlora": float(np.max(np.abs(evt))),
        }
    return out


def _summarise(config, runs, spectra) -> dict[str, Any]:
    """Per-depth statistics and the depth-trend tests. A model enters the trend only if
    its final pre-trained state meets the bar (`meets_bar`); the others are listed."""
    per_depth = {}
    trend_runs = []
    for d in config.depths:
        rs = [runs[(d, s, config.rank)] for s in config.seeds]
        ok = [r for r in rs if r["reached_target"]]
        trend_runs += ok
        levels = [f"{lv:g}" for lv in config.sub_levels]
        per_depth[str(d)] = {
            "half_life": _stats([r["half_life"] for r in ok]),
            "pretrain_steps": _stats([r["steps_to_target"] for r in rs]),
            "never_reached_target": [r["seed"] for r in rs if not r["reached_target"]],
            "in_trend": len(ok),
            "add_acc_start": _stats([r["add_acc_start"] for r in ok]),
            **{
                f"add_acc_at_sub_{lv}": _stats([r["at_sub_test_acc"][lv]["add_acc"] for r in ok])
                for lv in levels
            },
            **{
                f"step_at_sub_{lv}": _stats([r["at_sub_test_acc"][lv]["step"] for r in ok])
                for lv in levels
            },
            "sub_test_acc": _stats([r["sub_test_acc"] for r in ok]),
            "sub_test_acc_max": _stats([r["sub_test_acc_max"] for r in ok]),
            "add_acc_end": _stats([r["add_acc_end"] for r in ok]),
        }
    # A model that never halves forgets slower than any that did: rank it last.
    big = 10.0 * config.ft_steps
    dep = [r["depth"] for r in trend_runs]
    trend = {
        "half_life": trend_test(
            dep, [big if r["half_life"] is None else r["half_life"] for r in trend_runs]
        ),
        **{
            f"add_acc_at_sub_{lv:g}": trend_test(
                dep, [r["at_sub_test_acc"][f"{lv:g}"]["add_acc"] for r in trend_runs]
            )
            for lv in config.sub_levels
        },
        "depths": sorted(set(dep)),
    }
    t = trend["half_life"]
    if t["p_value"] is None:
        verdict = "not testable (fewer than two depths or no variation in the trend)"
    elif t["p_value"] < 0.05:
        verdict = (
            f"deeper forgets {'faster' if t['spearman_rho'] < 0 else 'slower'}: "
            f"Spearman rho = {t['spearman_rho']:.2f}, p = {t['p_value']:.2g}"
        )
    else:
        verdict = (
            f"no significant depth trend: Spearman rho = {t['spearman_rho']:.2f}, "
            f"p = {t['p_value']:.2g}"
        )
    trend["verdict"] = verdict
    per_rank = {}
    for r_ in config.ranks:
        rs = [runs[(config.rank_depth, s, r_)] for s in config.seeds]
        per_rank[str(r_)] = {
            "half_life": _stats([r["half_life"] for r in rs]),
            "sub_test_acc": _stats([r["sub_test_acc"] for r in rs]),
            "sub_test_acc_max": _stats([r["sub_test_acc_max"] for r in rs]),
            "add_acc_end": _stats([r["add_acc_end"] for r in rs]),
        }
    return {
        "config": config.as_dict(),
        "per_depth": per_depth,
        "per_rank": per_rank,
        "trend": trend,
        "spectra": spectra,
        "runs": [dict(v, key=f"d{k[0]}_s{k[1]}_r{k[2]}") for k, v in runs.items()],
    }


def _fmt(st: dict[str, Any], digits: int = 0, *, spread: bool = False) -> str:
    if st["mean"] is None:
        return "—"
    f = f"{{:.{digits}f}}"
    txt = f"{f.format(st['mean'])} ± {f.format(st['std'])}"
    if spread:
        txt += f" [{f.format(st['min'])}–{f.format(st['max'])}]"
    return txt


def results_table(summary: dict[str, Any]) -> str:
    """The per-depth results as a Markdown table (mean ± sd over the seeds whose model
    met the pre-training bar; "a/b" counts seeds), then the trend test."""
    c = summary["config"]
    n_seeds = len(c["seeds"])
    levels = [f"{lv:g}" for lv in c["sub_levels"]]
    head = (
        "| depth | met the bar | pre-training steps to the bar | addition acc. at start "
        "| half-life (steps) | best sub. test acc. | "
        + " | ".join(f"add. acc. / step when sub. test ≥ {lv}" for lv in levels)
        + " |"
    )
    rows = [head, "|" + "---|" * (6 + len(levels))]
    for d, v in summary["per_depth"].items():
        cells = []
        for lv in levels:
            a, st = v[f"add_acc_at_sub_{lv}"], v[f"step_at_sub_{lv}"]
            cells.append(
                "never" if a["n"] == 0 else f"{_fmt(a, 3)} / {_fmt(st)} ({a['n']}/{v['in_trend']})"
            )
        rows.append(
            f"| {d} | {v['in_trend']}/{n_seeds} | {_fmt(v['pretrain_steps'])} "
            f"| {_fmt(v['add_acc_start'], 3)} | {_fmt(v['half_life'], 1, spread=True)} "
            f"| {_fmt(v['sub_test_acc_max'], 3)} | " + " | ".join(cells) + " |"
        )
    t = summary["trend"]
    lines = ["\n".join(rows), ""]
    keys = [("half_life", "half-life")] + [
        (f"add_acc_at_sub_{lv}", f"addition acc. when sub. test ≥ {lv}") for lv in levels
    ]
    for key, label in keys:
        tt = t[key]
        if tt["p_value"] is None:
            lines.append(f"- {label} against depth: not testable (n = {tt['n']})")
        else:
            lo, hi = tt["slope_ci95"]
            lines.append(
                f"- {label} against depth (n = {tt['n']} models, depths "
                f"{t['depths']}): Spearman ρ = {tt['spearman_rho']:.2f} "
                f"(p = {tt['p_value']:.2g}); OLS slope {tt['slope']:.3g} per "
                f"layer, 95 % CI [{lo:.3g}, {hi:.3g}], R² = {tt['r2']:.2f}"
            )
    lines.append(f"- verdict: {t['verdict']}")
    return "\n".join(lines) + "\n"


def redraw(out_dir: str) -> None:
    """Draw the figures again from `out_dir/summary.json` (no training)."""
    import json

    from ..plotting import modular_study_figures
    from ._config import make_config

    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    modular_study_figures(make_config(summary["config"]), summary, out_dir)
    write_text(os.path.join(out_dir, "results.md"), results_table(summary))
