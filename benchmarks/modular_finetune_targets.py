"""Which fine-tuning can learn subtraction? LoRA targets, ranks and learning rates.

Pre-trains `--seeds` models of one depth with the study's protocol (the config file's
pre-training settings; `--pre-steps` may shorten them), all seeds at once under `vmap`,
then fine-tunes every seed with each setting of the grid on `(x − y) mod p` and prints
the subtraction train/test accuracy reached and the addition accuracy left, per setting
(mean over seeds, and every seed's test accuracy). A setting is
`TARGETS:lr:rank:weight_decay`, with TARGETS a `+`-joined subset of Q, K, V, O, or
`ALL` (every weight of the model trained, no LoRA: the upper bound of what fine-tuning
can reach from this pre-trained model).

    python benchmarks/modular_finetune_targets.py --config docs/modular/study.toml \\
        --depth 2 --json docs/modular/finetune_targets_d2.json
"""

from __future__ import annotations

import argparse
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.modular import (
    ModularTransformer,
    half_life,
    load_config,
    make_split,
    trainable_filter,
)
from jaxattn.modular._train import adamw, cross_entropy, evaluate, pretrain_optimizer

DEFAULT_GRID = (
    "V:1e-4:16:0.01",
    "V:1e-3:16:0.01",
    "V:3e-3:16:0.01",
    "Q+K+V+O:1e-3:16:0.01",
    "Q+K+V+O:3e-3:16:0.01",
    "Q+K+V+O:1e-3:64:0.01",
    "ALL:1e-3:0:0.01",
)


def _train(params, static, opt, X, Y, steps, log, evalf, on_log):
    """Full-batch training of stacked (seed-axis) parameters, `log` steps per jit call."""
    state = jax.vmap(opt.init)(params)

    def one(p, st, s, x, y):
        g = jax.grad(lambda q: cross_entropy(eqx.combine(q, st), x, y))(p)
        with jax.numpy_dtype_promotion("standard"):
            u, s = opt.update(g, s, p)
        return eqx.apply_updates(p, u), s

    @eqx.filter_jit
    def chunk(p, s):
        def body(c, _):
            return jax.vmap(one)(c[0], static, c[1], X, Y), None

        return jax.lax.scan(body, (p, s), None, length=log)[0]

    on_log(0, evalf(params))
    for step in range(log, steps + 1, log):
        params, state = chunk(params, state)
        on_log(step, evalf(params))
    return params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the study's TOML (pre-training protocol)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pre-steps", type=int, default=None, help="default: the config's max_steps")
    ap.add_argument("--ft-steps", type=int, default=2000)
    ap.add_argument("--grid", nargs="*", default=list(DEFAULT_GRID))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = load_config(a.config).replace(depth=a.depth)
    if a.pre_steps:
        cfg = cfg.replace(max_steps=a.pre_steps)
    seeds = list(range(a.seeds))
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    # -- pre-training, every seed at once
    models = eqx.filter_vmap(lambda k: ModularTransformer(cfg, key=k))(keys)
    params, static = eqx.partition(models, eqx.is_inexact_array)
    add = [make_split(cfg.p, "+", cfg.train_frac, s) for s in seeds]
    X = jnp.stack([s["x_train"] for s in add])
    Y = jnp.stack([s["y_train"] for s in add])
    XA, YA = jnp.asarray(add[0]["x_all"]), jnp.asarray(add[0]["y_all"])
    opt = pretrain_optimizer(cfg)
    ev_pre = eqx.filter_jit(
        lambda p: jax.vmap(
            lambda q, x, y: evaluate(eqx.combine(q, static), {"train": (x, y), "all": (XA, YA)})
        )(p, X, Y)
    )
    t0 = time.perf_counter()
    pre_rows = []

    def pre_log(step, r):
        pre_rows.append({k: np.asarray(v).tolist() for k, v in r.items()})
        if step % (10 * cfg.log_every) == 0 or step == cfg.max_steps:
            print(
                f"pre-train depth {a.depth} step {step}: train acc "
                f"{' '.join(f'{v:.3f}' for v in np.asarray(r['train_acc']))} "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    params = _train(params, static, opt, X, Y, cfg.max_steps, cfg.log_every, ev_pre, pre_log)
    base = eqx.combine(params, static)
    final = pre_rows[-1]
    # -- fine-tuning grid
    sub = [make_split(cfg.p, "-", cfg.train_frac, s) for s in seeds]
    SX = jnp.stack([s["x_train"] for s in sub])
    SY = jnp.stack([s["y_train"] for s in sub])
    TX = jnp.stack([s["x_test"] for s in sub])
    TY = jnp.stack([s["y_test"] for s in sub])
    results = []
    print(
        f"\ndepth {a.depth}, {len(seeds)} seeds; pre-trained {cfg.max_steps} steps: train acc "
        f"{np.mean(final['train_acc']):.3f}, all-pairs acc {np.mean(final['all_acc']):.3f}"
    )
    print(
        f"{'setting':>24} | sub train | sub test (max) | per-seed sub test | add acc end"
        f" | half-life"
    )
    for setting in a.grid:
        tg, lr, rank, wd = setting.split(":")
        lr, rank, wd = float(lr), int(rank), float(wd)
        if tg == "ALL":
            m = base
            spec = eqx.is_inexact_array
        else:
            targets = tuple(tg.split("+"))
            m = eqx.filter_vmap(
                lambda mm, k: mm.with_loras(
                    targets, rank=rank, alpha=cfg.alpha, key=jax.random.fold_in(k, 1)
                )
            )(base, keys)
            one = ModularTransformer(cfg, key=jax.random.key(0)).with_loras(
                targets, rank=rank, alpha=cfg.alpha, key=jax.random.key(0)
            )
            spec = trainable_filter(one, lora_only=True)
        p_ft, st_ft = eqx.partition(m, spec)
        o = adamw(lr, cfg.beta1, cfg.beta2, wd, 0, cfg.dtype)
        ev = eqx.filter_jit(
            lambda p, st=st_ft: jax.vmap(
                lambda q, s_, x, y, tx, ty: evaluate(
                    eqx.combine(q, s_), {"train": (x, y), "test": (tx, ty), "add": (XA, YA)}
                )
            )(p, st, SX, SY, TX, TY)
        )
        rows = []
        t1 = time.perf_counter()
        _train(
            p_ft,
            st_ft,
            o,
            SX,
            SY,
            a.ft_steps,
            50,
            ev,
            lambda step, r: rows.append({"step": step} | {k: np.asarray(v) for k, v in r.items()}),
        )
        steps = [r["step"] for r in rows]
        test = np.stack([r["test_acc"] for r in rows])  # (logs, seeds)
        addc = np.stack([r["add_acc"] for r in rows])
        hl = [half_life(steps, addc[:, i]) for i in range(len(seeds))]
        res = {
            "setting": setting,
            "targets": tg,
            "lr": lr,
            "rank": rank,
            "weight_decay": wd,
            "sub_train_acc": rows[-1]["train_acc"].tolist(),
            "sub_test_acc": rows[-1]["test_acc"].tolist(),
            "sub_test_acc_max": test.max(axis=0).tolist(),
            "add_acc_end": rows[-1]["add_acc"].tolist(),
            "half_life": hl,
            "wall_s": time.perf_counter() - t1,
        }
        results.append(res)
        hls = [h for h in hl if h is not None]
        print(
            f"{setting:>24} | {np.mean(res['sub_train_acc']):9.3f} | "
            f"{np.mean(res['sub_test_acc']):.3f} ({np.mean(res['sub_test_acc_max']):.3f}) | "
            f"{' '.join(f'{v:.2f}' for v in res['sub_test_acc'])} | "
            f"{np.mean(res['add_acc_end']):.3f} | "
            f"{np.mean(hls) if hls else float('nan'):.0f} ({len(hl) - len(hls)} never)",
            flush=True,
        )
    if a.json:
        from jaxattn._base.io import write_json

        write_json(
            a.json,
            {
                "config": cfg.as_dict(),
                "depth": a.depth,
                "seeds": seeds,
                "ft_steps": a.ft_steps,
                "pretrain_final": final,
                "results": results,
                "machine": "see docs/modular.md",
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
