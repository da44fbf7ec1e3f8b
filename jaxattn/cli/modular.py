"""`jaxattn modular pretrain|finetune|study --config FILE --out DIR [--quick]`.

`pretrain` writes `DIR/pretrain/`, `finetune` reads `DIR/pretrain/model.eqx` and writes
`DIR/finetune/`, `study` writes runs, figures and `summary.json` in `DIR`. All three
resume from their checkpoints when re-run with the same command.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "modular",
        help="modular-arithmetic transformer: pre-training, LoRA "
        "fine-tuning, forgetting against depth",
    )
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    helps = {
        "pretrain": "full-batch AdamW on (x + y) mod p until the test accuracy target",
        "finetune": "LoRA fine-tuning on (x − y) mod p, base frozen, forgetting tracked",
        "study": "depths × seeds, ranks, spectra, particle-model connection, figures",
    }
    for name, h in helps.items():
        a = actions.add_parser(name, help=h, description=h)
        a.add_argument(
            "--config",
            help="TOML/JSON file with keys of ModularConfig "
            "(default: the paper's size, p = 113, d_model = 128)",
        )
        a.add_argument(
            "--out", required=True, help="output folder (resumes from the checkpoints found there)"
        )
        a.add_argument("--quick", action="store_true", help="small p, few steps (tests)")
        a.add_argument("--progress", action="store_true", help="show progress bars")
        a.set_defaults(func=handle)


def handle(args) -> int:
    from .._base import check_output_dir, output_lock
    from ..modular import check_run, load_config

    # Everything that can be checked is checked before anything is created: the config
    # (every run of a study), the folder, and the checkpoints already there.
    config = load_config(args.config, quick=args.quick)
    check_output_dir(args.out, create=False)
    check_run(config, args.action, args.out)
    check_output_dir(args.out)
    with output_lock(args.out):  # one writer per folder for the whole run
        return _run(args, config)


def _run(args, config) -> int:
    import os

    from .._base import setup_jax

    setup_jax(config.dtype)
    from .. import modular

    if args.action == "pretrain":
        _, _, s = modular.pretrain(
            config, os.path.join(args.out, "pretrain"), progress=args.progress
        )
        bar = modular.bar_text(config)
        first = s["steps_to_target"]
        state = (
            f"meets the bar ({bar}); first met at step {first}"
            if s["reached_target"]
            else f"does not meet the bar ({bar})"
            + ("" if first is None else f"; met it at step {first}")
        )
        print(
            f"pre-trained {s['steps']} steps, {state} (test acc "
            f"{s['final']['test_acc']:.3f}); outputs in {args.out}/pretrain"
        )
    elif args.action == "finetune":
        _, _, s = modular.finetune(
            config,
            os.path.join(args.out, "finetune"),
            os.path.join(args.out, "pretrain", "model.eqx"),
            progress=args.progress,
        )
        hl = "never" if s["half_life"] is None else f"{s['half_life']:.0f} steps"
        print(
            f"fine-tuned {s['steps']} steps: addition acc {s['add_acc_start']:.3f} → "
            f"{s['add_acc_end']:.3f} (half-life {hl}), subtraction test acc "
            f"{s['sub_test_acc']:.3f}; outputs in {args.out}/finetune"
        )
    else:
        s = modular.run_study(config, args.out, progress=args.progress)
        for d, v in s["per_depth"].items():
            hl = v["half_life"]
            txt = "never" if hl["mean"] is None else f"{hl['mean']:.0f} ± {hl['std']:.0f}"
            print(
                f"depth {d}: {v['in_trend']} models met the bar; half-life {txt} steps "
                f"({hl['censored']} never halved)"
            )
        print(f"trend: {s['trend']['verdict']}")
        print(f"figures and summary.json in {args.out}")
    return 0
