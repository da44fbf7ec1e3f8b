"""The two tables a sweep is made of: its grid axes and its summaries.

An axis says how its values are checked, which part of a point it changes (the initial
tokens, the LoRA, or a leaf of the field), what the spec must hold for it, and whether it
keys the shared unperturbed reference runs. A summary says how it is computed from a
point's tokens (and its reference run's), how many numbers it saves per save time, and
whether it needs the reference run. The plan (`grid.py`), the inputs of each point and the
compiled program (`runner.py`) read these rows; adding an axis or a summary is one row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._analysis import cluster_count, divergence, hausdorff, pairwise_distances
from .._base import SEED_MAX
from .._model import FAMILY_TARGETS, NORMS
from .chunks import SweepError


# ------------------------------------------------------------------------ value checks
def _seeds(key: str, values: list) -> list:
    if not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise SweepError(f"grid {key} values must be integers ≥ 0")
    if any(v > SEED_MAX for v in values):
        raise SweepError(f"grid {key} values must be ≤ 2**63 − 1")
    return [int(v) for v in values]


def _numbers(*, minimum: float | None = None, positive: bool = False):
    def check(key: str, values: list) -> list:
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            raise SweepError(f"grid {key} values must be finite numbers")
        if positive and any(v <= 0 for v in values):
            raise SweepError(f"grid {key} values must be > 0")
        if minimum is not None and any(v < minimum for v in values):
            raise SweepError(f"grid {key} values must be ≥ {minimum:g}")
        return [float(v) for v in values]

    return check


def _choices(options: tuple[str, ...]):
    def check(key: str, values: list) -> list:
        bad = [v for v in values if v not in options]
        if bad:
            raise SweepError(
                f"grid {key} values must be one of {', '.join(options)}, got {bad[0]!r}"
            )
        return list(values)

    return check


_targets = _choices(FAMILY_TARGETS)  # a classic field's Q, K, V: checked by `parse_sweep`


def _indices(key: str, values: list) -> list:
    if not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise SweepError(f"grid {key} values must be integers ≥ 0")
    return [int(v) for v in values]


# ---------------------------------------------------------------------------- the axes
@dataclasses.dataclass(frozen=True)
class Axis:
    """One row of the grid-axis table.

    - `key`: the spec key it sets (`section.key`, or a top-level key).
    - `check(key, values) -> values`: the values, checked (`SweepError`) and normalised.
    - `part`: what of a point it changes: `"init"` (the initial tokens, drawn from the
      spec's `[init]` with this value), `"lora"` (the LoRA, built from `[lora]` with this
      value), `"field"` (the field leaf named `leaf`, set per point) or `"family"` (a key
      of a model-family spec: each point's field is built from its spec).
    - `requires`: what the spec must hold: `"lora"` (a `[lora]` table), `"random lora"`
      (a `[lora]` drawn from rank/norm/seed, not explicit A, B), `"random init"` (an
      `[init]` drawn from kind/n/d, not explicit x0) or `"family"` (a model-family spec;
      `"family lora"`: and a `[lora]` table).
    - `keys_reference` (derived): the unperturbed reference runs differ along this axis.
      The reference is the point's run without its LoRA, so every axis but a LoRA's
      keys it.
    """

    key: str
    check: Callable[[str, list], list]
    part: str
    leaf: str | None = None
    requires: str | None = None

    @property
    def keys_reference(self) -> bool:
        return self.part != "lora"

    @property
    def section(self) -> str | None:
        return self.key.split(".", 1)[0] if "." in self.key else None

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1] if "." in self.key else self.key


# fmt: off
AXES: dict[str, Axis] = {a.key: a for a in (
    #     key            check                    part     leaf    requires
    Axis("beta",        _numbers(minimum=0.0),   "field", "beta", None),
    Axis("init.seed",   _seeds,                  "init",  None,   "random init"),
    Axis("init.scale",  _numbers(positive=True), "init",  None,   "random init"),
    Axis("lora.norm",   _numbers(minimum=0.0),   "lora",  None,   "lora"),
    Axis("lora.seed",   _seeds,                  "lora",  None,   "random lora"),
    Axis("lora.target", _targets,                "lora",  None,   "lora"),
    Axis("lora.alpha",  _numbers(positive=True), "lora",  None,   "lora"),
    Axis("lora.head",   _indices,                "lora",  None,   "family lora"),
    Axis("lora.layer",  _indices,                "lora",  None,   "family lora"),
    Axis("norm",        _choices(NORMS),         "family", None,  "family"),
    Axis("alibi",       _numbers(minimum=0.0),   "family", None,  "family"),
    Axis("alpha",       _numbers(positive=True), "family", None,  "family"),
)}
# fmt: on


# ----------------------------------------------------------------------- the summaries
@dataclasses.dataclass(frozen=True)
class Summary:
    """One row of the summary table.

    - `fn(x, ref, ctx) -> array`: the value at one save time from the point's tokens `x
      (n, d)` and, when `needs_reference`, its unperturbed run's `ref (n, d)` (else None);
      `ctx` holds the sweep's `threshold` and `sphere`.
    - `size(n, d)`: the numbers it saves per point and save time.
    """

    name: str
    fn: Callable[[Any, Any, Any], Any]
    size: Callable[[int, int], int]
    needs_reference: bool = False


@dataclasses.dataclass(frozen=True)
class SummaryContext:
    threshold: float
    sphere: bool


SUMMARIES: dict[str, Summary] = {
    s.name: s
    for s in (
        Summary("divergence", lambda x, ref, c: divergence(ref, x), lambda n, d: 1, True),
        Summary("hausdorff", lambda x, ref, c: hausdorff(x, ref), lambda n, d: 1, True),
        # float: diffrax pre-fills outputs with inf, which an int cannot hold
        Summary(
            "clusters",
            lambda x, ref, c: cluster_count(x, c.threshold, sphere=c.sphere).astype(x.dtype),
            lambda n, d: 1,
        ),
        # the unperturbed run's clusters, beside the point's own (an ε plot needs both)
        Summary(
            "clusters_reference",
            lambda x, ref, c: cluster_count(ref, c.threshold, sphere=c.sphere).astype(x.dtype),
            lambda n, d: 1,
            True,
        ),
        Summary("diameter", lambda x, ref, c: jnp.max(pairwise_distances(x)), lambda n, d: 1),
        Summary("mean", lambda x, ref, c: jnp.mean(x, axis=0), lambda n, d: d),
        Summary("tokens", lambda x, ref, c: x, lambda n, d: n * d),
    )
}
NEEDS_REFERENCE = tuple(k for k, s in SUMMARIES.items() if s.needs_reference)


def summary_fn(names, threshold: float, sphere: bool, pair: bool):
    """diffrax's `fn(t, y, args)` saving the summaries `names`: `y` is a point's tokens,
    or with `pair` its (reference, run) tokens stacked."""
    ctx = SummaryContext(threshold, sphere)
    rows = [SUMMARIES[k] for k in names]

    def fn(t, y, args):
        x, ref = (y[1], y[0]) if pair else (y, None)
        return {s.name: s.fn(x, ref, ctx) for s in rows}

    return fn
