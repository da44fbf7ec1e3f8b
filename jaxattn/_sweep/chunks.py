"""Resumable chunks, the sweep engine: points `0 … P−1` in chunks of a fixed size.

Each finished chunk is one `.npz` written atomically under `chunk_dir`, next to a
`manifest.json` naming the sweep. A rerun skips finished chunks, so a killed sweep resumes,
and the assembled arrays are identical to those of an uninterrupted run (every chunk is the
same computation on the same inputs, whoever ran it). Several processes (`jax.distributed`)
share the chunks round-robin. The experiments and the grid sweep (`runner.py`) use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from .._base import (
    create_exclusive_json,
    json_default,
    output_lock,
    remove_stale_temporaries,
    write_npz,
)

MANIFEST = "manifest.json"


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message is one line."""


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
            _check_manifest(path, chunk_dir, manifest, identity, chunk, n_points)
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


def _difference(old, new, where: str = "") -> str | None:
    """The first entry in which two sweep identities (as JSON reads them back) differ,
    as `what: A there, B here`, looking into nested tables; None if none is found."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            name = f"{where}.{k}" if where else k
            if k not in old or k not in new:
                return f"{name} only {'here' if k in new else 'there'}"
            found = _difference(old[k], new[k], name)
            if found:
                return found
        return None
    if old == new:
        return None

    def show(v):
        t = json.dumps(v)
        return t if len(t) <= 40 else t[:37] + "..."

    return f"{where or 'identity'}: {show(old)} there, {show(new)} here"


def _check_manifest(path, chunk_dir, manifest, identity, chunk, n_points) -> None:
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
        if old.get("chunk") != chunk and old.get("n_points") == n_points:
            why = f"chunk size {old.get('chunk')} there, {chunk} here"
        else:
            new = json.loads(json.dumps(identity, default=json_default))
            why = _difference(old.get("identity"), new) or "different spec or grid"
        raise SweepError(
            f"{chunk_dir} holds chunks of a different sweep ({why}); choose "
            "another output folder or remove it"
        )


def resolve_process(process_index, process_count) -> tuple[int, int]:
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
    pi, pc = resolve_process(process_index, process_count)  # before anything is written
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
