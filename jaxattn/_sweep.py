"""Sweeps: a grid of simulations run as resumable chunks of vmapped, sharded solves.

Two layers:

- `run_chunks` — the engine: points `0 … P−1` in chunks of a fixed size; each finished
  chunk is one `.npz` written atomically under `chunk_dir`, next to a `manifest.json`
  naming the sweep. A rerun skips finished chunks, so a killed sweep resumes, and the
  assembled arrays are identical to those of an uninterrupted run (every chunk is the
  same computation on the same inputs, whoever ran it). Several processes
  (`jax.distributed`) share the chunks round-robin. The experiments use this directly.
- `sweep` — a simulation spec (`_spec.py`) plus a `[grid]` section: the Cartesian
  product of the grid values, each point one solve whose summaries (diffrax
  `SaveAt(fn=...)`, not whole trajectories) are saved at fixed times. A chunk is one
  `shard_map` over the local devices of a `vmap` over its points.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._attention import exact_row_max, use_blockwise
from ._fields import AbstractField
from ._io import (
    check_output_dir,
    create_exclusive_json,
    json_default,
    output_lock,
    remove_stale_temporaries,
    write_json,
    write_npz,
)
from ._lora import LoRA
from ._metrics import cluster_count, divergence, hausdorff, pairwise_distances, unit_rows
from ._simulate import (
    STATUS_MESSAGES,
    STATUS_OK,
    Members,
    SolveConfig,
    get_adjoint,
    solve_one,
    stepping,
)
from ._spec import SpecError, initial_tokens, lora_from_table, parse_spec
from ._validate import SEED_MAX, TARGETS, check_int, check_memory, check_positive

MANIFEST = "manifest.json"


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message is one line."""


# ----------------------------------------------------------------------------- engine
def sweep_id(identity: dict) -> str:
    """Stable short hash of everything that determines a sweep's chunk contents."""
    text = json.dumps(identity, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chunk_path(chunk_dir: str, c: int) -> str:
    return os.path.join(chunk_dir, f"chunk-{c:06d}.npz")


def _existing_chunks(chunk_dir: str) -> list[str]:
    if not os.path.isdir(chunk_dir):
        return []
    return sorted(f for f in os.listdir(chunk_dir) if f.startswith("chunk-") and f.endswith(".npz"))


def prepare_chunk_dir(chunk_dir: str, identity: dict, n_points: int, chunk: int) -> dict:
    """Check (or create) `chunk_dir` for this sweep; never touches another sweep's files.

    Raises `SweepError` when the folder holds chunks of a different sweep (other
    identity or chunk size) or chunk files without a manifest.
    """
    _check_chunking(n_points, chunk)
    manifest = {
        "sweep_id": sweep_id({**identity, "chunk": int(chunk)}),
        "n_points": int(n_points),
        "chunk": int(chunk),
        "n_chunks": math.ceil(n_points / chunk),
    }
    path = os.path.join(chunk_dir, MANIFEST)
    for _ in range(2):
        if os.path.exists(path):
            _check_manifest(path, chunk_dir, manifest, chunk, n_points)
            return manifest
        if _existing_chunks(chunk_dir):
            raise SweepError(
                f"{chunk_dir} holds chunk files but no {MANIFEST}; choose "
                "another output folder or remove them"
            )
        os.makedirs(chunk_dir, exist_ok=True)
        # Created only if absent, complete before it appears: of two sweeps started
        # together into one folder, one creates it and the other then finds it and
        # compares (never both checking an empty folder, then both writing).
        if create_exclusive_json(path, {**manifest, "identity": identity}):
            return manifest
    raise SweepError(f"{path} appeared and vanished while starting; retry")  # pragma: no cover


def _check_chunking(n_points: int, chunk) -> None:
    if n_points < 1:
        raise SweepError("the sweep has no points")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise SweepError(f"chunk size must be a positive integer, got {chunk!r}")


def _check_manifest(path, chunk_dir, manifest, chunk, n_points) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError):
        raise SweepError(
            f"{path} is not a readable sweep manifest; use another output folder"
        ) from None
    if old.get("sweep_id") != manifest["sweep_id"]:
        why = (
            f"chunk size {old.get('chunk')} there, {chunk} here"
            if old.get("chunk") != chunk and old.get("n_points") == n_points
            else "different spec or grid"
        )
        raise SweepError(
            f"{chunk_dir} holds chunks of a different sweep ({why}); choose "
            "another output folder or remove it"
        )


def _resolve_process(process_index, process_count) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    for v, name in ((pi, "process index"), (pc, "process count")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise SweepError(f"{name} must be an integer, got {v!r}")
    if pc < 1:
        raise SweepError(f"process count must be ≥ 1, got {pc}")
    if not 0 <= pi < pc:
        raise SweepError(f"process index {pi} is not in 0 … {pc - 1}")
    return int(pi), int(pc)


def _read_chunk(path: str, expect: np.ndarray) -> dict[str, np.ndarray] | str:
    """The arrays of the chunk file at `path` (without `index`) if it is readable and
    holds the points `expect`, else why not (a string)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}  # a truncated file fails here
    except Exception as e:
        return (str(e).splitlines() or [type(e).__name__])[0][:80] or type(e).__name__
    index = arrays.pop("index", None)
    if index is None:
        return "no index"
    if not np.array_equal(index, expect):
        return "other points"
    return arrays


def run_chunks(
    chunk_dir: str,
    identity: dict,
    n_points: int,
    chunk: int,
    compute: Callable[[np.ndarray], dict[str, np.ndarray]],
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    desc: str = "chunks",
    process_index: int | None = None,
    process_count: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray] | None:
    """Run `compute(indices) -> {name: array with leading axis len(indices)}` over the
    points `0 … n_points−1` in chunks of `chunk`, resumably.

    - `identity`: JSON-able description of everything that changes the results; chunks
      of another identity in `chunk_dir` are an error (`SweepError`), never overwritten.
    - Finished chunks (`chunk-NNNNNN.npz`, written atomically) are loaded, not recomputed.
    - `process_index`/`process_count` (default: `jax.process_index()`/`process_count()`):
      process `i` computes chunks `c ≡ i (mod count)`; all share `chunk_dir`.
    - `progress`: a tqdm bar over the chunks (stderr); `log` gets one line per chunk
      when the bar is off, and a final line either way (None: silent).
    - `on_chunk(c)` is called after chunk `c` is written (tests use it to interrupt).

    **Returns** the concatenated arrays (leading axis `n_points`) once every chunk exists,
    or None when chunks of other processes are still missing.
    """
    pi, pc = _resolve_process(process_index, process_count)  # before anything is written
    _check_chunking(n_points, chunk)
    os.makedirs(chunk_dir, exist_ok=True)
    with output_lock(chunk_dir, f"-p{pi}"):
        return _run_chunks_locked(
            chunk_dir, identity, n_points, chunk, compute, progress, log, desc, pi, pc, on_chunk
        )


def _run_chunks_locked(
    chunk_dir, identity, n_points, chunk, compute, progress, log, desc, pi, pc, on_chunk
):
    manifest = prepare_chunk_dir(chunk_dir, identity, n_points, chunk)
    n_chunks = manifest["n_chunks"]
    remove_stale_temporaries(chunk_dir)
    mine = [c for c in range(n_chunks) if c % pc == pi]
    todo = []
    for c in mine:
        path = _chunk_path(chunk_dir, c)
        if not os.path.exists(path):
            todo.append(c)
            continue
        got = _read_chunk(path, _chunk_indices(c, chunk, n_points))
        if isinstance(got, str):  # truncated or foreign file: recompute it, and say so
            if log:
                log(f"{desc}: {os.path.basename(path)} is damaged ({got}); recomputing it")
            todo.append(c)
    done_before = len(mine) - len(todo)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(mine), initial=done_before, desc=desc, unit="chunk", dynamic_ncols=True
        )
    elif log and done_before:
        log(f"{desc}: {done_before} of {len(mine)} chunks done earlier, skipped")
    t_start = time.perf_counter()
    try:
        for k, c in enumerate(todo):
            idx = _chunk_indices(c, chunk, n_points)
            t0 = time.perf_counter()
            out = compute(idx)
            arrays = {name: np.asarray(a) for name, a in out.items()}
            for name, a in arrays.items():
                if a.shape[:1] != (idx.size,):
                    raise ValueError(
                        f"chunk output {name!r} has shape {a.shape}; expected a "
                        f"leading axis of {idx.size} points"
                    )
            write_npz(_chunk_path(chunk_dir, c), index=idx, **arrays)
            dt = time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix_str(f"{idx.size / dt:.3g} points/s", refresh=False)
                bar.update(1)
            elif log:
                log(
                    f"{desc}: chunk {done_before + k + 1}/{len(mine)} ({idx.size} points) "
                    f"in {dt:.2f} s"
                )
            if on_chunk is not None:
                on_chunk(c)
    finally:
        if bar is not None:
            bar.close()
    if log and todo:
        log(f"{desc}: {len(todo)} chunks computed in {time.perf_counter() - t_start:.1f} s")
    return load_chunks(chunk_dir, n_points, chunk)


def _chunk_indices(c: int, chunk: int, n_points: int) -> np.ndarray:
    return np.arange(c * chunk, min(n_points, (c + 1) * chunk))


def load_chunks(chunk_dir: str, n_points: int, chunk: int) -> dict[str, np.ndarray] | None:
    """Concatenate all chunks in order, or None if any is missing."""
    n_chunks = math.ceil(n_points / chunk)
    paths = [_chunk_path(chunk_dir, c) for c in range(n_chunks)]
    if not all(os.path.exists(p) for p in paths):
        return None
    parts: dict[str, list] = {}
    for c, p in enumerate(paths):
        got = _read_chunk(p, _chunk_indices(c, chunk, n_points))
        if isinstance(got, str):
            raise SweepError(f"{p} is damaged ({got}); rerun the sweep to recompute it")
        for name, a in got.items():
            parts.setdefault(name, []).append(a)
    return {name: np.concatenate(v, axis=0) for name, v in parts.items()}


# ------------------------------------------------------------------- sharded solving
def _shard_map():
    if hasattr(jax, "shard_map"):
        return jax.shard_map, "check_vma"
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older JAX

    return shard_map, "check_rep"  # pragma: no cover


DEFAULT_BATCH = 64


def map_sharded(
    fn: Callable, devices=None, batch: int = DEFAULT_BATCH, *, batched: bool = False
) -> Callable:
    """`fn` applied point by point to arguments with a leading points axis, split across
    `devices` (default: all local devices) with `shard_map`.

    Each device walks through its share in groups of exactly `batch` points (a
    `lax.map` over groups, each group one `vmap` of width `batch`); the points are
    padded up to a multiple of `batch × devices` (the padding is dropped). Every point
    is therefore computed by the same compiled group program whatever the number of
    devices: XLA's arithmetic depends on the vmapped width (a width of 256 and one of 64
    round differently, and a chaotic solve amplifies that), so a fixed width is what makes
    the results independent of how a chunk is split across devices. The results depend
    on `batch` (at the level of rounding) and on the device kind, not on the count.

    `batched=True`: `fn` itself takes a leading axis of `batch` points (no `vmap` is
    added), e.g. one solve of the stacked state of a whole group.
    """
    from jax.sharding import PartitionSpec as P

    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    batch = int(batch)
    devices = list(jax.local_devices() if devices is None else devices)
    nd = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("points",))
    shard_map, check_kw = _shard_map()
    group = fn if batched else jax.vmap(fn)

    def per_device(*args):
        k = jax.tree.leaves(args)[0].shape[0] // batch
        grouped = jax.tree.map(lambda a: a.reshape((k, batch) + a.shape[1:]), args)
        with exact_row_max():  # a vmapped blockwise kernel: no per-block `cond`
            out = jax.lax.map(lambda g: group(*g), grouped)
        return jax.tree.map(lambda a: a.reshape((k * batch,) + a.shape[2:]), out)

    no_check: dict[str, Any] = {check_kw: False}  # the option's name depends on the JAX version
    sharded = jax.jit(
        shard_map(per_device, mesh=mesh, in_specs=P("points"), out_specs=P("points"), **no_check)
    )

    def run(*args):
        n = jax.tree.leaves(args)[0].shape[0]
        pad = (-n) % (nd * batch)
        if pad:
            args = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]), args)
        out = sharded(*args)
        return jax.tree.map(lambda a: np.asarray(a)[:n], out)

    run.devices = devices
    run.batch = batch
    return run


_SOLVES: dict = {}


def padded_size(n: int, chunk: int) -> int:
    """Points a chunk of `n ≤ chunk` points is solved as: `chunk`, or the next power of
    two when that is smaller (compiled shapes: the chunk size and at most log₂ of it)."""
    return min(chunk, 1 << max(0, n - 1).bit_length())


# -------------------------------------------------------------------- spec + [grid]
GRID_KEYS = ("beta", "init.seed", "lora.norm", "lora.seed", "lora.target", "lora.alpha")
SWEEP_KEYS = {"chunk", "batch", "summaries", "save_points", "cluster_threshold"}
SUMMARIES = ("divergence", "hausdorff", "clusters", "diameter", "mean", "tokens")
_NEEDS_REFERENCE = ("divergence", "hausdorff")


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
    if any(s in _NEEDS_REFERENCE for s in summaries) and not has_lora:
        raise SweepError(
            "summaries divergence/hausdorff compare with the unperturbed run "
            "and need a [lora] section"
        )
    options = {
        "chunk": _pos_int(opts_raw.get("chunk", 64), "sweep chunk"),
        "batch": _pos_int(opts_raw.get("batch", DEFAULT_BATCH), "sweep batch"),
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

    def inputs(self, indices) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"x0": [], "beta": []}
        for t in self.targets:
            cols[f"A_{t}"], cols[f"B_{t}"] = [], []
        cols["alpha"] = []
        for p in indices:
            a = self.plan.assignment(int(p))
            cols["x0"].append(self.x0(a))
            cols["beta"].append(a.get("beta", self.plan.spec.get("beta", 1.0)))
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


def sweep(
    spec: dict | SweepPlan,
    out_dir,
    *,
    devices=None,
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
    pi, pc = _resolve_process(process_index, process_count)
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
    pair = any(s in _NEEDS_REFERENCE for s in names)
    save_fn = _summary_fn(names, plan.options["cluster_threshold"], sphere, pair)
    cfg, ts = _solve_config(
        sim0.solve, sphere, sim0.t1, plan.options["save_points"], save_fn, builder.dtype
    )
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
        if pair:
            no_lora = lambda f: eqx.tree_at(lambda f: f.loras, f, ())
            field = _PairField(no_lora(field), field)
            axes = _PairField(no_lora(axes), axes)
            y0 = jnp.stack([y0, y0], axis=-3)
        if stacked:
            field = Members(field, axes, 1, 0)
        ys, status, steps, _ = solve_one(
            field,
            y0,
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            None,
            ts_arr,
            cfg,
            members=int(stacked),
        )
        return {**{f"summary_{k}": v for k, v in ys.items()}, "status": status, "num_steps": steps}

    # The compiled chunk solve is kept for the process, keyed by everything it closes
    # over (the sweep's identity) and the devices: a second sweep of the same spec in one
    # process (a notebook, a benchmark) does not compile again.
    devices = list(jax.local_devices() if devices is None else devices)
    key = (sweep_id({**plan.identity(), "ts": ts}), tuple(str(dv) for dv in devices))
    solve = _SOLVES.get(key)
    if solve is None:
        if cfg.stacked:
            solve = map_sharded(
                lambda inp: point(inp, stacked=True),
                devices,
                batch=plan.options["batch"],
                batched=True,
            )
        else:  # adaptive steps: one solve per point, each with its own step control
            solve = map_sharded(point, devices, batch=plan.options["batch"])
        if len(_SOLVES) >= 8:
            _SOLVES.clear()
        _SOLVES[key] = solve

    def compute(indices):
        # A short last chunk is padded (repeating its last point) only up to the next
        # power of two below the chunk size: a few shapes to compile, and a 1-point
        # sweep does not cost a full chunk. Chunks are always cut the same way, so a
        # resumed sweep computes every chunk exactly as an uninterrupted one.
        n, size = indices.size, padded_size(indices.size, plan.options["chunk"])
        idx = np.concatenate([indices, np.repeat(indices[-1:], size - n)]) if n < size else indices
        return {k: v[:n] for k, v in solve(builder.inputs(idx)).items()}

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
    from . import plotting

    if plotting.sweep_overview(result, list(plan.axes), names, os.path.join(out_dir, "sweep.png")):
        summary["figure"] = "sweep.png"
    write_json(os.path.join(out_dir, "summary.json"), summary)
    if log:
        log(
            f"sweep: wrote {os.path.join(out_dir, 'result.npz')} "
            f"({plan.n_points - sum(failed.values())} ok, {sum(failed.values())} failed)"
        )
    return result


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
