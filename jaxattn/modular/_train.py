"""Full-batch training with optax: jitted `lax.scan` chunks, metrics, resumable checkpoints.

`train` is shared by pre-training (all weights) and LoRA fine-tuning (only the LoRA
factors): the model is split with `eqx.partition` into trainable leaves and a frozen rest,
so the optimiser state exists for the trainable leaves only (frozen leaves are `None` in
both the parameters and the optax state).

Every `log_every` steps one jitted call runs `log_every` AdamW steps inside `lax.scan`
(one host round trip), then the metrics (loss and accuracy on every evaluation set) are
recorded; they are written to `metrics.csv` / `metrics.json` with every checkpoint and at
the end. Every `checkpoint_every` steps the trainable leaves, the optimiser state, the
step and the metrics so far are written to `checkpoint.eqx` atomically (a JSON header
line, then `eqx.tree_serialise_leaves`).
Restarting the same command resumes from that checkpoint; because chunks always start on
multiples of `log_every` and the compiled chunk is the same program, a resumed run ends
with bit-identical parameters and metrics (tested).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from .._base import Array, Int, PyTree, atomic_path, check_output_dir, write_json
from ._config import ModularConfig, pretrain_fingerprint
from ._data import make_split
from ._model import ModularTransformer, trainable_filter

FORMAT = "jaxattn-modular/1"


# -- files ------------------------------------------------------------------------
def save_tree(path: str, header: dict[str, Any], tree) -> None:
    """One file: a JSON header line, then the leaves (`eqx.tree_serialise_leaves`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(json.dumps(dict(header, format=FORMAT)).encode() + b"\n")
        eqx.tree_serialise_leaves(fh, tree)


def read_header(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            line = fh.readline()
        header = json.loads(line)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a jaxattn modular checkpoint") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jaxattn modular checkpoint")
    return header


def load_tree(path: str, like):
    with open(path, "rb") as fh:
        fh.readline()
        try:
            return eqx.tree_deserialise_leaves(fh, like)
        except (ValueError, TypeError, RuntimeError, EOFError) as e:  # shape/dtype, truncated
            raise ValueError(
                f"checkpoint {path} does not fit this model ({type(e).__name__})"
            ) from None


def file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def check_fingerprint(path: str, kind: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Header of checkpoint `path`, or a one-line error if it belongs to another run."""
    header = read_header(path)
    if header.get("kind") != kind:
        raise ValueError(
            f"checkpoint {path} is a {header.get('kind')} checkpoint, not {kind}; use another --out"
        )
    old = header.get("fingerprint", {})
    for k in sorted(set(old) | set(fingerprint)):
        if old.get(k) != fingerprint.get(k):
            raise ValueError(
                f"checkpoint {path} is from another configuration ({k}: "
                f"{old.get(k)!r} there, {fingerprint.get(k)!r} now); use "
                f"another --out or remove it"
            )
    return header


def check_resume(
    out_dir: str, kind: str, fingerprint: dict[str, Any], steps: int, steps_name: str
) -> dict[str, Any] | None:
    """Header of `out_dir/checkpoint.eqx` if a run can resume from it (None if there is
    none); a one-line error if it belongs to another run or is already past `steps`
    (a resumed run cannot go back, and its summary would disagree with the config)."""
    ckpt = os.path.join(out_dir, "checkpoint.eqx")
    if not os.path.exists(ckpt):
        return None
    header = check_fingerprint(ckpt, kind, fingerprint)
    step = header.get("step")
    if type(step) is not int or not isinstance(header.get("metrics"), list):
        raise ValueError(f"{ckpt} is not a jaxattn modular checkpoint")
    if step > steps:
        raise ValueError(
            f"checkpoint {ckpt} is at step {step}, past {steps_name} = {steps}; raise "
            f"{steps_name} to at least {step} or use another --out"
        )
    return header


def _write_metrics(out_dir: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    with (
        atomic_path(os.path.join(out_dir, "metrics.csv")) as tmp,
        open(tmp, "w", encoding="utf-8") as fh,
    ):
        fh.write(buf.getvalue())
    write_json(os.path.join(out_dir, "metrics.json"), dict(extra, metrics=rows))


# -- optimiser and loss -------------------------------------------------------------
def adamw(
    lr: float,
    b1: float,
    b2: float,
    weight_decay: float,
    warmup: int,
    dtype: DTypeLike,
    *,
    schedule: str = "constant",
    total_steps: int | None = None,
    min_lr_frac: float = 0.05,
    clip: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW (optax) with a linear warm-up over `warmup` steps, then a constant `lr`
    (`schedule="constant"`), or optax's warm-up + cosine decay to `min_lr_frac · lr` at
    `total_steps` (`"cosine"`); `clip > 0` first clips the gradient to that global norm.

    The schedule returns the parameters' dtype so that float32 training works under
    strict dtype promotion with x64 enabled."""
    dt = jnp.dtype(dtype)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose constant or cosine")
    if schedule == "cosine" and (total_steps is None or total_steps <= warmup):
        raise ValueError("a cosine schedule needs total_steps > warmup")

    if schedule == "cosine":
        assert total_steps is not None  # checked above
        cosine = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, min_lr_frac * lr)
        return _with_clip(
            optax.adamw(
                lambda c: jnp.asarray(cosine(c), dt), b1=b1, b2=b2, weight_decay=weight_decay
            ),
            clip,
        )

    def sched(count):
        if warmup == 0:
            return jnp.asarray(lr, dt)
        frac = jnp.minimum(1, (count + 1).astype(dt) / warmup)
        return (lr * frac).astype(dt)

    return _with_clip(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay), clip)


def _with_clip(opt: optax.GradientTransformation, clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt


def meets_bar(row: dict, config: ModularConfig) -> bool:
    """Whether a pre-training metrics row meets the configured bar (test, train and
    all-pairs accuracy thresholds; a threshold of 0 is not required)."""
    return (
        row["test_acc"] >= config.target_acc
        and row["train_acc"] >= config.target_train_acc
        and row.get("all_acc", 1.0) >= config.target_all_acc
    )


def bar_text(config: ModularConfig) -> str:
    parts = [
        f"{k} acc ≥ {v}"
        for k, v in (
            ("test", config.target_acc),
            ("train", config.target_train_acc),
            ("all-pairs", config.target_all_acc),
        )
        if v > 0
    ]
    return ", ".join(parts) or "no bar"


def _logits(model, x):
    return jax.vmap(model)(x)


def cross_entropy(model, x, y):
    logits = _logits(model, x)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def evaluate(model, sets: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    """Loss and accuracy on each named `(inputs, labels)` set."""
    out = {}
    for name, (x, y) in sets.items():
        logits = _logits(model, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        out[f"{name}_loss"] = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
        out[f"{name}_acc"] = jnp.mean(
            (jnp.argmax(logits, axis=-1).astype(y.dtype) == y).astype(logits.dtype)
        )
    return out


def _chunk(params, static, opt_state, x, y, n: int, optimizer):
    """`n` full-batch optimiser steps in one `lax.scan`; returns the per-step losses."""

    def loss_fn(p):
        return cross_entropy(eqx.combine(p, static), x, y)

    def step(carry, _):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        # optax computes `decay ** count` (Python float ** int32), which strict promotion
        # (our tests) refuses; its own arithmetic runs under the standard rules.
        with jax.numpy_dtype_promotion("standard"):
            updates, s = optimizer.update(grads, s, p)
        return (eqx.apply_updates(p, updates), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), None, length=n)
    return params, opt_state, losses


# Frozen weights (`static`) are traced arguments, not constants folded into the program;
# `n` and the optimiser (functions) are static.
chunk_fn = eqx.filter_jit(_chunk)


# -- the loop -------------------------------------------------------------------------
_Model = TypeVar("_Model", bound=eqx.Module)


def train(
    model: _Model,
    filter_spec: Callable[[Any], bool] | PyTree[bool],
    optimizer: optax.GradientTransformation,
    *,
    train_set: tuple[Int[Array, "N 4"], Int[Array, " N"]],
    eval_sets: dict[str, tuple[Int[Array, "_M 4"], Int[Array, " _M"]]],
    steps: int,
    log_every: int,
    checkpoint_every: int,
    out_dir: str,
    kind: str,
    fingerprint: dict[str, Any],
    stop: Callable[[dict], bool] | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    steps_name: str = "steps",
) -> tuple[_Model, list[dict[str, Any]], dict[str, Any]]:
    """Train the `filter_spec` leaves of `model` full-batch; resume from `out_dir`.

    **Arguments:**

    - `model`, `filter_spec`: the model and the `eqx.partition` filter of its trainable
      leaves.
    - `optimizer`: an optax transformation (initialised on the trainable leaves only).
    - `train_set`: `(inputs (N, 4), labels (N,))`; `eval_sets`: name → `(inputs, labels)`.
    - `steps`: total number of steps (a resumed run continues up to it).
    - `log_every`: steps per jitted chunk and between metrics rows;
      `checkpoint_every`: a multiple of it.
    - `stop(row) -> bool`: end early after the first row where it is true (recorded
      as `stopped_at`; a stopped run is not continued on restart).
    - `on_log(step, row)`: called after each metrics row (and checkpoint).
    - `steps_name`: the config key of `steps`, for the error when a checkpoint is
      already past it (`check_resume`).

    **Returns:** `(model, rows, info)` with `info = {"step", "stopped_at", "resumed_from"}`.
    """
    params, static = eqx.partition(model, filter_spec)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    ckpt = os.path.join(out_dir, "checkpoint.eqx")
    rows: list[dict[str, Any]] = []
    step, stopped_at, resumed_from = 0, None, None
    header = check_resume(out_dir, kind, fingerprint, steps, steps_name)
    if header is not None:
        params, opt_state = load_tree(ckpt, (params, opt_state))
        step, rows, stopped_at = int(header["step"]), header["metrics"], header["stopped_at"]
        resumed_from = step
    extra = dict(extra or {}, kind=kind, fingerprint=fingerprint)
    ev = eqx.filter_jit(lambda p, st, sets: evaluate(eqx.combine(p, st), sets))
    x, y = train_set

    def record(p, s):
        row = {"step": s} | {k: float(v) for k, v in ev(p, static, eval_sets).items()}
        rows.append(row)
        return row

    def checkpoint():
        save_tree(
            ckpt,
            {
                "kind": kind,
                "fingerprint": fingerprint,
                "step": step,
                "metrics": rows,
                "stopped_at": stopped_at,
            },
            (params, opt_state),
        )

    if not rows:
        row = record(params, 0)
        if stop is not None and stop(row):
            stopped_at = 0
        checkpoint()
        _write_metrics(out_dir, rows, extra)
    bar = _progress_bar(steps, min(step, steps), progress, kind)
    try:
        while stopped_at is None and step < steps:
            n = min(log_every, steps - step)
            params, opt_state, _losses = chunk_fn(params, static, opt_state, x, y, n, optimizer)
            step += n
            row = record(params, step)
            if stop is not None and stop(row):
                stopped_at = step
            if step % checkpoint_every == 0 or step >= steps or stopped_at is not None:
                # The metrics files are rewritten whole, so only as often as the
                # checkpoint (writing them at every log made a run quadratic in logs).
                _write_metrics(out_dir, rows, extra)
                checkpoint()
            bar.update(n)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("acc")})
            if on_log is not None:
                on_log(step, row)
    finally:
        bar.close()
    _write_metrics(out_dir, rows, dict(extra, stopped_at=stopped_at))
    info = {"step": step, "stopped_at": stopped_at, "resumed_from": resumed_from}
    return eqx.combine(params, static), rows, info


class _TextBar:
    """Fallback when tqdm (a declared dependency) is missing: one line per update."""

    def __init__(self, total, initial, desc):
        self.n, self.total, self.desc = initial, total, desc

    def update(self, n):
        self.n += n

    def set_postfix(self, d):
        print(
            f"{self.desc}: {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in d.items()),
            flush=True,
        )

    def close(self):
        pass


class _NoBar(_TextBar):
    def set_postfix(self, d):
        pass


def _progress_bar(total, initial, show, desc):
    if not show:
        return _NoBar(total, initial, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, leave=False)


def as_device_sets(split: dict[str, np.ndarray], names) -> dict[str, tuple]:
    return {n: (jnp.asarray(split[f"x_{n}"]), jnp.asarray(split[f"y_{n}"])) for n in names}


def steps_to(rows, key: str, threshold: float):
    """First logged step with `row[key] ≥ threshold` (None if never)."""
    for r in rows:
        if r[key] >= threshold:
            return r["step"]
    return None


def pretrain_optimizer(config: ModularConfig) -> optax.GradientTransformation:
    """The pre-training optimiser that `config` describes (AdamW, warm-up, schedule over
    `max_steps`, clipping)."""
    return adamw(
        config.lr,
        config.beta1,
        config.beta2,
        config.weight_decay,
        config.warmup,
        config.dtype,
        schedule=config.schedule,
        total_steps=config.max_steps,
        min_lr_frac=config.min_lr_frac,
        clip=config.clip,
    )


def pretrain(
    config: ModularConfig,
    out_dir: str,
    *,
    progress: bool = False,
    on_log: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[ModularTransformer, list[dict[str, Any]], dict[str, Any]]:
    """Pre-train on `(x + y) mod p` for `max_steps`, or until the metrics meet the bar
    (`meets_bar`) when `stop_at_target`. Writes `metrics.{csv,json}`, `checkpoint.eqx`,
    `model.eqx`, `summary.json` in `out_dir`; resumes from `checkpoint.eqx` if present.
    `summary["steps_to_target"]` is the first logged step that met the bar (None if none
    did) and `summary["reached_target"]` whether the final model meets it."""
    check_output_dir(out_dir)
    model = ModularTransformer(config, key=jax.random.key(config.seed))
    split = make_split(config.p, "+", config.train_frac, config.seed)
    names = ("train", "test", "all") if config.target_all_acc > 0 else ("train", "test")
    sets = as_device_sets(split, names)
    opt = pretrain_optimizer(config)
    fp = pretrain_fingerprint(config)
    model, rows, info = train(
        model,
        trainable_filter(model, lora_only=False),
        opt,
        train_set=sets["train"],
        eval_sets=sets,
        steps=config.max_steps,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        out_dir=out_dir,
        kind="pretrain",
        fingerprint=fp,
        stop=(lambda r: meets_bar(r, config)) if config.stop_at_target else None,
        on_log=on_log,
        progress=progress,
        steps_name="max_steps",
    )
    first = next((r["step"] for r in rows if meets_bar(r, config)), None)
    summary = {
        "config": config.as_dict(),
        "steps": info["step"],
        "steps_to_target": first,
        "reached_target": meets_bar(rows[-1], config),
        "final": rows[-1],
        "resumed_from": info["resumed_from"],
    }
    save_tree(
        os.path.join(out_dir, "model.eqx"),
        {"kind": "model", "fingerprint": fp, "step": info["step"]},
        model,
    )
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return model, rows, summary


def check_pretrained(config: ModularConfig, path: str) -> None:
    """A one-line error unless `path` holds a pre-trained model of `config`."""
    if not os.path.exists(path):
        raise ValueError(
            f"no pre-trained model at {path}; run `jaxattn modular pretrain` "
            f"with the same --out first"
        )
    check_fingerprint(path, "model", pretrain_fingerprint(config))


def load_pretrained(config: ModularConfig, path: str) -> ModularTransformer:
    """The pre-trained model in `path` (`model.eqx`), checked against `config`."""
    check_pretrained(config, path)
    like = ModularTransformer(config, key=jax.random.key(0))
    return load_tree(path, like)
