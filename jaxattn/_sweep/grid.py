"""A sweep's plan: a simulation spec (`_spec`) plus a `[grid]` section (the axes and their
values) and a `[sweep]` section (chunking and summaries), parsed and checked once, before
anything runs (`parse_sweep` → `SweepPlan`). The axes and summaries are rows of
`tables.py`."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from .._base import check_int, check_memory, check_positive, coerce, plain_hints
from .._model import SPHERE_NORMS, TARGETS, use_blockwise
from .._spec import FAMILY_KEYS, Simulation, SpecError, parse_spec
from .chunks import SweepError
from .tables import AXES, NEEDS_REFERENCE, SUMMARIES

DEFAULT_CHUNK = 64
MAX_DEFAULT_BATCH = 256
GRID_KEYS = tuple(AXES)


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
    return AXES[key].check(key, values)


def _check_requirements(key: str, spec: dict, family: bool = False) -> None:
    """What the spec must hold for an axis (its `requires`), and the axis's key given
    once (in the spec or in the grid)."""
    axis = AXES[key]
    init_table = spec.get("init")
    init = init_table if isinstance(init_table, dict) else {}
    lora = spec.get("lora")
    if axis.requires == "random init" and "x0" in init:
        raise SweepError(
            f"grid {key} needs a random [init] (kind, n, d), but the spec gives explicit x0"
        )
    if axis.requires in ("family", "family lora") and not family:
        raise SweepError(
            f"grid {key} needs a model-family spec (one of {', '.join(sorted(FAMILY_KEYS))})"
        )
    if axis.requires in ("lora", "random lora", "family lora") and not isinstance(lora, dict):
        raise SweepError(f"grid {key} needs a [lora] section in the spec")
    if axis.requires == "random lora" and isinstance(lora, dict) and ("A" in lora or "B" in lora):
        raise SweepError(
            f"grid {key} needs a random [lora] (rank, norm, seed), "
            "but the spec gives explicit A and B"
        )
    if axis.section is not None and axis.name in (spec.get(axis.section) or {}):
        raise SweepError(f"{key} is given both in [{axis.section}] and in [grid]; keep one")
    if axis.section is None and key in spec:
        raise SweepError(f"{key} is given both at the top level and in [grid]; keep one")


def substitute(spec: dict, assignment: Mapping[str, Any]) -> dict:
    """`spec` with the grid values `assignment` (`section.key` or top-level keys) set."""
    out = copy.deepcopy(spec)
    for key, value in assignment.items():
        if "." in key:
            sec, sub = key.split(".", 1)
            out.setdefault(sec, {})[sub] = value
        else:
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """The `[sweep]` section: points per chunk (the unit of work, resumption and output),
    points per vmapped group (`batch`; default the chunk, up to 256), the summaries saved,
    the number of save times and the clusters' distance threshold."""

    chunk: int = DEFAULT_CHUNK
    batch: int | None = None
    summaries: tuple[str, ...] | None = None
    save_points: int = 101
    cluster_threshold: float = 0.1

    @classmethod
    def from_table(cls, table: Any, *, has_lora: bool) -> SweepOptions:
        """`[sweep]` (plain data) → options; every value checked once (`SweepError`)."""
        if not isinstance(table, dict):
            raise SweepError("[sweep] must be a table/object")
        fields = [f.name for f in dataclasses.fields(cls)]
        extra = sorted(set(table) - set(fields))
        if extra:
            raise SweepError(
                f"unknown key in [sweep]: {extra[0]} (allowed: {', '.join(sorted(fields))})"
            )
        summaries = table.get("summaries")
        if summaries is not None and (
            not isinstance(summaries, list)
            or not summaries
            or not all(isinstance(s, str) for s in summaries)
        ):
            raise SweepError(
                f"sweep summaries must be a non-empty list of names from {', '.join(SUMMARIES)}"
            )
        hints = plain_hints(cls)
        try:
            opts = cls(**{k: coerce(v, hints[k], f"sweep {k}") for k, v in table.items()})
            chunk = check_int(opts.chunk, "sweep chunk", 1)
            batch = min(chunk, MAX_DEFAULT_BATCH) if opts.batch is None else opts.batch
            batch = check_int(batch, "sweep batch", 1)
            if batch > chunk:  # a group is part of one chunk (it was padded to `batch`)
                raise ValueError(f"sweep batch ({batch}) must be ≤ sweep chunk ({chunk})")
            check_int(opts.save_points, "sweep save_points", 2)
            check_positive(opts.cluster_threshold, "sweep cluster_threshold")
        except ValueError as e:
            raise SweepError(str(e)) from None
        names = opts.summaries
        if names is None:
            names = ("divergence", "clusters") if has_lora else ("clusters", "diameter")
        for s in names:
            if s not in SUMMARIES:
                raise SweepError(f"unknown summary {s!r} (choose from {', '.join(SUMMARIES)})")
        if any(SUMMARIES[s].needs_reference for s in names) and not has_lora:
            raise SweepError(
                f"summaries {'/'.join(NEEDS_REFERENCE)} compare with the unperturbed run "
                "and need a [lora] section"
            )
        return dataclasses.replace(
            opts, chunk=chunk, batch=batch, summaries=tuple(dict.fromkeys(names))
        )

    @property
    def pair(self) -> bool:
        """Some summary compares each point with its unperturbed reference run."""
        return any(s in NEEDS_REFERENCE for s in self.names)

    @property
    def names(self) -> tuple[str, ...]:
        assert self.summaries is not None  # set by from_table
        return self.summaries

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def as_dict(self) -> dict[str, Any]:
        """The options as plain data (what names the sweep, with `summaries` a list)."""
        return {
            "chunk": self.chunk,
            "batch": self.batch,
            "summaries": list(self.names),
            "save_points": self.save_points,
            "cluster_threshold": self.cluster_threshold,
        }


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A parsed sweep spec: the simulation spec, the grid axes (key → checked values, in
    the order written; points are their Cartesian product in C order), the `[sweep]`
    options and the first point, parsed (every other point differs from it only in
    values the axes checked)."""

    spec: dict
    axes: dict
    options: SweepOptions
    first: Simulation = dataclasses.field(repr=False, compare=False)
    #: `fn(**values) -> field` of a factory sweep (its `field.<name>` axes), else None
    factory: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)

    @property
    def per_point_fields(self) -> bool:
        """Each point's field is built on its own (a model-family spec or a factory),
        not set leaf by leaf into one template (the classic fields)."""
        return self.factory is not None or bool(FAMILY_KEYS & (set(self.spec) | set(self.axes)))

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
        return substitute(self.spec, self.assignment(p))

    def identity(self) -> dict:
        out = {
            "kind": "jaxattn-sweep",
            "spec": self.spec,
            "grid": self.axes,
            "options": self.options.as_dict(),
        }
        if self.factory is not None:
            # what can be known of a function: its name, and the field it gives at the
            # first point (its structure and the bytes of its weights)
            f = self.factory
            out["factory"] = f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', f)}"
            out["first_field"] = field_fingerprint(self.first.field)
        return out


def field_fingerprint(field) -> str:
    """A digest of a field: its tree structure (static fields included) and every leaf's
    dtype, shape and bytes."""
    h = hashlib.sha256(str(jax.tree.structure(field)).encode())
    for leaf in jax.tree.leaves(field):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def parse_sweep(raw: dict, factory: Callable[..., Any] | None = None) -> SweepPlan:
    """Validate a sweep spec: a simulation spec plus `[grid]` (and optional `[sweep]`).

    `factory`: a Python function `fn(**values) -> field` that builds each point's field
    (any field `simulate` takes) from the grid's `field.<name>` axes; the spec then
    holds only `[init]`, `[solve]` and `dtype` (the grid may also draw `init.*`)."""
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
    if factory is not None:
        return _parse_factory_sweep(raw, spec, grid, factory)
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise SweepError(f"unknown grid key {unknown[0]!r} (allowed: {', '.join(GRID_KEYS)})")
    axes = {k: _check_values(k, _expand(k, v)) for k, v in grid.items()}
    family = bool(FAMILY_KEYS & (set(spec) | set(axes)))
    for key in axes:
        _check_requirements(key, spec, family)
    if not family:
        bad = [t for t in axes.get("lora.target", []) if t not in TARGETS]
        if bad:
            raise SweepError(f"grid lora.target {bad[0]!r}: the classic fields have Q, K, V")
    norms = axes.get("norm", [])
    if norms and len({n in SPHERE_NORMS for n in norms}) > 1:
        raise SweepError(
            f"grid norm mixes schemes on the sphere ({', '.join(SPHERE_NORMS)}) with free "
            "ones: their tokens, summaries and solve options differ; sweep them separately"
        )
    options = SweepOptions.from_table(raw.get("sweep", {}), has_lora="lora" in spec)
    # Every point must be a valid simulation spec: parse the first one fully (the grid
    # values were checked above; a model-family point is parsed again when built).
    first_spec = substitute(spec, {k: v[0] for k, v in axes.items()})
    try:
        sim = parse_spec(first_spec)
    except SpecError as e:
        raise SweepError(f"the spec with the grid's first point is invalid: {e}") from None
    if not sim.t1 > 0:
        raise SweepError("solve t1 must be > 0 in a sweep (nothing to integrate)")
    plan = SweepPlan(spec=spec, axes=axes, options=options, first=sim)
    _check_sweep_memory(plan)
    return plan


#: what a factory sweep's spec may hold besides the grid and the options
FACTORY_SPEC_KEYS = ("init", "solve", "dtype")


def _parse_factory_sweep(raw: dict, spec: dict, grid: dict, factory) -> SweepPlan:
    if not callable(factory):
        raise SweepError(f"the field factory must be a function, got {type(factory).__name__}")
    extra = sorted(set(spec) - set(FACTORY_SPEC_KEYS))
    if extra:
        raise SweepError(
            f"with a field factory the spec holds only {', '.join(FACTORY_SPEC_KEYS)} "
            f"(the factory builds the field); remove {', '.join(extra)}"
        )
    axes = {}
    for k, v in grid.items():
        if k.startswith("field.") and len(k) > 6 and k[6:].isidentifier():
            values = _expand(k, v)
            if not values:
                raise SweepError(f"the grid has no points: grid {k} is empty")
            ok = (bool, int, float, str)
            if not all(isinstance(x, ok) and not (isinstance(x, float) and not np.isfinite(x))
                       for x in values):  # fmt: skip
                raise SweepError(f"grid {k} values must be finite numbers, strings or booleans")
            axes[k] = list(values)
        elif k in ("init.seed", "init.scale"):
            axes[k] = _check_values(k, _expand(k, v))
            _check_requirements(k, spec)
        else:
            raise SweepError(
                f"grid key {k!r}: a factory sweep's axes are field.<argument> (passed to "
                "the factory) and init.seed, init.scale"
            )
    if not any(k.startswith("field.") for k in axes):
        axes_names = ", ".join(axes)
        raise SweepError(
            f"a factory sweep needs a field.<argument> axis (the grid has {axes_names})"
        )
    first = {k[6:]: v[0] for k, v in axes.items() if k.startswith("field.")}
    field = build_factory_field(factory, first)
    # divergence/hausdorff (the defaults with a LoRA) compare with the run without it
    options = SweepOptions.from_table(raw.get("sweep", {}), has_lora=bool(field.loras))
    first_spec = substitute(spec, {k: v[0] for k, v in axes.items() if k.startswith("init.")})
    first_spec["dynamics"] = "sphere" if field.on_sphere else "plain"
    try:
        sim = parse_spec(first_spec)
    except SpecError as e:
        raise SweepError(f"the spec with the grid's first point is invalid: {e}") from None
    if int(sim.x0.shape[1]) != field.d:
        raise SweepError(
            f"the factory's field has d = {field.d} but [init] gives d = {sim.x0.shape[1]}"
        )
    if not sim.t1 > 0:
        raise SweepError("solve t1 must be > 0 in a sweep (nothing to integrate)")
    sim = dataclasses.replace(sim, field=field)
    plan = SweepPlan(spec=spec, axes=axes, options=options, first=sim, factory=factory)
    _check_sweep_memory(plan)
    return plan


def build_factory_field(factory, values: dict):
    """`factory(**values)`, checked to be a field `simulate` takes (`SweepError`)."""
    from .._model import AbstractField, AbstractVectorField

    try:
        field = factory(**values)
    except (ValueError, TypeError) as e:
        raise SweepError(f"the field factory refused {values}: {e}") from None
    if not isinstance(field, (AbstractField, AbstractVectorField)):
        raise SweepError(
            f"the field factory returned a {type(field).__name__}, not a field "
            "(a jaxattn field or an AbstractVectorField)"
        )
    return field


def _check_sweep_memory(plan: SweepPlan) -> None:
    """The assembled result (every point × save time × summary), and one chunk's saved
    values, must fit before anything runs."""
    sim = plan.first
    n, d = (int(s) for s in sim.x0.shape)
    values = sum(SUMMARIES[s].size(n, d) for s in plan.options.names)
    T = plan.options.save_points
    chunk = plan.options.chunk
    try:
        check_memory(
            8.0 * plan.n_points * T * values * 2,
            f"the sweep's results ({plan.n_points} points × {T} save points)",
        )
        attn = 0 if use_blockwise(sim.field.kernel, n, n) else 4 * n * n
        check_memory(
            8.0 * min(plan.n_points, chunk) * (T * (values + n * d) + attn),
            f"one chunk of {chunk} points with n = {n} tokens",
        )
    except ValueError as e:
        raise SweepError(str(e)) from None
