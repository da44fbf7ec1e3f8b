"""Argument checks at the package boundary, each failing with a one-line message.

The inner numerics assume valid input; everything a user passes in goes through here
first (public constructors, `simulate`, the spec parser). Checks on values are done only
on concrete arrays: inside `jit`/`vmap` they are skipped (shapes are still checked).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

DTYPES = ("float32", "float64")


def _is_concrete(x) -> bool:
    return not isinstance(x, Tracer)


def as_float_array(value, name: str, dtype=None):
    """Turn nested lists / arrays into a float array; ragged input is a ValueError."""
    if isinstance(value, jax.Array):
        arr = value
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            if arr.dtype == bool:
                raise TypeError(f"{name} must be numbers, got booleans")
            if jnp.issubdtype(arr.dtype, jnp.integer):
                arr = arr.astype(dtype or jnp.result_type(float))
            else:
                raise TypeError(f"{name} must be a real floating-point array, got {arr.dtype}")
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:  # ragged lists
            raise ValueError(f"{name} is ragged or not numeric: {_short(e)}") from None
        if arr.dtype == object:
            raise ValueError(f"{name} is ragged or not numeric")
        if arr.dtype.kind == "b":
            raise TypeError(f"{name} must be numbers, got booleans")
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            big = np.abs(arr[np.isfinite(arr)]) if arr.size else arr
            limit = float(jnp.finfo(dtype).max)
            if big.size and float(big.max()) > limit:  # the cast would make it inf
                raise ValueError(
                    f"{name} holds values up to {float(big.max()):.3g}, beyond "
                    f"{jnp.dtype(dtype).name}'s largest number {limit:.3g}"
                )
    if dtype is not None:
        arr = jnp.asarray(arr, dtype=dtype)
    return arr


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def check_finite(arr, name: str) -> None:
    if _is_concrete(arr) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name} contains NaN or inf")


def check_tokens(x, name: str = "x0", *, batch_ok: bool = True) -> None:
    shape = tuple(x.shape)
    if len(shape) < 2 or (not batch_ok and len(shape) != 2):
        want = "(n, d)" if not batch_ok else "(n, d) or (batch..., n, d)"
        raise ValueError(f"{name} must have shape {want}, got {shape}")
    if shape[-2] == 0:
        raise ValueError(f"{name} has no tokens (n = 0)")
    if shape[-1] == 0:
        raise ValueError(f"{name} has dimension d = 0")
    check_finite(x, name)


def check_square(W, name: str, d: int | None = None) -> None:
    shape = tuple(W.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name} must be a square d×d matrix, got shape {shape}")
    if d is not None and shape[0] != d:
        raise ValueError(f"{name} is {shape[0]}×{shape[1]} but the tokens have d = {d}")
    check_finite(W, name)


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    canon = {c.lower(): c for c in choices}
    if not isinstance(value, str) or value.lower() not in canon:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return canon[value.lower()]


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    if not is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        rel = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {rel}, got {value!r}")
    return v


def is_number(value) -> bool:
    """A real number: a Python/NumPy int or float, or a 0-d real array; not a bool or a
    string (`float("10")` would accept one)."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    return (
        shape == ()
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.number)
        and not (jnp.issubdtype(dtype, jnp.complexfloating))
    )


def check_number(value, name: str) -> float:
    """A finite real number (a bool or a numeric string is not one), as a float."""
    if not is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


SEED_MAX = 2**63 - 1  # jax.random.key takes a signed 64-bit seed


def check_seed(value, name: str) -> int:
    v = check_int(value, name, 0)
    if v > SEED_MAX:
        raise ValueError(f"{name} must be ≤ 2**63 − 1, got {v}")
    return v


def check_int(value, name: str, minimum: int = 0) -> int:
    """An integer (not a bool, not a float like 2.5 or 2.0) ≥ `minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


# ----------------------------------------------------------------- memory limits
MEMORY_ENV = "JAXATTN_MAX_MEMORY"


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 2**30


def parse_bytes(text: str) -> int:
    """`"16G"`, `"512MiB"`, `"2e9"` → bytes."""
    t = str(text).strip().upper().replace("IB", "").rstrip("B").strip()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    if scale > 1:
        t = t[:-1]
    try:
        v = float(t) * scale
    except ValueError:
        raise ValueError(f"{MEMORY_ENV} must be a size like 16G or 2e9, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{MEMORY_ENV} must be a positive size, got {text!r}")
    return int(v)


def max_memory() -> int:
    """The memory one allocation of the package may ask for: `$JAXATTN_MAX_MEMORY` if
    set (e.g. `64G`), else half of the machine's physical memory."""
    env = os.environ.get(MEMORY_ENV)
    return parse_bytes(env) if env else _physical_memory() // 2


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def check_memory(nbytes: float, what: str) -> None:
    """Refuse, before allocating, work whose estimated memory exceeds `max_memory()`."""
    limit = max_memory()
    if not math.isfinite(nbytes) or nbytes > limit:
        size = "an unbounded amount" if not math.isfinite(nbytes) else format_bytes(nbytes)
        raise ValueError(
            f"{what} needs {size} of memory, over the limit of "
            f"{format_bytes(limit)} (set {MEMORY_ENV} to raise it)"
        )


def check_dtype(dtype) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    check_choice(name, "dtype", DTYPES)
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            'dtype float64 needs 64-bit JAX: call jaxattn.setup_jax("float64") before '
            'creating arrays, or pass dtype="float32"'
        )
    return jnp.dtype(name)
