"""Shared test helpers."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def random_weights(key, d, *, scale=1.0):
    """Random Q, K, V (Gaussian / sqrt(d), times `scale`), float64."""
    kq, kk, kv = jax.random.split(key, 3)
    mk = lambda k: scale * jax.random.normal(k, (d, d), jnp.float64) / np.sqrt(d)
    return mk(kq), mk(kk), mk(kv)


@contextlib.contextmanager
def unchecked():
    """Runtime type checks (pyproject's `--jaxtyping-packages`) off inside the block.

    For the tests of a function's own input validation where the annotation already
    excludes the input (a non-square Q, a batch where one configuration is annotated):
    with the checks on, jaxtyping refuses the call first (a `TypeCheckError`); the
    function's `ValueError` is what a caller sees without them, and what these tests
    check."""
    import jaxtyping

    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)
