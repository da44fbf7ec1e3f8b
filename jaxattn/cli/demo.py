"""`jaxattn demo [--quick] [--out DIR]`: the original run against a LoRA-perturbed one, their
divergence and the stability bound (the lora-divergence experiment without its extras)."""

from __future__ import annotations

from .._base import setup_jax


def register(sub) -> None:
    d = sub.add_parser("demo", help="original vs LoRA run, divergence and bound")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--quick", action="store_true", help="smaller, faster version")
    d.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that holds files the demo did not write there",
    )
    d.set_defaults(func=handle)


def handle(args) -> int:
    from ..experiments import lora_divergence
    from .reproduce import experiment_out

    # the demo is the lora-divergence experiment without its extras
    with experiment_out(args.out, lora_divergence.NAME, "jaxattn demo", args.force) as out:
        setup_jax("float64")
        summary = lora_divergence.run(
            out, quick=args.quick, compare_targets=False, gif=False, horizon_eps=()
        )
    print(f"figures and summary.json in {out}")
    del summary
    return 0
