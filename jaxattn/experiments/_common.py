"""Small helpers shared by the experiments."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._base import ExperimentConfig, draw, loglog_fit as loglog_fit, nanmedian as nanmedian
from .._model import LoRA

FLOAT64_NOTE = """
    Computes in float64 whether it is called from Python or from the CLI (64-bit JAX
    is switched on for the run with `jax.enable_x64`, the process's own setting is
    restored afterwards), so both give the same numbers; `summary.json` records the
    dtype (`"dtype"`). Random inputs are drawn from the config's seeds in float64."""


def in_float64(run):
    """Run an experiment's `run()` with 64-bit JAX on (`FLOAT64_NOTE`, appended to its
    docstring)."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return run(*args, **kwargs)

    wrapper.__doc__ = (run.__doc__ or "").rstrip() + "\n" + FLOAT64_NOTE
    return wrapper


def default_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def uniform_tokens(seed: int, batch: int, n: int, d: int, low: float, high: float, dtype):
    """`batch` independent draws of n tokens in [low, high]^d, reproducible from `seed`."""
    return draw(
        lambda key, dt: jax.vmap(lambda k: jax.random.uniform(k, (n, d), dt, low, high))(
            jax.random.split(key, batch)
        ),
        jax.random.key(seed),
        dtype,
    )


def config_key(cfg: Mapping[str, Any] | ExperimentConfig, keys, parts=(), arrays=()) -> str:
    """Short hash naming a resumable chunk: the config entries that change its result, any
    extra `parts` (JSON-able) and the bytes of `arrays` (e.g. the initial tokens)."""
    import hashlib
    import json

    h = hashlib.sha256(
        json.dumps([{k: cfg[k] for k in keys}, list(parts)], sort_keys=True).encode()
    )
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, np.float64)).tobytes())
    return h.hexdigest()[:16]


def perturbation(eps, dtype) -> LoRA:
    """Stacked exact LoRAs `ΔV = diag(0, −ε)` (A = e₂ᵀ, B = −ε e₂, α = r = 1)."""
    eps = jnp.asarray(eps, dtype)
    A = jnp.broadcast_to(jnp.asarray([[0.0, 1.0]], dtype), (eps.shape[0], 1, 2))
    B = jnp.stack([jnp.zeros_like(eps), -eps], axis=-1)[:, :, None]
    return LoRA(A, B, 1.0, "V")
