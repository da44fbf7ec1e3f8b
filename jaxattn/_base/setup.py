"""Process-wide JAX configuration, shared by the command line, notebooks and scripts."""

from __future__ import annotations


def setup_jax(dtype: str = "float64") -> None:
    """Configure JAX for computing in `dtype`; call it before creating any array.

    **Arguments:**

    - `dtype`: `"float64"` turns on 64-bit arrays (`jax_enable_x64`), the precision of
      the tests and the documented numbers; `"float32"` leaves JAX's default (float32)
      as it is (it does not turn 64-bit arrays off once they are on).

    **Returns:** nothing; the setting is global to the process.
    """
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
