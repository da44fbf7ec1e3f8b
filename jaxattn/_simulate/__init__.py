"""Solve layer: solve options, the RK4 tableau and `simulate`.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .integrate import (
    ADJOINTS as ADJOINTS,
    STATUS_MESSAGES as STATUS_MESSAGES,
    STATUS_OK as STATUS_OK,
    Float32PrecisionWarning as Float32PrecisionWarning,
    Members as Members,
    Solution as Solution,
    SolveConfig as SolveConfig,
    fixed_step_grid as fixed_step_grid,
    get_adjoint as get_adjoint,
    rescaled_to_x as rescaled_to_x,
    simulate as simulate,
    solve_one as solve_one,
    stepping as stepping,
)
from .solvers import RK4 as RK4, get_solver as get_solver
