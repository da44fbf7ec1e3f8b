"""Sweep layer: the grid plan, resumable chunks, device sharding and the runner.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .chunks import SweepError as SweepError, run_chunks as run_chunks, sweep_id as sweep_id
from .grid import SweepPlan as SweepPlan, parse_sweep as parse_sweep
from .runner import sweep as sweep
from .sharding import map_sharded as map_sharded
