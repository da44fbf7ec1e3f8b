"""Configuration of the modular-arithmetic experiments and its validation (background:
docs/theory.md, 'Modular-arithmetic forgetting').

One frozen dataclass holds every hyper-parameter; `load_config` reads TOML/JSON, refuses
unknown keys and bad values with a one-line `ValueError`, and `quick=True` swaps in the
small size used by tests and the notebook. Defaults are the paper's size (p = 113,
d_model = 128, 60 % split, AdamW lr 1e-3, betas (0.9, 0.98), weight decay 1.0; LoRA on V,
r = 16, α = 8, lr 1e-4).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable
from typing import Any

from .._base import check_int, check_memory, check_number, check_seed, coerce

TARGETS = ("Q", "K", "V", "O")

# Fields whose change makes a pre-training checkpoint incompatible.
MODEL_KEYS = ("p", "d_model", "depth", "heads", "layernorm", "tied", "fused", "dtype")
PRETRAIN_KEYS = MODEL_KEYS + (
    "train_frac",
    "seed",
    "lr",
    "beta1",
    "beta2",
    "weight_decay",
    "warmup",
    "schedule",
    "min_lr_frac",
    "clip",
    "log_every",
    "checkpoint_every",
)
FINETUNE_KEYS = (
    "rank",
    "alpha",
    "targets",
    "ft_lr",
    "ft_weight_decay",
    "ft_clip",
    "ft_log_every",
    "ft_checkpoint_every",
    "seed",
    "train_frac",
)
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class ModularConfig:
    # data
    p: int = 113
    train_frac: float = 0.6
    seed: int = 0
    # model
    d_model: int = 128
    depth: int = 1
    heads: int = 1
    layernorm: bool = False
    tied: bool = True
    fused: bool = True  # one head: layer from A = QᵀK and W_OV = O·V (2 matmuls, not 4)
    dtype: str = "float32"
    # pre-training (full-batch AdamW)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 1.0
    warmup: int = 10
    schedule: str = "constant"  # after the warm-up: "constant" or "cosine" (to min_lr_frac·lr)
    min_lr_frac: float = 0.05
    clip: float = 0.0  # global-norm gradient clipping (0: off)
    max_steps: int = 30_000
    # The pre-training bar: test accuracy ≥ target_acc, training accuracy ≥
    # target_train_acc and accuracy on all p² pairs ≥ target_all_acc (0: not required).
    target_acc: float = 0.95
    target_train_acc: float = 0.0
    target_all_acc: float = 0.0
    stop_at_target: bool = True  # end pre-training at the first log that meets the bar
    log_every: int = 100
    checkpoint_every: int = 1000
    # LoRA fine-tuning on subtraction
    rank: int = 16
    alpha: float = 8.0
    targets: tuple[str, ...] = ("V",)
    ft_lr: float = 1e-4
    ft_weight_decay: float = 0.01
    ft_clip: float = 0.0
    ft_steps: int = 2000
    ft_log_every: int = 10
    ft_checkpoint_every: int = 500
    # forgetting is read where the subtraction test accuracy first reaches these levels
    sub_levels: tuple[float, ...] = (0.5, 0.9)
    # study
    depths: tuple[int, ...] = (1, 2, 4, 6, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    ranks: tuple[int, ...] = (1, 4, 16)
    rank_depth: int = 4
    particle_prompts: int = 64
    # evidence for a depth that cannot fit the task (empty: not run)
    capacity_depth: int = 1
    capacity_lrs: tuple[float, ...] = ()
    capacity_widths: tuple[int, ...] = ()

    def __post_init__(self):
        validate(self)

    def replace(self, **kw) -> ModularConfig:
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in _TUPLES:
            d[k] = list(d[k])
        return d

    def subset(self, keys: Iterable[str]) -> dict[str, Any]:
        d = self.as_dict()
        return {k: d[k] for k in keys}


QUICK = {
    "p": 11,
    "d_model": 32,
    "max_steps": 600,
    "log_every": 50,
    "checkpoint_every": 200,
    "ft_steps": 200,
    "ft_log_every": 10,
    "ft_checkpoint_every": 100,
    "depths": (1, 2),
    "seeds": (0, 1),
    "ranks": (1, 4),
    "rank_depth": 2,
    "rank": 4,
    "alpha": 2.0,
    "particle_prompts": 16,
    "lr": 3e-3,
    "ft_lr": 1e-3,
    "train_frac": 0.8,
    "schedule": "cosine",
    "warmup": 50,
    "clip": 1.0,
    "stop_at_target": False,
    "target_acc": 0.0,
    "target_train_acc": 0.9,
    "target_all_acc": 0.8,
    "targets": ("Q", "K", "V", "O"),
}


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    k = 2
    while k * k <= n:
        if n % k == 0:
            return False
        k += 1
    return True


# Config values come from a file: a wrong type is a wrong value there, so ValueError
# (one line, exit 2) like every other config mistake.
def _int(v, name, lo=None):
    return check_int(v, name, -(2**63) if lo is None else lo)


def _num(v, name, *, pos=True, allow_zero=False):
    v = check_number(v, name)
    if pos and (v < 0 or (v == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'≥' if allow_zero else '>'} 0, got {v!r}")
    return v


def validate(c: ModularConfig) -> None:
    _int(c.p, "p")
    if c.p < 5 or not is_prime(c.p):
        raise ValueError(f"p must be a prime ≥ 5, got {c.p}")
    _num(c.train_frac, "train_frac")
    if not 0 < c.train_frac < 1:
        raise ValueError(f"train_frac must be in (0, 1), got {c.train_frac}")
    if round(c.train_frac * c.p * c.p) < 1 or round(c.train_frac * c.p * c.p) >= c.p * c.p:
        raise ValueError(f"train_frac {c.train_frac} leaves an empty train or test set")
    check_seed(c.seed, "seed")
    _int(c.d_model, "d_model", 1)
    _int(c.depth, "depth", 1)
    _int(c.heads, "heads", 1)
    if c.d_model % c.heads:
        raise ValueError(f"heads ({c.heads}) must divide d_model ({c.d_model})")
    for name in ("layernorm", "tied", "fused", "stop_at_target"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r}")
    if c.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {c.dtype!r}")
    for name in ("lr", "ft_lr", "alpha"):
        _num(getattr(c, name), name)
    for name in ("weight_decay", "ft_weight_decay"):
        _num(getattr(c, name), name, allow_zero=True)
    for name in ("beta1", "beta2"):
        v = _num(getattr(c, name), name, allow_zero=True)
        if v >= 1:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    _int(c.warmup, "warmup", 0)
    if c.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {c.schedule!r}")
    _num(c.min_lr_frac, "min_lr_frac", allow_zero=True)
    if c.min_lr_frac > 1:
        raise ValueError(f"min_lr_frac must be in [0, 1], got {c.min_lr_frac}")
    for name in ("clip", "ft_clip"):
        _num(getattr(c, name), name, allow_zero=True)
    for name in (
        "max_steps",
        "ft_steps",
        "log_every",
        "checkpoint_every",
        "ft_log_every",
        "ft_checkpoint_every",
        "particle_prompts",
    ):
        _int(getattr(c, name), name, 1)
    for every, log in (("checkpoint_every", "log_every"), ("ft_checkpoint_every", "ft_log_every")):
        if getattr(c, every) % getattr(c, log):
            raise ValueError(
                f"{every} ({getattr(c, every)}) must be a multiple of {log} ({getattr(c, log)})"
            )
    for name in ("target_acc", "target_train_acc", "target_all_acc"):
        v = _num(getattr(c, name), name, allow_zero=True)
        if v > 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    _int(c.rank, "rank", 1)
    if not c.targets:
        raise ValueError("targets must name at least one of Q, K, V, O")
    for t in c.targets:
        if t not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose among Q, K, V, O")
    if len(set(c.targets)) != len(c.targets):
        raise ValueError(f"LoRA targets repeat: {list(c.targets)}")
    for r in (c.rank,) + tuple(c.ranks):
        _int(r, "rank", 1)
        if r > c.d_model:
            raise ValueError(f"LoRA rank {r} exceeds d_model = {c.d_model}")
    for d in tuple(c.depths) + (c.rank_depth,):
        _int(d, "depth", 1)
    for s in c.seeds:
        check_seed(s, "seed")
    for v in c.sub_levels:
        _num(v, "sub_levels")
        if v > 1:
            raise ValueError(f"sub_levels must be accuracies in (0, 1], got {v}")
    _int(c.capacity_depth, "capacity_depth", 1)
    for v in c.capacity_lrs:
        _num(v, "capacity_lrs")
    for v in c.capacity_widths:
        _int(v, "capacity_widths", 1)
        if v % c.heads:
            raise ValueError(f"heads ({c.heads}) must divide capacity width {v}")
    if not c.depths or not c.seeds or not c.ranks:
        raise ValueError("depths, seeds and ranks must be non-empty lists")
    if c.schedule == "cosine" and c.max_steps <= c.warmup:
        raise ValueError(f"a cosine schedule needs max_steps ({c.max_steps}) > warmup ({c.warmup})")
    check_memory(training_bytes(c), f"full-batch training at p = {c.p}, d_model = {c.d_model}")


def training_bytes(c: ModularConfig) -> float:
    """Estimated peak memory of full-batch pre-training: the logits of all p² pairs over
    the p + 3 tokens with their gradients (about three copies), the activations of every
    layer, and five copies of the weights (parameters, gradients, the two AdamW moments,
    the update), 4·d_model² per block plus the embeddings."""
    itemsize = 8 if c.dtype == "float64" else 4
    pairs = c.p * c.p
    blocks = 1 if c.tied else c.depth
    weights = 4.0 * c.d_model**2 * blocks + (2 * c.p + 7) * c.d_model
    return itemsize * (pairs * (3.0 * (c.p + 3) + 4 * c.d_model * (c.depth + 2)) + 5 * weights)


def pretrain_fingerprint(c: ModularConfig) -> dict[str, Any]:
    """What a pre-training checkpoint must agree on to be resumed: the model and the
    optimiser, and with a cosine schedule also `max_steps` (the decay spans it, so a
    different value is a different run from step 0)."""
    keys = PRETRAIN_KEYS + (("max_steps",) if c.schedule == "cosine" else ())
    return c.subset(keys)


_TUPLES = ("targets", "depths", "seeds", "ranks", "capacity_lrs", "capacity_widths", "sub_levels")


def make_config(
    raw: dict[str, Any] | None = None, *, quick: bool = False, **overrides
) -> ModularConfig:
    """Defaults, then the `--quick` size, then `raw` (from a file), then `overrides`."""
    hints = typing.get_type_hints(ModularConfig)
    merged: dict[str, Any] = dict(QUICK) if quick else {}
    for src in (raw or {}, overrides):
        for k, v in src.items():
            if k not in hints:
                raise ValueError(f"unknown config key {k!r}")
            if k in _TUPLES and isinstance(v, str):
                v = [v]
            # the configs' one type check (`coerce`); the value is kept as written (a
            # tuple for a list), since the checkpoints' names hash the values as given
            coerce(v, hints[k], k)
            merged[k] = tuple(v) if k in _TUPLES else v
    if "targets" in merged:
        merged["targets"] = tuple(t.upper() for t in merged["targets"])
    return ModularConfig(**merged)


def load_config(path: str | os.PathLike | None, *, quick: bool = False) -> ModularConfig:
    """Read a TOML/JSON config (flat keys of `ModularConfig`); `None` gives the defaults."""
    if path is None:
        return make_config(quick=quick)
    from .._spec import load_spec_file

    raw = load_spec_file(path)
    if "modular" in raw and isinstance(raw["modular"], dict) and len(raw) == 1:
        raw = raw["modular"]
    return make_config(raw, quick=quick)
