"""A sweep's plan: a simulation spec (`_spec.py`) plus a `[grid]` section (the axes and
their values) and a `[sweep]` section (chunking and summaries), parsed and checked before
anything runs (`parse_sweep` → `SweepPlan`)."""

from __future__ import annotations

import copy
import math

import equinox as eqx
import numpy as np

from .._base import SEED_MAX, TARGETS, check_int, check_memory, check_positive
from .._model import use_blockwise
from .._spec import SpecError, parse_spec
from .chunks import SweepError

DEFAULT_CHUNK = 64
MAX_DEFAULT_BATCH = 256
GRID_KEYS = ("beta", "init.seed", "lora.norm", "lora.seed", "lora.target", "lora.alpha")
SWEEP_KEYS = {"chunk", "batch", "summaries", "save_points", "cluster_threshold"}
SUMMARIES = ("divergence", "hausdorff", "clusters", "diameter", "mean", "tokens")
NEEDS_REFERENCE = ("divergence", "hausdorff")


def _expand(key: str, value) -> list:
    """A grid entry: a list, or `{range = N | [start, stop]}`, `{linspace|geomspace =
    [a, b, num]}`."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((kind, arg),) = value.items()
        if kind == "range":
            if isinstance(arg, int) and not isinstance(arg, bool):
                return list(range(_axis_len(key, arg)))
            if (
                isinstance(arg, list)
                and len(arg) == 2
                and all(isinstance(a, int) and not isinstance(a, bool) for a in arg)
            ):
                _axis_len(key, arg[1] - arg[0])
                return list(range(arg[0], arg[1]))
        elif kind in ("linspace", "geomspace"):
            ok = (
                isinstance(arg, list)
                and len(arg) == 3
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arg)
                and isinstance(arg[2], int)
                and arg[2] >= 0
            )
            if ok:
                a, b, num = arg
                _axis_len(key, num)
                if kind == "geomspace" and (a <= 0 or b <= 0):
                    raise SweepError(f"grid {key}: geomspace needs positive end points")
                f = np.linspace if kind == "linspace" else np.geomspace
                return [float(v) for v in f(a, b, num)]
        raise SweepError(
            f"grid {key}: {kind} = {arg!r} is not valid (range = N or "
            "[start, stop]; linspace/geomspace = [a, b, num])"
        )
    raise SweepError(
        f"grid {key} must be a list of values or a table like {{range = 8}}, got {value!r}"
    )


# One grid axis holds at most this many values (each becomes a Python object, and the
# sweep's arrays grow with the product of the axes; the memory check then applies).
MAX_AXIS_VALUES = 10**7


def _axis_len(key: str, count: int) -> int:
    if count > MAX_AXIS_VALUES:
        raise SweepError(
            f"grid {key} asks for {count} values, over the limit of {MAX_AXIS_VALUES} per axis"
        )
    return count


def _check_values(key: str, values: list) -> list:
    if not values:
        raise SweepError(f"the grid has no points: grid {key} is empty")
    if key in ("init.seed", "lora.seed"):
        if not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise SweepError(f"grid {key} values must be integers ≥ 0")
        if any(v > SEED_MAX for v in values):
            raise SweepError(f"grid {key} values must be ≤ 2**63 − 1")
        return [int(v) for v in values]
    if key == "lora.target":
        bad = [v for v in values if v not in TARGETS]
        if bad:
            raise SweepError(f"grid lora.target values must be Q, K or V, got {bad[0]!r}")
        return list(values)
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise SweepError(f"grid {key} values must be finite numbers")
    lo = {"beta": 0.0, "lora.norm": 0.0, "lora.alpha": None}[key]
    if key == "lora.alpha" and any(v <= 0 for v in values):
        raise SweepError("grid lora.alpha values must be > 0")
    if lo is not None and any(v < lo for v in values):
        raise SweepError(f"grid {key} values must be ≥ 0")
    return [float(v) for v in values]


def _substitute(spec: dict, assignment: dict) -> dict:
    out = copy.deepcopy(spec)
    for key, value in assignment.items():
        if "." in key:
            sec, sub = key.split(".", 1)
            out[sec][sub] = value
        else:
            out[key] = value
    return out


class SweepPlan(eqx.Module):
    """A parsed sweep spec: grid axes, options, and the pieces to build any point."""

    spec: dict = eqx.field(static=True)
    axes: dict = eqx.field(static=True)
    options: dict = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.axes.values())

    @property
    def n_points(self) -> int:
        return int(np.prod(self.shape))

    def assignment(self, p: int) -> dict:
        """The grid values of point `p` (C order over the axes as written)."""
        idx = np.unravel_index(p, self.shape)
        return {k: v[i] for (k, v), i in zip(self.axes.items(), idx)}

    def point_spec(self, p: int) -> dict:
        """The plain simulation spec of point `p` (what `jaxattn simulate` would run)."""
        return _substitute(self.spec, self.assignment(p))

    def identity(self) -> dict:
        return {
            "kind": "jaxattn-sweep",
            "spec": self.spec,
            "grid": self.axes,
            "options": self.options,
        }


def parse_sweep(raw: dict) -> SweepPlan:
    """Validate a sweep spec: a simulation spec plus `[grid]` (and optional `[sweep]`)."""
    if not isinstance(raw, dict):
        raise SweepError("a sweep spec must be a table/object")
    spec = {k: v for k, v in raw.items() if k not in ("grid", "sweep")}
    grid = raw.get("grid")
    if grid is None:
        raise SweepError(
            "the spec has no [grid] section: nothing to sweep (use "
            "`jaxattn simulate` for a single run)"
        )
    if not isinstance(grid, dict):
        raise SweepError(f"[grid] must be a table/object, got {type(grid).__name__}")
    if not grid:
        raise SweepError("the grid has no points: [grid] is empty")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise SweepError(f"unknown grid key {unknown[0]!r} (allowed: {', '.join(GRID_KEYS)})")
    axes = {k: _check_values(k, _expand(k, v)) for k, v in grid.items()}

    # Compatibility of grid and spec.
    init_table = spec.get("init")
    init = init_table if isinstance(init_table, dict) else {}
    if "init.seed" in axes and "x0" in init:
        raise SweepError(
            "grid init.seed needs a random [init] (kind, n, d), but the spec gives explicit x0"
        )
    lora_keys = [k for k in axes if k.startswith("lora.")]
    if lora_keys:
        lo = spec.get("lora")
        if not isinstance(lo, dict):
            raise SweepError(f"grid {lora_keys[0]} needs a [lora] section in the spec")
        if "A" in lo or "B" in lo:
            bad = [k for k in lora_keys if k in ("lora.norm", "lora.seed")]
            if bad:
                raise SweepError(
                    f"grid {bad[0]} needs a random [lora] (rank, norm, seed), "
                    "but the spec gives explicit A and B"
                )
    for key in axes:
        sec, _, sub = key.partition(".")
        if sub and sub in (spec.get(sec) or {}):
            raise SweepError(f"{key} is given both in [{sec}] and in [grid]; keep one")
        if not sub and key in spec:
            raise SweepError(f"{key} is given both at the top level and in [grid]; keep one")
    if "init.seed" in axes:
        spec.setdefault("init", {})

    opts_raw = raw.get("sweep", {})
    if not isinstance(opts_raw, dict):
        raise SweepError("[sweep] must be a table/object")
    extra = sorted(set(opts_raw) - SWEEP_KEYS)
    if extra:
        raise SweepError(
            f"unknown key in [sweep]: {extra[0]} (allowed: {', '.join(sorted(SWEEP_KEYS))})"
        )
    has_lora = "lora" in spec
    default_summaries = ["divergence", "clusters"] if has_lora else ["clusters", "diameter"]
    summaries = opts_raw.get("summaries", default_summaries)
    if (
        not isinstance(summaries, list)
        or not summaries
        or not all(isinstance(s, str) for s in summaries)
    ):
        raise SweepError(
            f"sweep summaries must be a non-empty list of names from {', '.join(SUMMARIES)}"
        )
    for s in summaries:
        if s not in SUMMARIES:
            raise SweepError(f"unknown summary {s!r} (choose from {', '.join(SUMMARIES)})")
    if any(s in NEEDS_REFERENCE for s in summaries) and not has_lora:
        raise SweepError(
            "summaries divergence/hausdorff compare with the unperturbed run "
            "and need a [lora] section"
        )
    chunk = _pos_int(opts_raw.get("chunk", DEFAULT_CHUNK), "sweep chunk")
    options = {
        "chunk": chunk,
        # Default: groups as wide as the chunk, up to 256 points (wider vmaps amortise
        # XLA's per-operation cost for small systems; 64 for the default chunk).
        "batch": _pos_int(opts_raw.get("batch", min(chunk, MAX_DEFAULT_BATCH)), "sweep batch"),
        "summaries": list(dict.fromkeys(summaries)),
        "save_points": _pos_int(opts_raw.get("save_points", 101), "sweep save_points", 2),
        "cluster_threshold": _pos_float(
            opts_raw.get("cluster_threshold", 0.1), "sweep cluster_threshold"
        ),
    }
    plan = SweepPlan(spec=spec, axes=axes, options=options)
    # Every point must be a valid simulation spec: check the first one fully (the grid
    # values were checked above, so the others differ only in valid values).
    try:
        sim = parse_spec(plan.point_spec(0))
    except SpecError as e:
        raise SweepError(f"the spec with the grid's first point is invalid: {e}") from None
    if not sim.t1 > 0:
        raise SweepError("solve t1 must be > 0 in a sweep (nothing to integrate)")
    _check_sweep_memory(plan, sim)
    return plan


def _check_sweep_memory(plan: SweepPlan, sim) -> None:
    """The assembled result (every point × save time × summary), and one chunk's saved
    values, must fit before anything runs (`sim`: the first point, parsed)."""
    n, d = (int(s) for s in sim.x0.shape)
    per = {
        "divergence": 1,
        "hausdorff": 1,
        "clusters": 1,
        "diameter": 1,
        "mean": d,
        "tokens": n * d,
    }
    values = sum(per[s] for s in plan.options["summaries"])
    T = plan.options["save_points"]
    try:
        check_memory(
            8.0 * plan.n_points * T * values * 2,
            f"the sweep's results ({plan.n_points} points × {T} save points)",
        )
        attn = 0 if use_blockwise(sim.field.kernel, n, n) else 4 * n * n
        check_memory(
            8.0 * min(plan.n_points, plan.options["chunk"]) * (T * (values + n * d) + attn),
            f"one chunk of {plan.options['chunk']} points with n = {n} tokens",
        )
    except ValueError as e:
        raise SweepError(str(e)) from None


def _pos_int(v, name, minimum=1):
    try:
        return check_int(v, name, minimum)
    except ValueError as e:
        raise SweepError(str(e)) from None


def _pos_float(v, name):
    try:
        return check_positive(v, name)
    except ValueError as e:
        raise SweepError(str(e)) from None
