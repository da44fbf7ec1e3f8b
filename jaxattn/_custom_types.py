"""Shape-annotated array aliases used across the package (jaxtyping)."""

from typing import TypeAlias

import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

Tokens: TypeAlias = Float[Array, "n d"]
Matrix: TypeAlias = Float[Array, "d d"]
Scalar: TypeAlias = Float[Array, ""]
ScalarLike: TypeAlias = float | np.floating | Float[Array, ""]

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "Matrix",
    "PRNGKeyArray",
    "PyTree",
    "Scalar",
    "ScalarLike",
    "Tokens",
]
