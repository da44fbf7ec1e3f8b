"""Test configuration: float64, strict promotion, 4 fake CPU devices (for sharding tests),
LLVM's optimiser off (small programs compile faster)."""

import os

# Compiling is two thirds of this suite's time on a 2-core machine: XLA compiles each
# distinct program (shape, dtype, static option) once per process, and a diffrax solve is
# 1-3 s of XLA and LLVM passes. The tests run small problems, for which LLVM's optimiser
# buys nothing, so it is off (`--xla_backend_optimization_level=0`: the same HLO program,
# less optimised machine code; about a third less compile time). The docs build and the
# benchmark scripts run with XLA's defaults, and `test_simulate.py` checks that a solve
# gives the same numbers at both levels. Set XLA_FLAGS yourself to choose otherwise.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
)

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# Both xdist workers compile many of the same programs (the same solve in several test
# files), and `_release_compiled_code` below makes a worker recompile what it dropped: a
# persistent compilation cache shared by the workers turns those repeats into a load.
# It starts empty in a fresh clone (what CI and a newcomer measure) and lives in
# tests/.jax-cache (git-ignored); JAXATTN_TEST_CACHE= (empty) turns it off.
_CACHE = os.environ.get("JAXATTN_TEST_CACHE", os.path.join(os.path.dirname(__file__), ".jax-cache"))
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
try:  # newer JAX spells it as a config option
    jax.config.update("jax_num_cpu_devices", 4)
except Exception:  # pragma: no cover - older JAX uses XLA_FLAGS above
    pass

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


# Every compiled XLA CPU executable keeps its code in memory mappings of its own, and a
# pytest-xdist worker compiles thousands of programs in one process: past the kernel's
# `vm.max_map_count` (65,530 here) the next compile fails inside LLVM (measured: ~20,000
# mappings after two test files; a worker crashed with a segfault in compile ~25 minutes
# into the suite). When a process holds many mappings, drop JAX's caches of compiled
# programs and the package's own (`jaxattn.clear_caches`) so their code is unmapped;
# later tests recompile what they use.
_MAX_MAPPINGS = 20_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_code():
    yield
    if _mappings() > _MAX_MAPPINGS:
        import gc

        import jaxattn

        jaxattn.clear_caches()
        gc.collect()
