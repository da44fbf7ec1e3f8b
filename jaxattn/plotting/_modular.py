"""Figures of the modular-arithmetic forgetting study (`jaxattn modular study`), drawn
from the study's summary: forgetting curves, the trade-off, the depth summary, ranks,
spectra, particle divergence against forgetting, pre-training and capacity."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from .._base import save_figure


def _band(ax, steps, curves, label, color):
    """Mean curve, min–max band and every seed as a faint line."""
    a = np.asarray(curves, float)
    for c in a:
        ax.plot(steps, c, color=color, alpha=0.25, lw=0.7)
    ax.plot(steps, a.mean(axis=0), color=color, label=label, lw=1.8)
    ax.fill_between(steps, a.min(axis=0), a.max(axis=0), color=color, alpha=0.12)


def depth_colors(depths) -> dict:
    """One colour per depth from viridis, stopping short of its pale-yellow end (a curve
    drawn in it on white is hard to see, and a single depth used to get it)."""
    cmap = plt.get_cmap("viridis")
    return {d: cmap(0.8 * i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}


def modular_study_figures(config, summary, out_dir) -> None:
    """Every figure of the study into `out_dir`, from `summary` (as `run_study` returns
    it or as read back from `summary.json`) and the study's `ModularConfig`."""
    runs = {r["key"]: r for r in summary["runs"]}
    depths, seeds, ranks = config.depths, config.seeds, config.ranks
    colors = depth_colors(depths)
    pdp = summary["per_depth"]

    def trend_runs(d):
        """The models of depth `d` in the trend (they met the pre-training bar)."""
        return [r for s in seeds if (r := runs[f"d{d}_s{s}_r{config.rank}"])["reached_target"]]

    def curves(rs, key):
        return rs[0]["ft_steps"], [x[key] for x in rs]

    shown = [d for d in depths if trend_runs(d)]
    # 1. forgetting curves per depth + subtraction accuracy (models that met the bar)
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    for d in shown:
        rs = trend_runs(d)
        st, cu = curves(rs, "ft_add_acc")
        _band(axs[0], st, cu, f"depth {d} ({len(rs)} seeds)", colors[d])
        st, cu = curves(rs, "ft_sub_test_acc")
        _band(axs[1], st, cu, f"depth {d}", colors[d])
    axs[0].axhline(1 / config.p, color="gray", ls=":", lw=1)
    axs[1].axhline(1 / config.p, color="gray", ls=":", lw=1)
    axs[0].set(
        xlabel="fine-tuning step",
        ylabel="addition accuracy (all pairs)",
        title=f"forgetting (LoRA r={config.rank} on {'+'.join(config.targets)})",
    )
    axs[1].set(
        xlabel="fine-tuning step", ylabel="subtraction test accuracy", title="learning the new task"
    )
    for ax in axs:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "forgetting.png"), dpi=110)
    plt.close(fig)

    # 2. trade-off: old task against new task during fine-tuning
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for d in shown:
        for i, r in enumerate(trend_runs(d)):
            ax.plot(
                r["ft_sub_test_acc"],
                r["ft_add_acc"],
                color=colors[d],
                alpha=0.6,
                lw=0.9,
                label=f"depth {d}" if i == 0 else None,
            )
            ax.plot(r["ft_sub_test_acc"][0], r["ft_add_acc"][0], "o", color=colors[d], ms=3)
    ax.set(
        xlabel="subtraction test accuracy (new task)",
        ylabel="addition accuracy, all pairs (old task)",
        title="trade-off during fine-tuning (one line per seed)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "tradeoff.png"), dpi=110)
    plt.close(fig)

    # 3. half-life, addition accuracy when subtraction reaches 0.5 / 0.9, pre-training
    # steps against depth. Censored values (never halved / never reached) are drawn at
    # the cap as red ▲ with a count.
    levels = [f"{lv:g}" for lv in config.sub_levels]
    panels = [
        ("half_life", "forgetting half-life (fine-tuning steps)", config.ft_steps),
        ("add_acc_at_sub", "addition acc. when sub. test acc. first ≥ level", None),
        ("step_at_sub", "fine-tuning steps until sub. test acc. ≥ level", config.ft_steps),
        ("pretrain_steps", "pre-training steps to meet the bar", config.max_steps),
    ]
    markers = dict(zip(levels, "os^Dv<>"))
    fig, axs = plt.subplots(1, 4, figsize=(16, 3.9))
    for ax, (key, label, cap) in zip(axs, panels):
        per_level = key in ("add_acc_at_sub", "step_at_sub")
        for k, lv in enumerate(levels if per_level else [None]):
            name = f"{key}_{lv}" if lv is not None else key
            dx = 0.12 * (k - (len(levels) - 1) / 2) if per_level else 0.0
            for d in depths:
                st = pdp[str(d)][name]
                vals = st["values"]
                ok = [v for v in vals if v is not None]
                ax.scatter(
                    [d + dx] * len(ok),
                    ok,
                    color=colors[d],
                    alpha=0.7,
                    s=18,
                    marker=markers[lv] if lv is not None else "o",
                    label=f"level {lv}" if per_level and d == depths[-1] else None,
                )
                n_cens = len(vals) - len(ok)
                if n_cens and (cap is not None or not per_level):
                    y = cap if cap is not None else 0.0
                    ax.scatter([d + dx], [y], marker="^", color="red", s=30)
                    if not per_level:  # per level, the title explains the red marks
                        ax.annotate(
                            f"{n_cens}/{len(vals)} never",
                            (d + dx, y),
                            textcoords="offset points",
                            xytext=(0, 6),
                            ha="center",
                            fontsize=7,
                            color="red",
                        )
                if st["mean"] is not None:
                    ax.errorbar(
                        [d + dx], [st["mean"]], yerr=[st["std"]], fmt="k_", capsize=4, ms=14
                    )
        if per_level:
            ax.legend(fontsize=7)
            if cap is not None:
                ax.set_title(f"red ▲ at {cap}: some seeds never reached the level", fontsize=8)
        ax.set(xlabel="depth", ylabel=label, xticks=list(depths))
        ax.grid(alpha=0.3)
    t = summary.get("trend", {}).get("half_life", {})
    if t.get("spearman_rho") is not None:
        axs[0].set_title(
            f"Spearman ρ = {t['spearman_rho']:.2f}, p = {t['p_value']:.2g}", fontsize=9
        )
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "depth_summary.png"), dpi=110)
    plt.close(fig)

    # 3. ranks at one depth
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    rc = {r: plt.get_cmap("viridis")(0.8 * i / max(1, len(ranks) - 1)) for i, r in enumerate(ranks)}
    for r in ranks:
        # every seed, as the per-rank statistics in summary["per_rank"] use
        rs = [runs[f"d{config.rank_depth}_s{s}_r{r}"] for s in seeds]
        st, cu = curves(rs, "ft_add_acc")
        _band(axs[0], st, cu, f"r = {r}", rc[r])
        st, cu = curves(rs, "ft_sub_test_acc")
        _band(axs[1], st, cu, f"r = {r}", rc[r])
    axs[0].set(
        xlabel="fine-tuning step",
        ylabel="addition accuracy",
        title=f"ranks at depth {config.rank_depth} (α = {config.alpha})",
    )
    axs[1].set(xlabel="fine-tuning step", ylabel="subtraction test accuracy")
    for ax in axs:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "ranks.png"), dpi=110)
    plt.close(fig)

    # 4. spectra
    sp = summary["spectra"]
    if sp:
        n = len(sp)
        fig, axs = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False)
        for ax, (d, e) in zip(axs[0], sp.items()):
            ax.scatter(e["V_real"], e["V_imag"], s=10, label="V", color="tab:blue")
            ax.scatter(
                e["Vlora_real"],
                e["Vlora_imag"],
                s=10,
                marker="x",
                label="V + (α/r)BA",
                color="tab:red",
            )
            ax.set(title=f"depth {d}", xlabel="Re λ")
            ax.set_aspect("equal", adjustable="datalim")
            ax.grid(alpha=0.3)
        axs[0][0].set_ylabel("Im λ")
        axs[0][0].legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, os.path.join(out_dir, "spectra.png"), dpi=110)
        plt.close(fig)

    # 5. particle divergence against forgetting
    pts = [r for r in summary["runs"] if "div_euler" in r and r["rank"] == config.rank]
    if pts:
        fig, axs = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in (
            (axs[0], "rel_div_euler", "Euler h = 1 (the model)"),
            (axs[1], "rel_div_rk4", "RK4 h = 0.05 (ODE limit)"),
        ):
            for d in depths:
                sel = [r for r in pts if r["depth"] == d]
                ax.scatter(
                    [r[key] for r in sel],
                    [r["add_acc_start"] - r["add_acc_end"] for r in sel],
                    color=colors[d],
                    label=f"depth {d}",
                )
            ax.set(
                xlabel="relative particle divergence e(T)/max|x(T)|, T = depth",
                ylabel="forgetting (drop of addition acc.)",
                title=title,
            )
            ax.grid(alpha=0.3)
        axs[0].legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, os.path.join(out_dir, "particle.png"), dpi=110)
        plt.close(fig)

    # 6. pre-training curves: training accuracy and accuracy on all pairs
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    # The all-pairs accuracy is evaluated only when the bar asks for it.
    right = "pre_all_acc_curve" if config.target_all_acc else "pre_test_acc_curve"
    for d in depths:
        for s in seeds:
            r = runs[f"d{d}_s{s}_r{config.rank}"]
            lab = f"depth {d}" if s == seeds[0] else None
            for ax, key in ((axs[0], "pre_train_acc_curve"), (axs[1], right)):
                ax.plot(r["pre_steps"], r[key], color=colors[d], alpha=0.7, lw=0.9, label=lab)
    for ax, thr, name in (
        (axs[0], config.target_train_acc, "training accuracy"),
        (
            axs[1],
            config.target_all_acc or config.target_acc,
            "accuracy, all pairs" if config.target_all_acc else "test accuracy",
        ),
    ):
        if thr > 0:
            ax.axhline(thr, color="k", ls=":", lw=1)
        ax.set(xlabel="pre-training step", ylabel=f"addition {name}")
        ax.grid(alpha=0.3)
    axs[0].set_title(f"pre-training (p = {config.p}, d = {config.d_model})")
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "pretrain.png"), dpi=110)
    plt.close(fig)

    # 7. capacity evidence for the depth left out
    cap = summary.get("capacity") or []
    if cap:
        fig, ax = plt.subplots(figsize=(6, 4))
        widths = sorted({c["d_model"] for c in cap})
        styles = dict(zip(widths, ("-", "--", ":", "-.")))
        lrs = sorted({c["lr"] for c in cap})
        lc = {lr: plt.get_cmap("plasma")(i / max(1, len(lrs))) for i, lr in enumerate(lrs)}
        for c in cap:
            ax.plot(
                c["steps"],
                c["train_acc"],
                ls=styles.get(c["d_model"], "-"),
                color=lc[c["lr"]],
                label=f"d_model {c['d_model']}, lr {c['lr']:g}",
            )
        if config.target_train_acc > 0:
            ax.axhline(config.target_train_acc, color="k", ls=":", lw=1)
        ax.set(
            xlabel="pre-training step",
            ylabel="addition training accuracy",
            title=f"depth {cap[0]['depth']}: can it fit the training set?",
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, os.path.join(out_dir, "capacity.png"), dpi=110)
        plt.close(fig)
