"""Spec layer: simulation spec files → field, tokens and solve options.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .spec import (
    FAMILY_KEYS as FAMILY_KEYS,
    Simulation as Simulation,
    SpecError as SpecError,
    initial_tokens as initial_tokens,
    load_spec_file as load_spec_file,
    lora_from_table as lora_from_table,
    parse_spec as parse_spec,
)
