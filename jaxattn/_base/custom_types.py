"""Shape-annotated array aliases used across the package (jaxtyping)."""

from typing import TYPE_CHECKING, Any, TypeAlias

import jax
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Real, Shaped

Tokens: TypeAlias = Float[Array, "n d"]
Matrix: TypeAlias = Float[Array, "d d"]
Scalar: TypeAlias = Float[Array, ""]
ScalarLike: TypeAlias = float | np.floating | Float[Array, ""]

if TYPE_CHECKING:  # jaxlib ships no stub for its Device class
    Device: TypeAlias = Any
else:
    Device = jax.Device

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Device",
    "Float",
    "Int",
    "Matrix",
    "PRNGKeyArray",
    "PyTree",
    "Real",
    "Scalar",
    "ScalarLike",
    "Shaped",
    "Tokens",
]
