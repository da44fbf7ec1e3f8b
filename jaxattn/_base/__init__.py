"""Base layer: types, one-line validation, atomic I/O, JAX set-up, statistics, typed configs.

The names below are the internal surface other layers import; public names are exported
by `jaxattn`.
"""

from .caches import clear_caches as clear_caches, register_cache as register_cache
from .config import (
    ExperimentConfig as ExperimentConfig,
    coerce as coerce,
    plain_hints as plain_hints,
)
from .custom_types import (
    Array as Array,
    ArrayLike as ArrayLike,
    Bool as Bool,
    Device as Device,
    Float as Float,
    Int as Int,
    PRNGKeyArray as PRNGKeyArray,
    PyTree as PyTree,
    Real as Real,
    ScalarLike as ScalarLike,
    Shaped as Shaped,
)
from .io import (
    OutputBusyError as OutputBusyError,
    OutputLockError as OutputLockError,
    atomic_path as atomic_path,
    check_input_file as check_input_file,
    check_output_dir as check_output_dir,
    check_output_file as check_output_file,
    create_exclusive_json as create_exclusive_json,
    json_default as json_default,
    output_lock as output_lock,
    read_regular_file as read_regular_file,
    remove_stale_temporaries as remove_stale_temporaries,
    save_figure as save_figure,
    write_atomic as write_atomic,
    write_json as write_json,
    write_npz as write_npz,
    write_text as write_text,
)
from .random import (
    draw as draw,
    draw_normal as draw_normal,
    draw_uniform as draw_uniform,
    uniform_tokens as uniform_tokens,
)
from .setup import setup_jax as setup_jax
from .stats import loglog_fit as loglog_fit, nanmedian as nanmedian
from .validate import (
    DTYPES as DTYPES,
    SEED_MAX as SEED_MAX,
    as_float_array as as_float_array,
    check_choice as check_choice,
    check_dtype as check_dtype,
    check_finite as check_finite,
    check_int as check_int,
    check_memory as check_memory,
    check_number as check_number,
    check_positive as check_positive,
    check_seed as check_seed,
    check_square as check_square,
    check_tokens as check_tokens,
    is_number as is_number,
)
