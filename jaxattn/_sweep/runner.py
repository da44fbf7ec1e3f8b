"""`sweep`: run a sweep's plan (`grid.py`) — the Cartesian product of the grid values,
each point one solve whose summaries (diffrax `SaveAt(fn=...)`, not whole trajectories)
are saved at fixed times — as resumable chunks (`chunks.py`), each chunk one
`map_sharded` (`sharding.py`) over its points; then the result, `summary.json` and the
overview figure.

Three pieces: the inputs of each point (`_PointBuilder`, and `_References` for the shared
unperturbed runs), the compiled program (`_Program`: fields, solves, summaries) and the
runner (`sweep`: checks, chunks, assembly, outputs). The axes and summaries are the rows
of `tables.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import unit_rows
from .._base import (
    Device,
    check_output_dir,
    json_default,
    output_lock,
    register_cache,
    remove_stale_temporaries,
    write_json,
    write_npz,
)
from .._model import TARGETS, AbstractField, AbstractVectorField, LoRA
from .._simulate import (
    STATUS_MESSAGES,
    STATUS_OK,
    Members,
    SolveConfig,
    SolveOptions,
    solve_config,
    solve_one,
)
from .._spec import SpecError, initial_tokens, lora_from_table, parse_spec
from .chunks import MANIFEST, SweepError, resolve_process, run_chunks, sweep_id
from .grid import SweepPlan, build_factory_field, parse_sweep, substitute
from .sharding import map_sharded, padded_size
from .tables import AXES, NEEDS_REFERENCE, summary_fn

_SOLVES: dict = register_cache({})


class _PairField(eqx.Module):
    """The unperturbed and the perturbed field on a stacked state `(2, n, d)`: both runs
    in one solve, so divergence summaries see them at the same times."""

    ref: AbstractField | AbstractVectorField
    pert: AbstractField | AbstractVectorField

    @property
    def dynamics(self):
        return self.pert.dynamics

    def solve_args(self):
        return (self.ref.solve_args(), self.pert.solve_args())

    def __call__(self, t, y, args=None):
        a0, a1 = (None, None) if args is None else args
        return jnp.stack([self.ref(t, y[0], a0), self.pert(t, y[1], a1)])


def _solve_config(
    solve: SolveOptions, sphere: bool, t1: float, save_points: int, save_fn, dtype, jumps=()
) -> tuple[SolveConfig, np.ndarray]:
    """The traced configuration of one point's solve (resolved by `simulate`'s own rules,
    `SolveOptions.resolve`, with the field's `jumps` as steps) and its save times: the
    spec's `ts`, else `save_points` times (every k-th step of a fixed grid, so that they
    lie exactly on it)."""
    stepping = solve.resolve(0.0, t1, dtype, sphere=sphere, jumps=jumps)
    if solve.ts is not None:
        ts = np.asarray(solve.ts, np.float64)
    elif stepping.grid is not None:
        grid = stepping.grid
        keep = np.unique(np.round(np.linspace(0, grid.size - 1, save_points)).astype(int))
        ts = grid[keep]
    else:
        ts = np.linspace(0.0, t1, save_points)
    return solve_config(stepping, save_fn=save_fn, saveat_steps=False), ts


#: the field leaves the grid can set per point (the `"field"` axes of `tables.AXES`)
FIELD_LEAVES = tuple(dict.fromkeys(str(a.leaf) for a in AXES.values() if a.part == "field"))


def _solve_span(field, y0, t1: float, ts_arr, cfg: SolveConfig, members: int):
    """One point's (or, with `members`, a stacked group's) solve from 0 to `t1`, saved
    at the sweep's save times `ts_arr`."""
    dtype = ts_arr.dtype
    t0, t_end = jnp.asarray(0.0, dtype), jnp.asarray(t1, dtype)
    return solve_one(field, y0, t0, t_end, None, ts_arr, cfg, members=members)


def _lora_slot_targets(plan: SweepPlan) -> tuple[str, ...]:
    """One LoRA slot per target the sweep can perturb (a point's LoRA fills its target's
    slot, the others are zero)."""
    if "lora" not in plan.spec:
        return ()
    if "lora.target" in plan.axes:
        return tuple(t for t in TARGETS if t in plan.axes["lora.target"])
    lora = plan.first.field.loras[0]
    return (lora.target,)


class _Part:
    """Some axes of the plan (those that change one part of a point, or key the reference
    runs), and the index of each point's combination of their values (C order over those
    axes)."""

    def __init__(self, plan: SweepPlan, keys: list[str]):
        names = list(plan.axes)
        self.plan = plan
        self.keys = keys
        self.pos = [names.index(k) for k in self.keys]
        self.shape = tuple(len(plan.axes[k]) for k in self.keys)
        self.count = int(np.prod(self.shape, dtype=np.int64))

    def index(self, indices: np.ndarray) -> np.ndarray:
        if not self.keys:
            return np.zeros(np.size(indices), np.int64)
        idx = np.unravel_index(indices, self.plan.shape)
        return np.ravel_multi_index([idx[i] for i in self.pos], self.shape)

    def values(self, c: int) -> dict[str, Any]:
        """The axis values of combination `c`."""
        sub = np.unravel_index(c, self.shape)
        return {k: self.plan.axes[k][i] for k, i in zip(self.keys, sub)}


class _PointBuilder:
    """Per-point inputs, built with the spec parser's own functions (so point `p` is
    exactly the simulation of `plan.point_spec(p)`): each distinct initial condition and
    LoRA is built once, and a chunk's inputs are gathered from them by index."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self.sim0 = plan.first
        self.dtype = self.sim0.x0.dtype
        self.d = int(self.sim0.x0.shape[1])
        self.targets = _lora_slot_targets(plan)
        axes_of = lambda match: _Part(plan, [k for k in plan.axes if k in AXES and match(AXES[k])])
        self.init = axes_of(lambda a: a.part == "init")
        self.lora_part = axes_of(lambda a: a.part == "lora")
        self.leaves = {
            n: axes_of(lambda a, n=n: a.part == "field" and a.leaf == n) for n in FIELD_LEAVES
        }
        self._x0: dict = {}
        self._lora: dict = {}
        self._tables: dict[str, np.ndarray] = {}

    def x0(self, assignment) -> np.ndarray:
        """The initial tokens of a point (its `"init"` axis values)."""
        key = tuple(assignment.get(k) for k in self.init.keys)
        if key not in self._x0:
            init = dict(self.plan.spec["init"])
            init.update({AXES[k].name: assignment[k] for k in self.init.keys})
            self._x0[key] = np.asarray(initial_tokens(init, self.dtype, self.d))
        return self._x0[key]

    def lora(self, assignment) -> LoRA:
        """The LoRA of a point (its `"lora"` axis values)."""
        key = tuple(assignment.get(k) for k in self.lora_part.keys)
        if key not in self._lora:
            table = dict(self.plan.spec["lora"])
            table.update({AXES[k].name: assignment[k] for k in self.lora_part.keys})
            self._lora[key] = lora_from_table(table, self.d, self.dtype)
        return self._lora[key]

    def leaf(self, name: str, assignment) -> float:
        """A field leaf of a point: its axis value, else the spec's (the first point's)."""
        for k, a in AXES.items():
            if a.part == "field" and a.leaf == name and k in assignment:
                return float(assignment[k])
        return float(getattr(self.sim0.field, name))

    def _table(self, name: str) -> np.ndarray:
        """Each distinct value of a part, stacked (built at the first chunk)."""
        if name not in self._tables:
            dt = self.dtype
            if name == "x0":
                rows = [self.x0(self.init.values(c)) for c in range(self.init.count)]
                self._tables[name] = np.asarray(rows, dt)
            elif name in FIELD_LEAVES:
                part = self.leaves[name]
                vals = [self.leaf(name, part.values(c)) for c in range(part.count)]
                self._tables[name] = np.asarray(vals, dt)
            else:  # the LoRA slots: alpha, A_t, B_t
                los = [self.lora(self.lora_part.values(c)) for c in range(self.lora_part.count)]
                self._tables["alpha"] = np.asarray([float(lo.alpha) for lo in los], dt)
                for t in self.targets:  # the point's target gets its LoRA, others zero
                    self._tables[f"A_{t}"] = np.asarray([np.asarray(lo.A) for lo in los], dt)
                    self._tables[f"B_{t}"] = np.asarray(
                        [np.asarray(lo.B) if lo.target == t else np.zeros_like(lo.B) for lo in los],
                        dt,
                    )
        return self._tables[name]

    def x0s(self, indices) -> np.ndarray:
        """The initial tokens of the points `indices`, stacked."""
        return self._table("x0")[self.init.index(np.asarray(indices, np.int64))]

    def inputs(self, indices) -> dict[str, np.ndarray]:
        """The inputs of the points `indices`: `x0`, each field leaf, and with a LoRA its
        `alpha` and the slots' factors `A_t`, `B_t`."""
        indices = np.asarray(indices, np.int64)
        out = {"x0": self.x0s(indices)}
        for name in FIELD_LEAVES:
            out[name] = self._table(name)[self.leaves[name].index(indices)]
        if self.targets:
            j = self.lora_part.index(indices)
            out["alpha"] = self._table("alpha")[j]
            for t in self.targets:
                out[f"A_{t}"] = self._table(f"A_{t}")[j]
                out[f"B_{t}"] = self._table(f"B_{t}")[j]
        return out


# Shared references are used while their saved tokens (every reference × save time)
# stay below this; above it each point solves its own reference beside its run.
REFERENCE_BYTES = 256 * 2**20


class _References:
    """The LoRA-free runs that reference summaries (divergence, Hausdorff) compare each
    point with. A point's reference depends only on the axes that key it
    (`tables.Axis.keys_reference`: the initial condition and β), so a sweep over LoRAs
    needs far fewer of them than it has points (the docs example: 128 for 3072 points).
    With fixed steps they are solved once, their tokens saved at the save times, and each
    point's reference summaries are computed from them after its own solve: the same
    arithmetic as solving each reference beside its point (the values agree to
    rounding), for about half the work."""

    def __init__(self, plan: SweepPlan, builder: _PointBuilder):
        self.plan, self.builder = plan, builder
        # the initial condition's axes first, then the field's (each in table order)
        order = sorted(AXES.values(), key=lambda a: a.part != "init")
        self.part = _Part(plan, [a.key for a in order if a.keys_reference and a.key in plan.axes])
        self.keys, self.count = self.part.keys, self.part.count

    def worth_it(self, save_times: int) -> bool:
        n, d = self.builder.sim0.x0.shape
        size = self.count * save_times * int(n) * int(d) * np.dtype(self.builder.dtype).itemsize
        return self.count < self.plan.n_points and size <= REFERENCE_BYTES

    def index(self, indices: np.ndarray) -> np.ndarray:
        """The reference of each point."""
        return self.part.index(indices)

    def inputs(self) -> dict[str, np.ndarray]:
        b = self.builder
        rows = [self.part.values(r) for r in range(self.count)]
        out = {"x0": np.asarray([b.x0(a) for a in rows], b.dtype)}
        for name in FIELD_LEAVES:
            out[name] = np.asarray([b.leaf(name, a) for a in rows], b.dtype)
        return out


class _Program:
    """What a sweep computes, compiled once per process and sweep: each chunk's points as
    one vmapped (and, with fixed steps, stacked) solve whose summaries are saved at the
    save times, and the shared reference runs."""

    def __init__(self, plan: SweepPlan, builder: _PointBuilder):
        sim0 = builder.sim0
        self.plan, self.builder = plan, builder
        self.sphere = sphere = sim0.field.on_sphere
        self.names = names = list(plan.options.names)
        threshold = plan.options.cluster_threshold
        self.pair = pair = plan.options.pair
        cfg, self.ts = _solve_config(
            sim0.solve,
            sphere,
            sim0.t1,
            plan.options.save_points,
            summary_fn(names, threshold, sphere, pair),
            builder.dtype,
        )
        # Fixed steps: the unperturbed runs are solved once per reference key (initial
        # condition, β) and shared (`_References`); each point saves its tokens for the
        # reference summaries.
        self.refs = _References(plan, builder)
        self.shared = pair and cfg.stacked and self.refs.worth_it(self.ts.size)
        self.pair_fn = None
        if self.shared:
            own = [k for k in names if k not in NEEDS_REFERENCE]
            own_fn = summary_fn(
                own + ([] if "tokens" in own else ["tokens"]), threshold, sphere, False
            )
            cfg = dataclasses.replace(cfg, save_fn=own_fn)
            # The reference summaries by the paired solve's own formulas, on (reference, run).
            ref_names = [k for k in names if k in NEEDS_REFERENCE]
            self.pair_fn = summary_fn(ref_names, threshold, sphere, True)
        self.cfg = cfg
        self.ref_cfg = dataclasses.replace(cfg, save_fn=lambda t, y, args: y)
        self.t1 = sim0.t1
        assert isinstance(sim0.field, AbstractField)  # `parse_sweep` refuses the family
        self.base = sim0.field.without_lora()
        targets = builder.targets
        self.targets = targets
        r = sim0.field.loras[0].rank if sim0.field.loras else 0
        template_loras = tuple(
            LoRA(np.zeros((r, builder.d)), np.zeros((builder.d, r)), 1.0, t) for t in targets
        )
        self.template = self.base.with_lora(template_loras or None)
        self.ts_arr = jnp.asarray(self.ts, builder.dtype)

    def _where(self, f):
        """The leaves a point sets: the field leaves, then each LoRA slot's α, then the
        slots' factors (by the static slot count: an empty tuple is no node)."""
        los = [f.loras[i] for i in range(len(self.targets))]
        return (
            [getattr(f, leaf) for leaf in FIELD_LEAVES]
            + [lo.alpha for lo in los]
            + [a for lo in los for a in (lo.A, lo.B)]
        )

    def _leaves(self, inp) -> list:
        leaves = [inp[leaf] for leaf in FIELD_LEAVES]
        leaves += [inp["alpha"] for _ in self.targets]
        for t in self.targets:
            leaves += [inp[f"A_{t}"], inp[f"B_{t}"]]
        return leaves

    def _solve_span(self, field, y0, cfg, members):
        return _solve_span(field, y0, self.t1, self.ts_arr, cfg, members)

    def point(self, inp, stacked: bool = False):
        """One point's solve; `stacked`: a chunk of points (leading axis) as one solve of
        the stacked state (fixed steps, `_simulate.Members`)."""
        leaves = self._leaves(inp)
        field = eqx.tree_at(self._where, self.template, leaves)
        axes = eqx.tree_at(
            self._where,
            jax.tree.map(lambda _: None, self.template),
            [0] * len(leaves),
            is_leaf=lambda x: x is None,
        )
        y0 = unit_rows(inp["x0"]) if self.sphere else inp["x0"]
        if self.pair and not self.shared:
            no_lora = lambda f: eqx.tree_at(lambda f: f.loras, f, ())
            field = _PairField(no_lora(field), field)
            axes = _PairField(no_lora(axes), axes)
            y0 = jnp.stack([y0, y0], axis=-3)
        if stacked:
            field = Members(field, axes, 1, 0)
        ys, status, steps, _ = self._solve_span(field, y0, self.cfg, int(stacked))
        if self.shared:  # the reference summaries, from the shared run's saved tokens
            ys = _reference_summaries(ys, inp["ref"], self.names, self.pair_fn, lead=int(stacked))
            status = jnp.where(status == STATUS_OK, inp["ref_status"], status)
        return {**{f"summary_{k}": v for k, v in ys.items()}, "status": status, "num_steps": steps}

    def reference(self, inp):
        """A group of unperturbed runs (fixed steps, one stacked solve): their tokens at
        the save times and their status."""
        where = lambda f: [getattr(f, leaf) for leaf in FIELD_LEAVES]
        field = eqx.tree_at(where, self.base, [inp[leaf] for leaf in FIELD_LEAVES])
        axes = eqx.tree_at(
            where,
            jax.tree.map(lambda _: None, self.base),
            [0] * len(FIELD_LEAVES),
            is_leaf=lambda x: x is None,
        )
        y0 = unit_rows(inp["x0"]) if self.sphere else inp["x0"]
        ys, status, _, _ = self._solve_span(Members(field, axes, 1, 0), y0, self.ref_cfg, 1)
        return {"tokens": ys, "status": status}

    def computer(self, devices: list, log) -> tuple[Callable, int]:
        """The chunk engine's `compute(indices)` and the number of devices it uses."""
        solve, ref_solve = self.compile(devices)
        return _chunk_computer(self, solve, ref_solve, log), len(solve.devices)

    def compile(self, devices: list) -> tuple:
        """The sharded chunk solve and reference solve, kept for the process, keyed by
        everything they close over (the sweep's identity) and the devices: a second sweep
        of the same spec in one process (a notebook, a benchmark) does not compile again."""
        key = (
            sweep_id({**self.plan.identity(), "ts": self.ts}),
            tuple(str(dv) for dv in devices),
            self.shared,
        )
        solves = _SOLVES.get(key)
        if solves is None:
            batch = self.plan.options.batch
            assert batch is not None  # set by SweepOptions.from_table
            if self.cfg.stacked:
                solve = map_sharded(
                    lambda inp: self.point(inp, stacked=True), devices, batch=batch, batched=True
                )
            else:  # adaptive steps: one solve per point, each with its own step control
                solve = map_sharded(self.point, devices, batch=batch)
            ref_solve = None
            if self.shared:  # groups no wider than the references need (a few are padded)
                ref_batch = padded_size(self.refs.count, batch)
                ref_solve = map_sharded(self.reference, devices, batch=ref_batch, batched=True)
            if len(_SOLVES) >= 8:
                _SOLVES.clear()
            solves = _SOLVES[key] = (solve, ref_solve)
        return solves


class _FieldProgram:
    """A sweep whose points each build their own field — a model-family spec (each point
    parsed from its spec) or a Python factory (`fn(**field values)`) — where the grid may
    change what a compiled program fixes (a normalisation scheme, a LoRA's head or
    layer, a factory's number of heads). A chunk's points are grouped by the structure
    of their field (its static part and its leaves' shapes): each group is one vmapped,
    stacked solve, compiled once per structure; with a reference summary each point is
    solved beside its run without LoRA (`_PairField`)."""

    def __init__(self, plan: SweepPlan, builder: _PointBuilder):
        sim0 = plan.first
        self.plan, self.builder = plan, builder
        self.sphere = sphere = sim0.field.on_sphere
        self.jumps = tuple(getattr(sim0.field, "jump_times", ()))
        self.names = names = list(plan.options.names)
        self.pair = pair = plan.options.pair
        self.cfg, self.ts = _solve_config(
            sim0.solve,
            sphere,
            sim0.t1,
            plan.options.save_points,
            summary_fn(names, plan.options.cluster_threshold, sphere, pair),
            builder.dtype,
            self.jumps,
        )
        self.ts_arr = jnp.asarray(self.ts, builder.dtype)
        self.t1 = sim0.t1
        keys = [k for k in plan.axes if not (k in AXES and AXES[k].part == "init")]
        self.field_part = _Part(plan, keys)
        self._fields: dict[int, Any] = {}
        self._solves: dict = {}

    def field(self, c: int):
        """The field of combination `c` of the non-initial-condition axes (built once)."""
        if c not in self._fields:
            values = self.field_part.values(c)
            if self.plan.factory is not None:
                f = build_factory_field(self.plan.factory, {k[6:]: v for k, v in values.items()})
            else:
                spec = substitute(self.plan.spec, values)
                try:
                    f = parse_spec(spec).field
                except SpecError as e:
                    raise SweepError(f"grid point {values}: {e}") from None
            self._check(f, values)
            if len(self._fields) >= 4096:
                self._fields.clear()
            self._fields[c] = f
        return self._fields[c]

    def _check(self, f, values) -> None:
        f0 = self.plan.first.field
        for what, a, b in (
            ("d", f.d, f0.d),
            ("on_sphere", f.on_sphere, f0.on_sphere),
            ("jump_times", tuple(getattr(f, "jump_times", ())), self.jumps),
            ("LoRA batch shape", f.batch_shape, ()),
        ):
            if a != b:
                raise SweepError(
                    f"grid point {values} gives a field with {what} = {a}, the first point "
                    f"{b}: a sweep's points share these"
                )
        if self.pair and not f.loras:
            raise SweepError(f"grid point {values}: its field has no LoRA to compare without")

    @staticmethod
    def _structure(f) -> tuple:
        leaves, tree = jax.tree.flatten(f)
        return (tree, tuple((jnp.shape(x), jnp.asarray(x).dtype) for x in leaves))

    def _point(self, static, dyn, x0):
        """One group's stacked solve: `dyn` the fields' arrays (leading point axis)."""
        field = eqx.combine(dyn, static)
        axes = jax.tree.map(lambda _: 0, dyn)
        y0 = unit_rows(x0) if self.sphere else x0
        if self.pair:
            field = _PairField(field.without_lora(), field)
            axes = _PairField(eqx.tree_at(lambda f: f.loras, axes, ()), axes)
            y0 = jnp.stack([y0, y0], axis=-3)
        if self.cfg.stacked:
            members = Members(field, axes, 1, 0)
            ys, status, steps, _ = _solve_span(members, y0, self.t1, self.ts_arr, self.cfg, 1)
        else:
            one = lambda f, y: _solve_span(f, y, self.t1, self.ts_arr, self.cfg, 0)
            ys, status, steps, _ = eqx.filter_vmap(one, in_axes=(axes, 0))(field, y0)
        return {**{f"summary_{k}": v for k, v in ys.items()}, "status": status, "num_steps": steps}

    def computer(self, devices: list, log) -> tuple[Callable, int]:
        batch = self.plan.options.batch
        assert batch is not None  # set by SweepOptions.from_table
        chunk = self.plan.options.chunk
        builder = self.builder

        def solve_for(key, static):
            if key not in self._solves:
                if log and self._solves:
                    log(f"sweep: a new field structure ({len(self._solves) + 1}): compiling")
                fn = lambda dyn, x0: self._point(static, dyn, x0)
                self._solves[key] = map_sharded(fn, devices, batch=batch, batched=True)
            return self._solves[key]

        def compute(indices):
            combos = self.field_part.index(indices)
            x0 = builder.x0s(indices)
            groups: dict = {}
            for i, c in enumerate(combos):
                groups.setdefault(self._structure(self.field(int(c))), []).append(i)
            out: dict[str, np.ndarray] = {}
            for key, pos in groups.items():
                # a short group is padded (repeating its last point) to a power of two
                size = padded_size(len(pos), chunk)
                idx = np.asarray(pos + [pos[-1]] * (size - len(pos)))
                fields = [self.field(int(combos[i])) for i in idx]
                parts = [eqx.partition(f, eqx.is_array) for f in fields]
                dyn = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]),
                                   *[p[0] for p in parts])  # fmt: skip
                res = solve_for(key, parts[0][1])(dyn, x0[idx])
                for k, v in res.items():
                    if k not in out:
                        out[k] = np.empty((indices.size,) + v.shape[1:], v.dtype)
                    out[k][np.asarray(pos)] = v[: len(pos)]
            return out

        return compute, len(list(devices))


def _chunk_computer(program: _Program, solve, ref_solve, log):
    """`compute(indices)` of the chunk engine: the chunk's inputs, its solve and, at the
    first chunk that needs them, the shared reference runs."""
    plan, builder, refs = program.plan, program.builder, program.refs
    shared_runs: dict[str, np.ndarray] = {}

    def compute(indices):
        # A short last chunk is padded (repeating its last point) only up to the next
        # power of two below the chunk size: a few shapes to compile, and a 1-point
        # sweep does not cost a full chunk. Chunks are always cut the same way, so a
        # resumed sweep computes every chunk exactly as an uninterrupted one.
        n, size = indices.size, padded_size(indices.size, plan.options.chunk)
        idx = np.concatenate([indices, np.repeat(indices[-1:], size - n)]) if n < size else indices
        inputs = builder.inputs(idx)
        if ref_solve is not None:
            if not shared_runs:
                if log:
                    log(f"sweep: {refs.count} unperturbed reference run(s), shared by the points")
                shared_runs.update(ref_solve(refs.inputs()))
            j = refs.index(idx)
            inputs["ref"] = shared_runs["tokens"][j]
            inputs["ref_status"] = shared_runs["status"][j]
        return {k: v[:n] for k, v in solve(inputs).items()}

    return compute


def sweep(
    spec: dict | SweepPlan,
    out_dir: str | os.PathLike | None,
    *,
    devices: Sequence[Device] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    process_index: int | None = None,
    process_count: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    force: bool = False,
    factory: Callable[..., Any] | None = None,
) -> dict[str, Any] | None:
    """Run the grid of a sweep spec; write `out_dir/result.npz`, `summary.json` and the
    figure `sweep.png` (each scalar summary against t, per value of the first axis).

    **Arguments:**

    - `spec`: a sweep spec dictionary (simulation spec + `[grid]`, optional `[sweep]`)
      or a `SweepPlan` from `parse_sweep`.
    - `out_dir`: output folder; chunks go to `out_dir/chunks/`. A rerun with the same
      spec resumes; a different sweep's chunks there are an error (`SweepError`).
      `None`: in memory (a notebook's quick grid): the chunks and outputs go to a
      temporary folder that is removed at the end; nothing resumes, one process only.
    - `devices`: devices to shard each chunk across (default: all local devices).
    - `progress`, `log`, `process_index`, `process_count`, `on_chunk`: see `run_chunks`.
    - `force`: allow a folder that holds a `summary.json`, `sweep.png` or `result.npz`
      this sweep did not write (they are replaced at the end); without it such a folder
      is refused, so no file of the user's is lost.
    - `factory`: a function `fn(**values) -> field` building each point's field from
      the grid's `field.<argument>` axes (any field `simulate` takes, e.g. a
      `TransformerField` or an `AbstractVectorField` of the user's); the spec then holds
      only `[init]`, `[solve]` and `dtype`. Points whose fields differ in structure
      (static options, shapes) are compiled once per structure.

    A model-family spec (heads, mask, alibi, norm, …) sweeps too, over the axes of the
    classic ones and `norm`, `alibi` (one slope for every head), `alpha`, `lora.head`,
    `lora.layer` (and `lora.target` O, W1, W2).

    While it runs, the sweep holds a lock on `out_dir` (one per process index): a second
    sweep into the same folder fails at once with a message naming the holder.

    **Returns** the result arrays (also in `result.npz`): `ts`, one array per summary of
    shape `(*grid_shape, T, …)`, `status` and `num_steps` of shape `grid_shape`, and
    `grid_<key>` with each axis's values; None when other processes still have chunks
    to finish (the last process to finish writes the result).
    """
    plan = spec if isinstance(spec, SweepPlan) else parse_sweep(spec, factory)
    pi, pc = resolve_process(process_index, process_count)
    if out_dir is None:
        if pc > 1:
            raise SweepError("a sweep over several processes needs an output folder they share")
        # the temporary folder is removed: its "wrote …" line would name nothing
        quiet = (
            None if log is None else (lambda m: None if m.startswith("sweep: wrote") else log(m))
        )
        with tempfile.TemporaryDirectory(prefix="jaxattn-sweep-") as tmp:
            return sweep(
                plan,
                os.path.join(tmp, "sweep"),
                devices=devices,
                progress=progress,
                log=quiet,
                process_index=pi,
                process_count=pc,
                on_chunk=on_chunk,
            )
    builder = _PointBuilder(plan)
    program = (_FieldProgram if plan.per_point_fields else _Program)(plan, builder)
    # Refusals that the folder's contents decide come before the folder and its lock
    # are created, so a refused run leaves nothing behind; they are checked again
    # under the lock (another run may have written in between).
    out_dir = check_output_dir(out_dir, create=False)
    if os.path.isdir(out_dir):
        _check_folder(program, out_dir, force)
    out_dir = check_output_dir(out_dir)
    with output_lock(out_dir, f"-p{pi}"):
        return _sweep_locked(
            plan, program, out_dir, devices, progress, log, pi, pc, on_chunk, force
        )


def _check_folder(program: _Program | _FieldProgram, out_dir: str, force: bool) -> None:
    """Files of the user's, or another sweep's result, in `out_dir`: `SweepError`."""
    _check_foreign_files(out_dir, force)
    if not force:
        _check_previous_result(out_dir, sweep_id({**program.plan.identity(), "ts": program.ts}))


def _check_foreign_files(out_dir: str, force: bool) -> None:
    """A folder without this engine's manifest must not hold files the sweep writes."""
    if force or os.path.exists(os.path.join(out_dir, "chunks", MANIFEST)):
        return
    for name in ("summary.json", "sweep.png"):  # result.npz: `_check_previous_result`
        if os.path.exists(os.path.join(out_dir, name)):
            raise SweepError(
                f"{out_dir} already holds {name}, not written by a sweep; choose "
                "another output folder or pass --force to replace it"
            )


def _sweep_locked(
    plan, program, out_dir, devices, progress, log, process_index, process_count, on_chunk, force
):
    _check_folder(program, out_dir, force)
    remove_stale_temporaries(out_dir)
    devices = list(jax.local_devices() if devices is None else devices)
    compute, n_devices = program.computer(devices, log)
    ts, names = program.ts, program.names
    identity = {**plan.identity(), "ts": ts}
    if log:
        log(
            f"sweep: {plan.n_points} points "
            f"({' × '.join(f'{k} {len(v)}' for k, v in plan.axes.items())}), "
            f"chunks of {plan.options.chunk}, {n_devices} device(s), "
            f"summaries {', '.join(names)} at {ts.size} times"
        )
    t_start = time.perf_counter()
    flat = run_chunks(
        os.path.join(out_dir, "chunks"),
        identity,
        plan.n_points,
        plan.options.chunk,
        compute,
        progress=progress,
        log=log,
        desc="sweep",
        process_index=process_index,
        process_count=process_count,
        on_chunk=on_chunk,
    )
    if flat is None:
        if log:
            log("sweep: this process is done; other processes still have chunks to finish")
        return None
    result = _assemble(plan, flat, ts, names)
    _write_outputs(plan, out_dir, result, identity, names, n_devices, t_start, log)
    return result


def _assemble(plan: SweepPlan, flat: dict, ts: np.ndarray, names: list[str]) -> dict[str, Any]:
    """The chunks' flat arrays as the result: each summary `(*grid_shape, T, …)`, status
    and steps `grid_shape`, and each axis's values."""
    shape = plan.shape
    result: dict[str, Any] = {"ts": np.asarray(ts, np.float64)}
    for k in names:
        a = flat[f"summary_{k}"]
        result[k] = a.reshape(shape + a.shape[1:])
    result["status"] = flat["status"].reshape(shape)
    result["num_steps"] = flat["num_steps"].reshape(shape)
    for k, v in plan.axes.items():
        result[f"grid_{k}"] = np.asarray(v)
    return result


def _write_outputs(plan, out_dir, result, identity, names, n_devices, t_start, log) -> None:
    """`result.npz` (with the sweep's description), `summary.json` and `sweep.png`."""
    meta = json.dumps(
        {
            "spec": plan.spec,
            "grid": plan.axes,
            "options": plan.options.as_dict(),
            "axes": list(plan.axes),
            "sweep_id": sweep_id(identity),
        },
        sort_keys=True,
        default=json_default,
    )
    write_npz(os.path.join(out_dir, "result.npz"), **result, sweep=meta)
    status = result["status"]
    failed = {
        STATUS_MESSAGES[int(c)]: int(np.sum(status == c))
        for c in np.unique(status)
        if c != STATUS_OK
    }
    summary = {
        "points": plan.n_points,
        "grid_shape": list(plan.shape),
        "axes": plan.axes,
        "summaries": names,
        "save_times": int(result["ts"].size),
        "failed": failed,
        "devices": n_devices,
        "wall_seconds_this_run": round(time.perf_counter() - t_start, 3),
        "final": {k: _final_stats(result[k]) for k in names if k not in ("tokens", "mean")},
    }
    from .. import plotting

    if plotting.sweep_overview(result, list(plan.axes), names, os.path.join(out_dir, "sweep.png")):
        summary["figure"] = "sweep.png"
    write_json(os.path.join(out_dir, "summary.json"), summary)
    if log:
        log(
            f"sweep: wrote {os.path.join(out_dir, 'result.npz')} "
            f"({plan.n_points - sum(failed.values())} ok, {sum(failed.values())} failed)"
        )


def _reference_summaries(ys: dict, ref, names, pair_fn, lead: int) -> dict:
    """`ys` (the point's own summaries and its `tokens`, each with `lead` leading point
    axes and a save-time axis) with the reference summaries added: `pair_fn` (the paired
    solve's summary function) on the stacked (reference, run) tokens at each save time;
    `tokens` is kept only when asked for."""
    fn = lambda x, r: pair_fn(None, jnp.stack([r, x]), None)
    for _ in range(lead + 1):
        fn = jax.vmap(fn)
    out = {**{k: v for k, v in ys.items() if k in names}, **fn(ys["tokens"], ref)}
    return {k: out[k] for k in names}


def _check_previous_result(out_dir: str, sid: str) -> None:
    path = os.path.join(out_dir, "result.npz")
    if not os.path.exists(path):
        return
    try:
        with np.load(path, allow_pickle=False) as z:
            old = json.loads(str(z["sweep"])).get("sweep_id")
    except (OSError, ValueError, KeyError):
        old = None
    if old != sid:
        raise SweepError(
            f"{out_dir} already holds result.npz of a different sweep; choose "
            "another output folder or remove it"
        )


def _final_stats(a: np.ndarray) -> dict:
    last = np.asarray(a[..., -1], np.float64)
    fin = last[np.isfinite(last)]
    if not fin.size:
        return {"min": None, "median": None, "max": None}
    return {"min": float(fin.min()), "median": float(np.median(fin)), "max": float(fin.max())}
