"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np


def random_weights(key, d, *, scale=1.0):
    """Random Q, K, V (Gaussian / sqrt(d), times `scale`), float64."""
    kq, kk, kv = jax.random.split(key, 3)
    mk = lambda k: scale * jax.random.normal(k, (d, d), jnp.float64) / np.sqrt(d)
    return mk(kq), mk(kk), mk(kv)
