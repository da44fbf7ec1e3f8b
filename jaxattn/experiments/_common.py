"""Small helpers shared by the experiments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._base import ExperimentConfig, loglog_fit as loglog_fit, nanmedian as nanmedian
from .._model import LoRA


def default_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def uniform_tokens(seed: int, batch: int, n: int, d: int, low: float, high: float, dtype):
    """`batch` independent draws of n tokens in [low, high]^d, reproducible from `seed`."""
    keys = jax.random.split(jax.random.key(seed), batch)
    return jax.vmap(lambda k: jax.random.uniform(k, (n, d), dtype, low, high))(keys)


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
