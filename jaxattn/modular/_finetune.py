"""LoRA fine-tuning on `(x − y) mod p` with the base weights frozen (background:
docs/theory.md, 'LoRA as a perturbation' and 'Modular-arithmetic forgetting').

The pre-trained model gets fresh adapters (`B = 0`: the outputs are unchanged at step 0)
on the configured targets; `eqx.partition` with `trainable_filter(lora_only=True)` makes
the LoRA factors the only trainable leaves, so optax keeps no state for the base weights.
Every `ft_log_every` steps it records the subtraction train/test accuracy and the
forgetting metric, the accuracy on all p² addition pairs (`add_all_acc`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from .._base import Array, Real, check_output_dir, write_json
from ._config import FINETUNE_KEYS, ModularConfig
from ._data import make_split
from ._model import ModularTransformer, trainable_filter
from ._train import adamw, as_device_sets, file_digest, load_pretrained, save_tree, train

#: a logged series, one value per metrics row (a list of the rows' values, or an array)
Series = Sequence[int | float] | Real[np.ndarray, " rows"] | Real[Array, " rows"]


def half_life(steps: Series, add_acc: Series, *, frac: float = 0.5) -> float | None:
    """First step at which the addition accuracy is ≤ `frac` × its value at step 0
    (linear interpolation between logged steps); None if it never gets there."""
    steps = np.asarray(steps, float)
    acc = np.asarray(add_acc, float)
    level = frac * acc[0]
    below = np.nonzero(acc <= level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return 0.0
    a0, a1 = acc[i - 1], acc[i]
    return float(steps[i - 1] + (a0 - level) / (a0 - a1) * (steps[i] - steps[i - 1]))


SUB_LEVELS = (0.5, 0.9)


def at_learning(
    steps: Series, sub_acc: Series, add_acc: Series, levels: Sequence[float] = SUB_LEVELS
) -> dict[str, dict[str, Any]]:
    """Forgetting read against learning: for each level, the first logged step at which
    the new task's accuracy `sub_acc` reaches it and the old task's accuracy `add_acc`
    at that step (both None if the level is never reached)."""
    out = {}
    for lv in levels:
        i = next((k for k, v in enumerate(sub_acc) if v >= lv), None)
        out[f"{lv:g}"] = {
            "step": None if i is None else steps[i],
            "add_acc": None if i is None else add_acc[i],
        }
    return out


def finetune_fingerprint(config: ModularConfig, base_path: str) -> dict[str, Any]:
    """What a fine-tuning checkpoint must agree on: the LoRA and optimiser settings and
    the bytes of the pre-trained model it started from."""
    return dict(config.subset(FINETUNE_KEYS), base=file_digest(base_path))


def finetune(
    config: ModularConfig,
    out_dir: str,
    base_path: str,
    *,
    progress: bool = False,
    on_log: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[ModularTransformer, list[dict[str, Any]], dict[str, Any]]:
    """Fine-tune the model in `base_path` with LoRA; outputs in `out_dir` (resumable).

    **Returns:** `(model_with_lora, rows, summary)`; `summary` has the forgetting
    half-life (steps), the final subtraction accuracies, the final addition accuracy and
    `at_sub_test_acc`: the step at which the subtraction test accuracy first reaches
    each of `config.sub_levels` and the addition accuracy there (`at_learning`).
    """
    base = load_pretrained(config, base_path)
    check_output_dir(out_dir)
    model = base.with_loras(
        config.targets,
        rank=config.rank,
        alpha=config.alpha,
        key=jax.random.fold_in(jax.random.key(config.seed), 1),
    )
    sub = make_split(config.p, "-", config.train_frac, config.seed)
    add = make_split(config.p, "+", config.train_frac, config.seed)
    sets = as_device_sets(sub, ("train", "test"))
    sets["add_all"] = as_device_sets(add, ("all",))["all"]
    opt = adamw(
        config.ft_lr,
        config.beta1,
        config.beta2,
        config.ft_weight_decay,
        0,
        config.dtype,
        clip=config.ft_clip,
    )
    fp = finetune_fingerprint(config, base_path)
    model, rows, info = train(
        model,
        trainable_filter(model, lora_only=True),
        opt,
        train_set=sets["train"],
        eval_sets=sets,
        steps=config.ft_steps,
        log_every=config.ft_log_every,
        checkpoint_every=config.ft_checkpoint_every,
        out_dir=out_dir,
        kind="finetune",
        fingerprint=fp,
        on_log=on_log,
        progress=progress,
        steps_name="ft_steps",
    )
    steps = [r["step"] for r in rows]
    acc = [r["add_all_acc"] for r in rows]
    sub = [r["test_acc"] for r in rows]
    summary = {
        "config": config.as_dict(),
        "steps": info["step"],
        "add_acc_start": acc[0],
        "add_acc_end": acc[-1],
        "half_life": half_life(steps, acc),
        "at_sub_test_acc": at_learning(steps, sub, acc, config.sub_levels),
        "sub_test_acc_max": max(sub),
        "sub_train_acc": rows[-1]["train_acc"],
        "sub_test_acc": rows[-1]["test_acc"],
        "resumed_from": info["resumed_from"],
    }
    save_tree(
        os.path.join(out_dir, "model.eqx"),
        {"kind": "lora-model", "fingerprint": fp, "step": info["step"]},
        model,
    )
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return model, rows, summary
