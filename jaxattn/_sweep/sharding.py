"""`map_sharded`: a function applied point by point across the local devices
(`shard_map` of a `lax.map` over fixed-width `vmap` groups), and the padded chunk sizes
the sweeps compile for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from .._base import Device
from .._model import exact_row_max


def _shard_map():
    if hasattr(jax, "shard_map"):
        return jax.shard_map, "check_vma"
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older JAX

    return shard_map, "check_rep"  # pragma: no cover


DEFAULT_BATCH = 64


def map_sharded(
    fn: Callable,
    devices: Sequence[Device] | None = None,
    batch: int | np.integer = DEFAULT_BATCH,
    *,
    batched: bool = False,
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


def padded_size(n: int, chunk: int) -> int:
    """Points a chunk of `n ≤ chunk` points is solved as: `chunk`, or the next power of
    two when that is smaller (compiled shapes: the chunk size and at most log₂ of it)."""
    return min(chunk, 1 << max(0, n - 1).bit_length())
