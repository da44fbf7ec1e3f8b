"""Solvers by name, including a lean classical RK4 (`diffrax.AbstractSolver`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import diffrax
import jax
import numpy as np

from .._base import Array, ArrayLike, Bool, PyTree, Real, Shaped, check_choice

# diffrax's own aliases for the solver interface (`diffrax._custom_types`, private there):
# a time, the state `y` (any pytree of arrays; `"Y"` names its structure so that the new
# state is checked to have the old one's), the vector field's value and the dense output.
if TYPE_CHECKING:  # as diffrax: what static checkers can follow
    _Time = int | float | Array | np.ndarray
    _Flag = bool | Array | np.ndarray
else:
    _Time = Real[ArrayLike, ""]
    _Flag = Bool[ArrayLike, ""]
_Y = PyTree[Shaped[ArrayLike, "?*y"], "Y"]
_VF = PyTree[Shaped[ArrayLike, "?*vf"], "VF"]
_DenseInfo = dict[str, PyTree[Array]]


def _axpy(y, a, k):
    """`y + a·k` leaf by leaf (`a` a Python float: the state keeps its dtype)."""
    return jax.tree.map(lambda yi, ki: yi + a * ki, y, k)


class RK4(diffrax.AbstractSolver):
    """The classical fourth-order Runge–Kutta method (Kutta 1901).

    Four stages, no embedded error estimate (fixed steps only), cubic Hermite dense
    output for `SaveAt(ts=...)` (from the state and the first and last stage at both
    ends of the step, as diffrax's ERK solvers do with `from_k`). Unlike the research
    code, every stage re-evaluates attention at its own state.

    Written as a plain `diffrax.AbstractSolver` rather than through diffrax's
    `AbstractERK` + `ButcherTableau`: the generic ERK stacks its stages into one buffer,
    combines them through the tableau (with an error row that RK4 does not have) and
    builds its dense output from the stacked stages on every step (reported at about
    1.4× the four stages for a fixed-step batch of 256 × (64, 8); on the busy 2-core
    machine of `benchmarks/README.md` the difference stayed within the timing noise).
    Here each step is the four stages, one weighted sum and the two stages the
    interpolation needs. Adjoints, `SaveAt` and
    `StepTo` work as with any diffrax solver.
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation
    )

    def order(self, terms: PyTree[diffrax.AbstractTerm]) -> int:
        del terms
        return 4

    def init(
        self, terms: diffrax.AbstractTerm, t0: _Time, t1: _Time, y0: _Y, args: PyTree[Any]
    ) -> None:
        del terms, t0, t1, y0, args
        return None

    def step(
        self,
        terms: diffrax.AbstractTerm,
        t0: _Time,
        t1: _Time,
        y0: _Y,
        args: PyTree[Any],
        solver_state: None,
        made_jump: _Flag,
    ) -> tuple[_Y, None, _DenseInfo, None, diffrax.RESULTS]:
        del solver_state, made_jump
        tm = t0 + 0.5 * (t1 - t0)
        control = terms.contr(t0, t1)  # k_i = f(t_i, y_i)·(t1 − t0), as in diffrax's ERKs
        k1 = terms.vf_prod(t0, y0, args, control)
        k2 = terms.vf_prod(tm, _axpy(y0, 0.5, k1), args, control)
        k3 = terms.vf_prod(tm, _axpy(y0, 0.5, k2), args, control)
        k4 = terms.vf_prod(t1, _axpy(y0, 1.0, k3), args, control)
        y1 = jax.tree.map(
            lambda y, a, b, c, d: y + ((a + d) * (1 / 6) + (b + c) * (1 / 3)), y0, k1, k2, k3, k4
        )
        dense_info = dict(y0=y0, y1=y1, k0=k1, k1=k4)
        return y1, None, dense_info, None, diffrax.RESULTS.successful

    def func(self, terms: diffrax.AbstractTerm, t0: _Time, y0: _Y, args: PyTree[Any]) -> _VF:
        return terms.vf(t0, y0, args)


SOLVERS = ("euler", "heun", "rk4", "tsit5", "dopri5", "dopri8")
ORDERS = {"euler": 1, "heun": 2, "rk4": 4, "tsit5": 5, "dopri5": 5, "dopri8": 8}


def get_solver(name: str) -> diffrax.AbstractSolver:
    """`euler | heun | rk4 | tsit5 | dopri5 | dopri8` → a diffrax solver instance."""
    name = check_choice(name, "solver", SOLVERS)
    return {
        "euler": diffrax.Euler,
        "heun": diffrax.Heun,
        "rk4": RK4,
        "tsit5": diffrax.Tsit5,
        "dopri5": diffrax.Dopri5,
        "dopri8": diffrax.Dopri8,
    }[name]()
