"""Seeded draws that mean the same numbers in float32 and float64.

`jax.random.uniform(key, shape, float32)` and the same call in float64 use different
bits of the key's stream, so one seed names two unrelated sets of tokens (seed 7,
uniform on [−5, 5]²: first token (1.74, 4.75) in float32, (3.44, −4.55) in float64).
Every random input of the package (initial tokens, random weights, LoRA factors) is
therefore drawn in float64 and cast: a seed names one draw, and a float32 run starts
from the float64 run's numbers rounded to float32. Drawing in float64 works whether or
not 64-bit JAX is on (`jax.enable_x64` for the draw only), and inside `jit` with a
concrete key (`jax.ensure_compile_time_eval`). With a traced key (a key passed into
`jit` or `vmap`) the draw happens in the requested dtype itself: it cannot leave the
trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .validate import check_dtype, check_seed


def draw(fn: Callable[[jax.Array, jnp.dtype], jax.Array], key, dtype) -> jax.Array:
    """`fn(key, float64)` cast to `dtype`: one seed, the same numbers (to rounding) in
    either dtype. `fn` draws with `jax.random` in the dtype it is given."""
    dtype = jnp.dtype(dtype)
    if isinstance(key, Tracer):
        return fn(key, dtype)
    # a concrete key inside a trace (closed over by a jitted function): draw now, as a
    # constant of the program
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
        x = np.asarray(fn(key, jnp.dtype(jnp.float64)))
    return jnp.asarray(x, dtype)


def draw_uniform(
    key, shape: Sequence[int], dtype, low: float = 0.0, high: float = 1.0
) -> jax.Array:
    """Uniform on `[low, high)`, drawn in float64 and cast to `dtype` (`draw`)."""
    fn = lambda k, dt: jax.random.uniform(k, tuple(shape), dt, low, high)
    return draw(fn, key, dtype)


def draw_normal(key, shape: Sequence[int], dtype) -> jax.Array:
    """Standard normal, drawn in float64 and cast to `dtype` (`draw`)."""
    return draw(lambda k, dt: jax.random.normal(k, tuple(shape), dt), key, dtype)


def uniform_tokens(
    key, shape: Sequence[int], low: float = -1.0, high: float = 1.0, dtype=None
) -> jax.Array:
    """Tokens uniform on `[low, high)^d`, drawn in float64 and cast to `dtype`, so that a
    seed names the same tokens in float32 and float64 (to float32 rounding), with or
    without 64-bit JAX. The experiments draw their initial tokens this way.

    **Arguments:**

    - `key`: a seed (int) or a `jax.random.key`.
    - `shape`: `(n, d)` or `(*batch, n, d)`.
    - `low`, `high`: the interval of each coordinate.
    - `dtype`: `float32 | float64` (default: JAX's default float).

    **Returns:** an array of `shape` in `dtype`. `jax.random.uniform(key, shape, float32)`
    gives other numbers than the same call in float64 (it reads other bits of the key's
    stream); this gives the float64 numbers in both.
    """
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = jax.random.key(check_seed(int(key), "seed"))
    dtype = check_dtype(dtype or jnp.result_type(float))
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (n, d) or (*batch, n, d) with positive sizes, got {shape}")
    if not float(high) > float(low):
        raise ValueError(f"high ({high}) must exceed low ({low})")
    return draw_uniform(key, shape, dtype, float(low), float(high))
