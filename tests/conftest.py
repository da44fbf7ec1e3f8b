"""Test configuration: float64, strict promotion, 4 fake CPU devices (for sharding tests)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
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
