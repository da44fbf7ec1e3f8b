"""The package's own caches of compiled programs and per-call constants, and one call that
empties them all with JAX's (as `equinox.clear_caches` does for equinox's)."""

from __future__ import annotations

from typing import Any

_CACHES: list[dict[Any, Any]] = []


def register_cache(cache: dict[Any, Any]) -> dict[Any, Any]:
    """Register a module-level cache (a dict) so that `clear_caches` empties it; returns
    it, so a module writes `_SOLVES = register_cache({})`."""
    _CACHES.append(cache)
    return cache


def clear_caches() -> None:
    """Empty every compile cache: JAX's (`jax.clear_caches`, which also drops the
    programs compiled by `eqx.filter_jit`) and jaxattn's own (the sweep's compiled solves,
    `simulate`'s step grids and adjoints, the float32 precision check's eigenvalues).

    Useful in a long session or a test suite that compiles thousands of programs: each
    compiled CPU program keeps memory mappings of its own until it is dropped. Later calls
    compile again what they need; results do not change.
    """
    import jax

    for cache in _CACHES:
        cache.clear()
    jax.clear_caches()
