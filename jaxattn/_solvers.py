"""Solvers by name, including the classical RK4 built on diffrax's ERK machinery."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import diffrax
import numpy as np

from ._validate import SOLVERS, check_choice

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # diffrax requires an embedded pair; RK4 has none. A zero error row, and `simulate`
    # refuses adaptive stepping with RK4 (`ADAPTIVE` below), so it is never read.
    b_error=np.zeros(4),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classical fourth-order Runge–Kutta method (Kutta 1901).

    Four stages, no embedded error estimate (fixed steps only), cubic Hermite dense
    output for `SaveAt(ts=...)`. Unlike the research code (SPEC §6), every stage
    re-evaluates attention at its own state.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar[
        Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]
    ] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


ADAPTIVE = ("heun", "tsit5", "dopri5", "dopri8")
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
