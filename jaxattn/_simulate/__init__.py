"""Solve layer: solve options (`options`), the RK4 solver (`solvers`) and `simulate`
(`integrate`).

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .integrate import (
    STATUS_MESSAGES as STATUS_MESSAGES,
    STATUS_OK as STATUS_OK,
    Float32PrecisionWarning as Float32PrecisionWarning,
    Members as Members,
    Solution as Solution,
    rescaled_to_x as rescaled_to_x,
    simulate as simulate,
    solve_one as solve_one,
)
from .options import (
    ADJOINTS as ADJOINTS,
    SolveConfig as SolveConfig,
    SolveOptions as SolveOptions,
    Stepping as Stepping,
    fixed_step_grid as fixed_step_grid,
    get_adjoint as get_adjoint,
    solve_config as solve_config,
)
from .solvers import RK4 as RK4, SOLVERS as SOLVERS, get_solver as get_solver
