"""Experiments: one module per paper figure, each a thin `run(out_dir, quick=False, ...)`
that calls `simulate`, the metrics and `plotting`, and returns what goes in
`summary.json`."""

from . import lora_divergence as lora_divergence

EXPERIMENTS = {"lora-divergence": lora_divergence}
