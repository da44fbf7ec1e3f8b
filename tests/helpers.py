"""Shared test helpers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """Pytrees equal in structure and every array leaf close (`eqx.tree_equal`)."""
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def random_weights(key, d, *, scale=1.0):
    """Random Q, K, V (Gaussian / sqrt(d), times `scale`), float64."""
    kq, kk, kv = jax.random.split(key, 3)
    mk = lambda k: scale * jax.random.normal(k, (d, d), jnp.float64) / np.sqrt(d)  # noqa: E731
    return mk(kq), mk(kk), mk(kv)
