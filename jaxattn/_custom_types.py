"""Shape-annotated array aliases used across the package (jaxtyping)."""

from typing import TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int

Tokens: TypeAlias = Float[Array, "n d"]
Matrix: TypeAlias = Float[Array, "d d"]
Scalar: TypeAlias = Float[Array, ""]
ScalarLike: TypeAlias = float | Float[ArrayLike, ""]

__all__ = ["Array", "ArrayLike", "Bool", "Float", "Int", "Matrix", "Scalar", "ScalarLike", "Tokens"]
