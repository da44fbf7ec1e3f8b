"""`sweep`: run a sweep's plan (`_grid.py`) — the Cartesian product of the grid values,
each point one solve whose summaries (diffrax `SaveAt(fn=...)`, not whole trajectories)
are saved at fixed times — as resumable chunks (`_chunks.py`), each chunk one
`map_sharded` (`_sharding.py`) over its points; then the result, `summary.json` and the
overview figure.

The sweep is split by job: `_chunks` (the engine: resumable atomic chunks), `_sharding`
(points across devices), `_grid` (spec + grid → plan), and this runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._analysis import cluster_count, divergence, hausdorff, pairwise_distances, unit_rows
from .._base import (
    TARGETS,
    Device,
    check_output_dir,
    json_default,
    output_lock,
    register_cache,
    remove_stale_temporaries,
    write_json,
    write_npz,
)
from .._model import AbstractField, LoRA
from .._simulate import (
    STATUS_MESSAGES,
    STATUS_OK,
    Members,
    SolveConfig,
    get_adjoint,
    solve_one,
    stepping,
)
from .._spec import initial_tokens, lora_from_table, parse_spec
from .chunks import MANIFEST, SweepError, resolve_process, run_chunks, sweep_id
from .grid import NEEDS_REFERENCE, SweepPlan, parse_sweep
from .sharding import map_sharded, padded_size

_SOLVES: dict = register_cache({})


class _PairField(eqx.Module):
    """The unperturbed and the perturbed field on a stacked state `(2, n, d)`: both runs
    in one solve, so divergence summaries see them at the same times."""

    ref: AbstractField
    pert: AbstractField

    @property
    def dynamics(self):
        return self.pert.dynamics

    def solve_args(self):
        return (self.ref.solve_args(), self.pert.solve_args())

    def __call__(self, t, y, args=None):
        a0, a1 = (None, None) if args is None else args
        return jnp.stack([self.ref(t, y[0], a0), self.pert(t, y[1], a1)])


def _summary_fn(names, threshold, sphere, pair):
    def fn(t, y, args):
        x = y[1] if pair else y
        out = {}
        for name in names:
            if name == "divergence":
                out[name] = divergence(y[0], y[1])
            elif name == "hausdorff":
                out[name] = hausdorff(y[1], y[0])
            elif name == "clusters":
                # float: diffrax pre-fills outputs with inf, which an int cannot hold
                out[name] = cluster_count(x, threshold, sphere=sphere).astype(x.dtype)
            elif name == "diameter":
                out[name] = jnp.max(pairwise_distances(x))
            elif name == "mean":
                out[name] = jnp.mean(x, axis=0)
            elif name == "tokens":
                out[name] = x
        return out

    return fn


def _solve_config(solve: dict, sphere: bool, t1: float, save_points: int, save_fn, dtype):
    """diffrax configuration of one point's solve, resolved by `simulate`'s own rules."""
    project = bool(solve.get("renormalise") and sphere)
    solver, controller, max_steps, grid, _ = stepping(
        solve.get("solver", "rk4"),
        solve.get("dt"),
        solve.get("rtol"),
        solve.get("atol"),
        solve.get("max_steps"),
        project,
        0.0,
        t1,
        dtype,
    )
    if "ts" in solve:
        ts = np.asarray(solve["ts"], np.float64)
    elif grid is not None:  # every k-th step: save times lie exactly on the grid
        keep = np.unique(np.round(np.linspace(0, grid.size - 1, save_points)).astype(int))
        ts = grid[keep]
    else:
        ts = np.linspace(0.0, t1, save_points)
    cfg = SolveConfig(
        solver=solver,
        controller=controller,
        saveat_steps=False,
        max_steps=int(max_steps),
        adjoint=get_adjoint(None, None),
        progress=False,
        sphere=sphere,
        renormalise=project,
        n_field_batch=0,
        n_x_batch=0,
        save_fn=save_fn,
        stacked=grid is not None,
    )
    return cfg, ts


def _lora_slot_targets(plan: SweepPlan) -> tuple[str, ...]:
    if "lora" not in plan.spec:
        return ()
    if "lora.target" in plan.axes:
        return tuple(t for t in TARGETS if t in plan.axes["lora.target"])
    return (str(plan.spec["lora"].get("target", "V")).upper(),)


class _PointBuilder:
    """Per-point inputs, built with the spec parser's own functions (so point `p` is
    exactly the simulation of `plan.point_spec(p)`), cached per distinct value."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self.sim0 = parse_spec(plan.point_spec(0))
        self.dtype = self.sim0.x0.dtype
        self.d = int(self.sim0.x0.shape[1])
        self.targets = _lora_slot_targets(plan)
        self._x0: dict = {}
        self._lora: dict = {}

    def x0(self, assignment):
        seed = assignment.get("init.seed")
        if seed not in self._x0:
            init = dict(self.plan.spec["init"])
            if seed is not None:
                init["seed"] = seed
            self._x0[seed] = np.asarray(initial_tokens(init, self.dtype, self.d))
        return self._x0[seed]

    def lora(self, assignment) -> LoRA:
        key = tuple(
            assignment.get(k) for k in ("lora.norm", "lora.seed", "lora.target", "lora.alpha")
        )
        if key not in self._lora:
            table = dict(self.plan.spec["lora"])
            for k in ("lora.norm", "lora.seed", "lora.target", "lora.alpha"):
                if k in assignment:
                    table[k.split(".")[1]] = assignment[k]
            self._lora[key] = lora_from_table(table, self.d, self.dtype)
        return self._lora[key]

    def beta(self, assignment) -> float:
        return assignment.get("beta", self.plan.spec.get("beta", 1.0))

    def inputs(self, indices) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"x0": [], "beta": []}
        for t in self.targets:
            cols[f"A_{t}"], cols[f"B_{t}"] = [], []
        cols["alpha"] = []
        for p in indices:
            a = self.plan.assignment(int(p))
            cols["x0"].append(self.x0(a))
            cols["beta"].append(self.beta(a))
            if self.targets:
                lo = self.lora(a)
                for t in self.targets:  # the point's target gets its LoRA, others zero
                    cols[f"A_{t}"].append(np.asarray(lo.A))
                    cols[f"B_{t}"].append(
                        np.asarray(lo.B) if lo.target == t else np.zeros_like(np.asarray(lo.B))
                    )
                cols["alpha"].append(float(lo.alpha))
            else:
                cols["alpha"].append(1.0)
        return {k: np.asarray(v, self.dtype) for k, v in cols.items()}


# Shared references are used while their saved tokens (every reference × save time)
# stay below this; above it each point solves its own reference beside its run.
REFERENCE_BYTES = 256 * 2**20


class _References:
    """The LoRA-free runs that reference summaries (divergence, Hausdorff) compare each
    point with. A point's reference depends only on its initial condition and β, so a
    sweep over LoRAs needs far fewer of them than it has points (the docs example: 128
    for 3072 points). With fixed steps they are solved once, their tokens saved at the
    save times, and each point's reference summaries are computed from them after its
    own solve: the same arithmetic as solving each reference beside its point (the
    values agree to rounding), for about half the work."""

    def __init__(self, plan: SweepPlan, builder: _PointBuilder):
        self.plan, self.builder = plan, builder
        names = list(plan.axes)
        self.keys = [k for k in ("init.seed", "beta") if k in plan.axes]
        self.pos = [names.index(k) for k in self.keys]
        self.shape = tuple(len(plan.axes[k]) for k in self.keys)
        self.count = int(np.prod(self.shape, dtype=np.int64))

    def worth_it(self, save_times: int) -> bool:
        n, d = self.builder.sim0.x0.shape
        size = self.count * save_times * int(n) * int(d) * np.dtype(self.builder.dtype).itemsize
        return self.count < self.plan.n_points and size <= REFERENCE_BYTES

    def index(self, indices: np.ndarray) -> np.ndarray:
        """The reference of each point."""
        if not self.keys:
            return np.zeros(indices.size, np.int64)
        idx = np.unravel_index(indices, self.plan.shape)
        return np.ravel_multi_index([idx[i] for i in self.pos], self.shape)

    def inputs(self) -> dict[str, np.ndarray]:
        x0, beta = [], []
        for r in range(self.count):
            sub = np.unravel_index(r, self.shape)
            a = {k: self.plan.axes[k][i] for k, i in zip(self.keys, sub)}
            x0.append(self.builder.x0(a))
            beta.append(self.builder.beta(a))
        return {k: np.asarray(v, self.builder.dtype) for k, v in (("x0", x0), ("beta", beta))}


def sweep(
    spec: dict | SweepPlan,
    out_dir: str | os.PathLike,
    *,
    devices: Sequence[Device] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    process_index: int | None = None,
    process_count: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    force: bool = False,
) -> dict[str, Any] | None:
    """Run the grid of a sweep spec; write `out_dir/result.npz`, `summary.json` and the
    figure `sweep.png` (each scalar summary against t, per value of the first axis).

    **Arguments:**

    - `spec`: a sweep spec dictionary (simulation spec + `[grid]`, optional `[sweep]`)
      or a `SweepPlan` from `parse_sweep`.
    - `out_dir`: output folder; chunks go to `out_dir/chunks/`. A rerun with the same
      spec resumes; a different sweep's chunks there are an error (`SweepError`).
    - `devices`: devices to shard each chunk across (default: all local devices).
    - `progress`, `log`, `process_index`, `process_count`, `on_chunk`: see `run_chunks`.
    - `force`: allow a folder that holds a `summary.json`, `sweep.png` or `result.npz`
      this sweep did not write (they are replaced at the end); without it such a folder
      is refused, so no file of the user's is lost.

    While it runs, the sweep holds a lock on `out_dir` (one per process index): a second
    sweep into the same folder fails at once with a message naming the holder.

    **Returns** the result arrays (also in `result.npz`): `ts`, one array per summary of
    shape `(*grid_shape, T, …)`, `status` and `num_steps` of shape `grid_shape`, and
    `grid_<key>` with each axis's values; None when other processes still have chunks
    to finish (the last process to finish writes the result).
    """
    plan = spec if isinstance(spec, SweepPlan) else parse_sweep(spec)
    pi, pc = resolve_process(process_index, process_count)
    out_dir = check_output_dir(out_dir)
    with output_lock(out_dir, f"-p{pi}"):
        return _sweep_locked(plan, out_dir, devices, progress, log, pi, pc, on_chunk, force)


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
    plan, out_dir, devices, progress, log, process_index, process_count, on_chunk, force
):
    _check_foreign_files(out_dir, force)
    remove_stale_temporaries(out_dir)
    builder = _PointBuilder(plan)
    sim0 = builder.sim0
    sphere = sim0.field.on_sphere
    names = plan.options["summaries"]
    threshold = plan.options["cluster_threshold"]
    pair = any(s in NEEDS_REFERENCE for s in names)
    save_fn = _summary_fn(names, threshold, sphere, pair)
    cfg, ts = _solve_config(
        sim0.solve, sphere, sim0.t1, plan.options["save_points"], save_fn, builder.dtype
    )
    # Fixed steps: the unperturbed runs are solved once per (initial condition, β) and
    # shared (`_References`); each point saves its tokens for the reference summaries.
    refs = _References(plan, builder)
    shared = pair and cfg.stacked and refs.worth_it(ts.size)
    if shared:
        own = [k for k in names if k not in NEEDS_REFERENCE]
        own_fn = _summary_fn(
            own + ([] if "tokens" in own else ["tokens"]), threshold, sphere, False
        )
        cfg = dataclasses.replace(cfg, save_fn=own_fn)
        # The reference summaries by the paired solve's own formulas, on (reference, run).
        ref_names = [k for k in names if k in NEEDS_REFERENCE]
        pair_fn = _summary_fn(ref_names, threshold, sphere, True)
    t1 = sim0.t1
    base = sim0.field.without_lora()
    targets = builder.targets
    r = sim0.field.loras[0].rank if sim0.field.loras else 0
    template_loras = tuple(
        LoRA(np.zeros((r, builder.d)), np.zeros((builder.d, r)), 1.0, t) for t in targets
    )
    template = base.with_lora(template_loras or None)
    dtype = builder.dtype
    ts_arr = jnp.asarray(ts, dtype)

    def where(f):  # index by the static slot count: an empty tuple is no node
        los = [f.loras[i] for i in range(len(targets))]
        return [f.beta] + [lo.alpha for lo in los] + [a for lo in los for a in (lo.A, lo.B)]

    def solve_span(field, y0, cfg, members):  # from 0 to t1, saved at `ts`
        t0, t_end = jnp.asarray(0.0, dtype), jnp.asarray(t1, dtype)
        return solve_one(field, y0, t0, t_end, None, ts_arr, cfg, members=members)

    def point(inp, stacked: bool = False):
        """One point's solve; `stacked`: a chunk of points (leading axis) as one solve of
        the stacked state (fixed steps, `_simulate._Members`)."""
        leaves = [inp["beta"]]
        for _ in targets:
            leaves.append(inp["alpha"])
        for t in targets:
            leaves += [inp[f"A_{t}"], inp[f"B_{t}"]]
        field = eqx.tree_at(where, template, leaves)
        axes = eqx.tree_at(
            where,
            jax.tree.map(lambda _: None, template),
            [0] * len(leaves),
            is_leaf=lambda x: x is None,
        )
        y0 = inp["x0"]
        if sphere:
            y0 = unit_rows(y0)
        if pair and not shared:
            no_lora = lambda f: eqx.tree_at(lambda f: f.loras, f, ())
            field = _PairField(no_lora(field), field)
            axes = _PairField(no_lora(axes), axes)
            y0 = jnp.stack([y0, y0], axis=-3)
        if stacked:
            field = Members(field, axes, 1, 0)
        ys, status, steps, _ = solve_span(field, y0, cfg, int(stacked))
        if shared:  # the reference summaries, from the shared run's saved tokens
            ys = _reference_summaries(ys, inp["ref"], names, pair_fn, lead=int(stacked))
            status = jnp.where(status == STATUS_OK, inp["ref_status"], status)
        return {**{f"summary_{k}": v for k, v in ys.items()}, "status": status, "num_steps": steps}

    ref_cfg = dataclasses.replace(cfg, save_fn=lambda t, y, args: y)

    def reference(inp):
        """A group of unperturbed runs (fixed steps, one stacked solve): their tokens at
        the save times and their status."""
        beta = lambda f: f.beta
        field = eqx.tree_at(beta, base, inp["beta"])
        axes = eqx.tree_at(beta, jax.tree.map(lambda _: None, base), 0, is_leaf=lambda x: x is None)
        y0 = unit_rows(inp["x0"]) if sphere else inp["x0"]
        ys, status, _, _ = solve_span(Members(field, axes, 1, 0), y0, ref_cfg, 1)
        return {"tokens": ys, "status": status}

    # The compiled chunk solve is kept for the process, keyed by everything it closes
    # over (the sweep's identity) and the devices: a second sweep of the same spec in one
    # process (a notebook, a benchmark) does not compile again.
    devices = list(jax.local_devices() if devices is None else devices)
    key = (sweep_id({**plan.identity(), "ts": ts}), tuple(str(dv) for dv in devices), shared)
    solves = _SOLVES.get(key)
    if solves is None:
        batch = plan.options["batch"]
        if cfg.stacked:
            solve = map_sharded(
                lambda inp: point(inp, stacked=True), devices, batch=batch, batched=True
            )
        else:  # adaptive steps: one solve per point, each with its own step control
            solve = map_sharded(point, devices, batch=batch)
        ref_solve = None
        if shared:  # groups no wider than the references need (a few are padded)
            ref_batch = padded_size(refs.count, batch)
            ref_solve = map_sharded(reference, devices, batch=ref_batch, batched=True)
        if len(_SOLVES) >= 8:
            _SOLVES.clear()
        solves = _SOLVES[key] = (solve, ref_solve)
    solve, ref_solve = solves
    shared_runs: dict[str, np.ndarray] = {}  # solved at the first chunk that needs them

    def compute(indices):
        # A short last chunk is padded (repeating its last point) only up to the next
        # power of two below the chunk size: a few shapes to compile, and a 1-point
        # sweep does not cost a full chunk. Chunks are always cut the same way, so a
        # resumed sweep computes every chunk exactly as an uninterrupted one.
        n, size = indices.size, padded_size(indices.size, plan.options["chunk"])
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

    identity = {**plan.identity(), "ts": ts}
    if not force:
        _check_previous_result(out_dir, sweep_id(identity))
    if log:
        log(
            f"sweep: {plan.n_points} points "
            f"({' × '.join(f'{k} {len(v)}' for k, v in plan.axes.items())}), "
            f"chunks of {plan.options['chunk']}, {len(solve.devices)} device(s), "
            f"summaries {', '.join(names)} at {ts.size} times"
        )
    t_start = time.perf_counter()
    flat = run_chunks(
        os.path.join(out_dir, "chunks"),
        identity,
        plan.n_points,
        plan.options["chunk"],
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
    shape = plan.shape
    result: dict[str, Any] = {"ts": np.asarray(ts, np.float64)}
    for k in names:
        a = flat[f"summary_{k}"]
        result[k] = a.reshape(shape + a.shape[1:])
    result["status"] = flat["status"].reshape(shape)
    result["num_steps"] = flat["num_steps"].reshape(shape)
    for k, v in plan.axes.items():
        result[f"grid_{k}"] = np.asarray(v)
    meta = json.dumps(
        {
            "spec": plan.spec,
            "grid": plan.axes,
            "options": plan.options,
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
        "grid_shape": list(shape),
        "axes": plan.axes,
        "summaries": names,
        "save_times": int(ts.size),
        "failed": failed,
        "devices": len(solve.devices),
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
    return result


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
