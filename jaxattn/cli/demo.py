"""`jaxattn demo [--quick] [--out DIR]`: the original run against a LoRA-perturbed one, their
divergence and the stability bound (the lora-divergence experiment without its extras)."""

from __future__ import annotations

from .._base import setup_jax


def register(sub) -> None:
    d = sub.add_parser("demo", help="original vs LoRA run, divergence and bound")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--quick", action="store_true", help="smaller, faster version")
    d.set_defaults(func=handle)


def handle(args) -> int:
    from .._base import check_output_dir

    out = check_output_dir(args.out)
    setup_jax("float64")
    from ..experiments import lora_divergence

    summary = lora_divergence.run(out, quick=args.quick, compare_targets=False, gif=False)
    print(f"figures and summary.json in {out}")
    del summary
    return 0
