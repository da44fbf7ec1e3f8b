"""The four real-model analyses (see docs/theory.md, 'Real pretrained models').

1. `clustering`: mean pairwise cosine, cosine histogram and cluster count of the token
   states after every layer, the stack run up to `repeat` times, prose and random tokens.
2. `spectra`: per head and layer, eigenvalues of the value-output map `W_O^a W_V^a`, of
   the symmetric part of `A^a = W_Q^aᵀ W_K^a / √d_h`, the effective β, ranks, and which
   heads meet the hypotheses of docs/theory.md, 'Geometries by the spectrum of V'.
3. `particle`: one head's weights and one layer's input tokens run through the sphere
   dynamics (SA), compared with what the real model's next layers do.
4. `lora_drift`: random rank-r LoRA perturbations of every layer's `W_V` (operator norm
   ε); divergence of the token states from the base model against depth and ε.

Everything here returns plain dicts of NumPy arrays / numbers; `jaxattn.plotting` draws them and
`run` writes them. The model runs in its own dtype (float32 for the CLI); the spectra are
computed in float64 NumPy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .._analysis import chord_from_cosine_gap, cluster_count, divergence, gram, mean_cosine
from .._base import Array, ArrayLike, Float, Int, ScalarLike
from .._model import LoRA, SphereField
from .._simulate import simulate
from ._bert import BertEncoder, Checkpoint, hidden_states
from ._load import encode

CLUSTER_DELTA = 0.1  # tokens i, j are linked when cos(x_i, x_j) ≥ 1 − δ
CLUSTER_CHORD = chord_from_cosine_gap(CLUSTER_DELTA)  # the same as cluster_count's chord
HIST_BINS = 50  # pairwise-cosine histogram on [−1, 1]
RANK_RTOL = (1e-3, 1e-2)  # rank = #{σ_i > rtol · σ_max}, at both tolerances
SIMPLE_RTOL = 1e-6  # λ₁ is simple when every other eigenvalue is ≥ this·ρ away


# -- corpus -------------------------------------------------------------------------
def default_corpus() -> list[tuple[str, str]]:
    """CPython's own documentation, `pydoc_data.topics` (79 passages in 3.11), sorted by
    topic name: `[(name, text), …]`."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def tokenize(ck: Checkpoint, passages, *, truncate_to: int | None) -> list[np.ndarray]:
    """Token ids of each passage (`[CLS] … [SEP]` included). With `truncate_to` the
    tokenizer cuts each passage to that many tokens; without, a passage longer than the
    model's positions is an error."""
    return [
        encode(
            ck.tokenizer,
            text,
            ck.config.max_positions,
            truncate_to=truncate_to,
            name=f"passage {name!r}",
        )
        for name, text in passages
    ]


def random_sequences(
    ck: Checkpoint, count: int, length: int, *, seed: int
) -> Int[np.ndarray, "count n"]:
    """`count` sequences of `length` ids: `[CLS]`, uniform random ordinary word pieces
    (no `[…]` special or unused entries), `[SEP]` — the tokenizer's own special tokens."""
    frame = ck.tokenizer.encode("x").ids  # [CLS] x [SEP] → where the specials go
    head, tail = frame[:1], frame[-1:]
    vocab = ck.tokenizer.get_vocab()
    ordinary = np.array(
        sorted(i for t, i in vocab.items() if not (t.startswith("[") and t.endswith("]"))), np.int32
    )
    rng = np.random.default_rng(seed)
    body = rng.choice(ordinary, size=(count, max(length - 2, 1)))
    return np.concatenate(
        [
            np.broadcast_to(np.asarray(head, np.int32), (count, 1)),
            body,
            np.broadcast_to(np.asarray(tail, np.int32), (count, 1)),
        ],
        axis=1,
    )


# -- 1. clustering across depth -----------------------------------------------------------
@eqx.filter_jit
def _state_stats(model: BertEncoder, ids, repeat: int):
    """Per sequence of a batch `(b, n)`, per hidden state: mean cosine, cluster count,
    mean squared token norm, histogram of pairwise cosines (i < j)."""
    hs = hidden_states(model, ids, repeat=repeat)  # (b, S, n, d)
    n = ids.shape[-1]
    iu = jnp.triu_indices(n, 1)
    edges = jnp.linspace(-1.0, 1.0, HIST_BINS + 1, dtype=hs.dtype)

    def per_state(x):
        g = gram(x)[iu]
        counts, _ = jnp.histogram(jnp.clip(g, -1.0, 1.0), bins=edges)
        return (
            mean_cosine(x),
            cluster_count(x, CLUSTER_CHORD, sphere=True),
            jnp.mean(jnp.sum(x * x, axis=-1)),
            counts,
        )

    return jax.vmap(jax.vmap(per_state))(hs)


def _group_by_length(seqs: list[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(int(s.shape[0]), []).append(i)
    return groups


def sequence_stats(model: BertEncoder, seqs: list[np.ndarray], repeat: int) -> dict:
    """`_state_stats` for sequences of any lengths: equal lengths run as one batch (no
    padding, so every statistic is over exactly the tokens of the sequence)."""
    out: dict[str, list[Any]] = {
        k: [None] * len(seqs) for k in ("mean_cosine", "clusters", "sq_norm", "hist")
    }
    for _, idx in sorted(_group_by_length(seqs).items()):
        batch = jnp.asarray(np.stack([seqs[i] for i in idx]), jnp.int32)
        mc, cc, sq, hist = (np.asarray(a) for a in _state_stats(model, batch, repeat))
        for j, i in enumerate(idx):
            out["mean_cosine"][i], out["clusters"][i] = mc[j], cc[j]
            out["sq_norm"][i], out["hist"][i] = sq[j], hist[j]
    return {k: np.stack(v) for k, v in out.items()}  # (P, S) or (P, S, bins)


def _summarise(stats: dict, seqs) -> dict:
    mc = stats["mean_cosine"].astype(np.float64)
    hist = stats["hist"].sum(axis=0).astype(np.float64)  # pooled over sequences
    hist /= np.maximum(hist.sum(axis=-1, keepdims=True), 1.0) * (2.0 / HIST_BINS)  # density
    return {
        "count": len(seqs),
        "tokens": [int(s.shape[0]) for s in seqs],
        "mean_cosine": mc.mean(axis=0),
        "mean_cosine_band": np.quantile(mc, [0.1, 0.9], axis=0),
        "mean_cosine_all": mc,
        "clusters": stats["clusters"].astype(np.float64).mean(axis=0),
        "clusters_band": np.quantile(stats["clusters"], [0.1, 0.9], axis=0),
        "sq_norm": stats["sq_norm"].astype(np.float64).mean(axis=0),
        "hist_density": hist,
    }


def clustering(ck: Checkpoint, seqs, random_seqs, repeat: int) -> dict:
    """Analysis 1 on the prose sequences and the random ones."""
    model = ck.model
    t0 = time.perf_counter()
    prose = _summarise(sequence_stats(model, seqs, repeat), seqs)
    wall = time.perf_counter() - t0
    rand = _summarise(sequence_stats(model, list(random_seqs), repeat), list(random_seqs))
    L = model.num_layers
    passes = [k for k in (1, 2, 4, 8, 16) if k < repeat] + [repeat]
    return {
        "prose": prose,
        "random": rand,
        "num_layers": L,
        "repeat": repeat,
        "passes": passes,
        "cluster_delta": CLUSTER_DELTA,
        "stats_wall_s": wall,
        "hist_edges": np.linspace(-1.0, 1.0, HIST_BINS + 1),
    }


def forward_timing(model: BertEncoder, seqs, *, repeat: int = 1, reps: int = 3) -> dict:
    """Seconds per passage of the jitted forward pass (compile excluded): one passage at
    a time, and the whole equal-length group as one vmapped batch."""
    groups = _group_by_length(seqs)
    n, idx = max(groups.items(), key=lambda kv: len(kv[1]))
    batch = jnp.asarray(np.stack([seqs[i] for i in idx]), jnp.int32)
    one = batch[0]
    hidden_states(model, one, repeat=repeat).block_until_ready()
    hidden_states(model, batch, repeat=repeat).block_until_ready()
    t_one = []
    for _ in range(reps):
        t = time.perf_counter()
        hidden_states(model, one, repeat=repeat).block_until_ready()
        t_one.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps):
        hidden_states(model, batch, repeat=repeat).block_until_ready()
    t_batch = (time.perf_counter() - t) / reps / len(idx)
    return {
        "tokens": n,
        "repeat": repeat,
        "single_s": float(min(t_one)),
        "batched_per_passage_s": float(t_batch),
        "batch": len(idx),
        "device": str(jax.devices()[0].platform),
    }


# -- 2. spectra -----------------------------------------------------------------------
def _rank(s: np.ndarray, rtol: float) -> int:
    return int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0


def head_spectrum(h: Mapping[str, Float[np.ndarray, "*_"]]) -> dict[str, Any]:
    """One head (`BertEncoder.head`): spectra and the hypotheses on the top eigenvalue of V
    (docs/theory.md, 'Geometries by the spectrum of V').

    `OV = W_O W_V` (d×d, rank ≤ d_h) has the nonzero eigenvalues of `W_V W_O` (d_h×d_h);
    an eigenvector ψ of the small one gives φ = W_O ψ of the big one. `A = W_Qᵀ W_K / √d_h`
    has the singular values of `R_Q R_Kᵀ / √d_h` (QR of `W_Qᵀ`, `W_Kᵀ`).
    λ₁ = the eigenvalue of OV with the largest real part (0 if all nonzero ones are
    negative). Hypotheses: λ₁ real, > 0, simple, and `⟨Q φ₁, K φ₁⟩ > 0`.
    """
    WQ, WK, WV, WO = h["Q"], h["K"], h["V"], h["O"]
    dh, d = WQ.shape
    small = WV @ WO
    lam, psi = np.linalg.eig(small)
    rho = float(np.max(np.abs(lam)))
    i1 = int(np.argmax(np.real(lam)))
    lam1 = lam[i1]
    others = np.delete(lam, i1)
    if d > dh:
        others = np.append(others, 0.0)  # OV has d − d_h zero eigenvalues
    real = abs(lam1.imag) <= 1e-9 * max(rho, 1e-300)
    positive = real and lam1.real > 0
    simple = bool(np.all(np.abs(others - lam1) > SIMPLE_RTOL * max(rho, 1e-300)))
    phi = WO @ np.real(psi[:, i1])
    phi /= np.linalg.norm(phi)
    qk = float((WQ @ phi) @ (WK @ phi)) / np.sqrt(dh)
    rq = np.asarray(np.linalg.qr(WQ.T, mode="r"))  # mode "r": the R factor alone
    rk = np.asarray(np.linalg.qr(WK.T, mode="r"))
    sv = np.linalg.svd(rq @ rk.T / np.sqrt(dh), compute_uv=False)
    A = WQ.T @ WK / np.sqrt(dh)
    sym = np.linalg.eigvalsh(0.5 * (A + A.T))
    return {
        "ov_eigs": lam,
        "lambda1": complex(lam1),
        "rho": rho,
        "dominant": bool(positive and np.all(np.abs(others) < lam1.real)),
        "qk_phi": qk,
        "hypotheses": bool(positive and simple and qk > 0),
        "real_positive": bool(positive),
        "simple": simple,
        "A_norm": float(sv[0]),
        "A_rank": [_rank(sv, r) for r in RANK_RTOL],
        "sym_eigs": sym,
    }


def spectra(model: BertEncoder, sq_norm: np.ndarray) -> dict:
    """Analysis 2 over all layers and heads. `sq_norm[l]` = mean `|x|²` of layer l's
    input tokens (from analysis 1): the effective β of a head is `‖A‖₂ · mean |x|²`, the
    largest logit scale `β⟨Q u_i, K u_j⟩` the head can put on unit tokens `u = x/|x|`
    (biases left out, as in the particle model)."""
    L, H, d = model.num_layers, model.num_heads, model.d
    heads = [[head_spectrum(model.head(l, a)) for a in range(H)] for l in range(L)]
    layer_ov, layer_rank = [], []
    for l in range(L):
        WQ = np.asarray(model.layers.wq[l], np.float64)
        WK = np.asarray(model.layers.wk[l], np.float64)
        WV = np.asarray(model.layers.wv[l], np.float64)
        WO = np.asarray(model.layers.wo[l], np.float64)
        layer_ov.append(np.linalg.eigvals(WO @ WV))
        s = np.linalg.svd(WK.T @ WQ, compute_uv=False)
        layer_rank.append([_rank(s, r) for r in RANK_RTOL])
    grid = lambda key: np.array([[hd[key] for hd in row] for row in heads])
    A_norm = grid("A_norm")
    beta_eff = A_norm * np.asarray(sq_norm[:L], np.float64)[:, None]
    return {
        "num_layers": L,
        "num_heads": H,
        "d": d,
        "head_dim": model.head_dim,
        "rank_rtol": list(RANK_RTOL),
        "ov_eigs": np.stack([np.stack([hd["ov_eigs"] for hd in row]) for row in heads]),
        "sym_eigs": np.stack([np.stack([hd["sym_eigs"] for hd in row]) for row in heads]),
        "lambda1": np.array([[hd["lambda1"] for hd in row] for row in heads]),
        "rho": grid("rho"),
        "qk_phi": grid("qk_phi"),
        "A_norm": A_norm,
        "beta_eff": beta_eff,
        "A_rank": grid("A_rank"),
        "hypotheses": grid("hypotheses"),
        "real_positive": grid("real_positive"),
        "simple": grid("simple"),
        "dominant": grid("dominant"),
        "layer_ov_eigs": np.stack(layer_ov),
        "layer_KtQ_rank": np.array(layer_rank),
    }


# -- 3. the particle model with real weights --------------------------------------------
def head_field(
    h: Mapping[str, Float[np.ndarray, "*_"]], sq_norm: ScalarLike, dtype: DTypeLike
) -> SphereField:
    """The SA sphere field of one head: `V = W_O W_V` (d×d), Q and K the head's
    `d_h × d` weights padded with zero rows to d×d (so `QᵀK = W_Qᵀ W_K` exactly), and
    `β = mean|x|² / √d_h` — the real logits `⟨W_Q x_i, W_K x_j⟩/√d_h` on tokens of
    norm |x|, written for unit tokens. Biases are left out."""
    dh, d = h["Q"].shape
    pad = lambda W: np.concatenate([W, np.zeros((d - dh, d))], axis=0)
    return SphereField(
        pad(h["Q"]), pad(h["K"]), h["O"] @ h["V"], beta=float(sq_norm) / np.sqrt(dh), dtype=dtype
    )


def particle(
    ck: Checkpoint,
    ids: np.ndarray,
    *,
    layer: int,
    heads,
    repeat: int,
    dt: float,
    sq_norms: np.ndarray,
) -> dict:
    """Analysis 3: the input tokens of `layer` (hidden state `layer`) run through each
    head's sphere dynamics up to `t = repeat·L − layer` (one layer ≈ one unit of time, the
    Euler step of a residual block), against the real model's next hidden states."""
    model = ck.model
    dtype = model.dtype
    L = model.num_layers
    hs = hidden_states(model, jnp.asarray(ids, jnp.int32), repeat=repeat)
    real = hs[layer:]  # the input of `layer`, then what the real layers make of it
    steps = real.shape[0] - 1
    x0 = real[0]
    real_mc = np.asarray(jax.vmap(mean_cosine)(real))
    real_cc = np.asarray(jax.vmap(lambda x: cluster_count(x, CLUSTER_CHORD, sphere=True))(real))
    ts = np.arange(steps + 1, dtype=np.float64)
    runs = []
    for a in heads:
        field = head_field(model.head(layer, a), sq_norms[layer], dtype)
        t = time.perf_counter()
        sol = simulate(
            field, x0, float(steps), solver="rk4", dt=dt, ts=ts, dtype=dtype, renormalise=True
        )
        xs = sol.xs.block_until_ready()
        wall = time.perf_counter() - t
        mc = np.asarray(jax.vmap(mean_cosine)(xs))
        cc = np.asarray(jax.vmap(lambda x: cluster_count(x, CLUSTER_CHORD, sphere=True))(xs))
        # Agreement of the cluster geometry: correlation of the off-diagonal Gram entries
        # of the particle state at time k and the real state k layers later.
        iu = np.triu_indices(x0.shape[0], 1)
        corr = [
            float(np.corrcoef(np.asarray(gram(xs[k]))[iu], np.asarray(gram(real[k]))[iu])[0, 1])
            for k in range(steps + 1)
        ]
        runs.append(
            {
                "head": int(a),
                "status": int(np.max(np.asarray(sol.status))),
                "mean_cosine": mc,
                "clusters": cc,
                "gram_corr": np.array(corr),
                "beta": float(field.beta),
                "wall_s": wall,
                "final_gram": np.asarray(gram(xs[-1])),
            }
        )
    return {
        "layer": layer,
        "ts": ts,
        "dt": dt,
        "tokens": int(x0.shape[0]),
        "real_mean_cosine": real_mc,
        "real_clusters": real_cc,
        "real_final_gram": np.asarray(gram(real[-1])),
        "runs": runs,
        "num_layers": L,
        "cluster_delta": CLUSTER_DELTA,
    }


# -- 4. LoRA drift -----------------------------------------------------------------------
def lora_deltas(
    model: BertEncoder, eps: Float[ArrayLike, " E"] | Sequence[float], *, rank: int, seed: int
) -> Float[Array, "E L d d"]:
    """`ΔV` of shape `(E, L, d, d)`: for each layer an independent random `jaxattn.LoRA`
    on V with `‖ΔV_l‖₂ = ε` exactly, one direction per layer scaled to each ε."""
    keys = jax.random.split(jax.random.key(seed), model.num_layers)
    norms = jnp.asarray(eps, model.dtype)
    per_layer = [
        LoRA.random(model.d, rank=rank, norm=norms, target="V", key=k, dtype=model.dtype).delta()
        for k in keys
    ]
    return jnp.stack(per_layer, axis=1)


@eqx.filter_jit
def _drift(model: BertEncoder, ids, v_delta, repeat: int):
    """Max and mean token distance between base and perturbed hidden states, `(b, S)`."""
    base = hidden_states(model, ids, repeat=repeat)
    pert = hidden_states(model, ids, repeat=repeat, v_delta=v_delta)
    diff = jnp.sqrt(jnp.sum(jnp.square(pert - base), axis=-1))  # (b, S, n)
    rel = jnp.mean(diff, axis=-1) / jnp.mean(jnp.sqrt(jnp.sum(base * base, axis=-1)), axis=-1)
    return divergence(base, pert), rel


def lora_drift(ck: Checkpoint, seqs, *, eps, rank: int, seeds, repeat: int) -> dict:
    """Analysis 4: `e_l = max_i |x_i − x̃_i|` after each hidden state l, averaged over
    sequences and random directions, for each ε; fits of the growth with depth and ε."""
    model = ck.model
    groups = _group_by_length(seqs)
    eps = [float(e) for e in eps]
    e_max = np.zeros((len(seeds), len(eps), model.num_layers * repeat + 1))
    e_rel = np.zeros_like(e_max)
    for si, seed in enumerate(seeds):
        deltas = lora_deltas(model, eps, rank=rank, seed=seed)
        for ei in range(len(eps)):
            acc_m, acc_r = 0.0, 0.0
            for idx in groups.values():
                batch = jnp.asarray(np.stack([seqs[i] for i in idx]), jnp.int32)
                m, r = _drift(model, batch, deltas[ei], repeat)
                acc_m = acc_m + np.asarray(m, np.float64).sum(axis=0)
                acc_r = acc_r + np.asarray(r, np.float64).sum(axis=0)
            e_max[si, ei] = acc_m / len(seqs)
            e_rel[si, ei] = acc_r / len(seqs)
    mean_max = e_max.mean(axis=0)  # (E, S)
    mean_rel = e_rel.mean(axis=0)
    return {
        "eps": np.array(eps),
        "rank": rank,
        "seeds": list(seeds),
        "repeat": repeat,
        "sequences": len(seqs),
        "e_max": mean_max,
        "e_rel": mean_rel,
        "e_max_by_seed": e_max,
        "V_norms": [
            float(np.linalg.norm(np.asarray(model.layers.wv[l], np.float64), 2))
            for l in range(model.num_layers)
        ],
        "fit": fit_drift(np.array(eps), mean_rel),
    }


def fit_drift(eps: np.ndarray, e: np.ndarray) -> dict:
    """Fits of `e (E, S)` (hidden state 0 is the embeddings, unperturbed):
    per ε, `log e_l = a + g·l` over layers l ≥ 1 → growth factor `e^g` per layer;
    per layer, `log e = c + p·log ε` over all ε → exponent p (1 = linear response)."""
    S = e.shape[1]
    layers = np.arange(1, S)
    growth, exponent = [], []
    for row in e:
        y = np.log(np.maximum(row[1:], 1e-30))
        g = np.polyfit(layers, y, 1)[0] if S > 2 else float("nan")
        growth.append(float(np.exp(g)))
    for l in range(1, S):
        y = np.log(np.maximum(e[:, l], 1e-30))
        p = np.polyfit(np.log(eps), y, 1)[0] if eps.size > 1 else float("nan")
        exponent.append(float(p))
    return {"growth_per_layer": growth, "eps_exponent": exponent}
