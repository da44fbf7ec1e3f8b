"""Quick form of the mean-field experiment: it runs from the CLI, writes its files, and
the checks in its summary hold."""

import json
import os

import numpy as np
import pytest

from jaxattn.cli import main


@pytest.mark.slow
def test_mean_field_quick(tmp_path, capsys):
    out = tmp_path / "mf"
    assert main(["reproduce", "mean-field", "--quick", "--out", str(out)]) == 0
    files = set(os.listdir(out))
    assert {
        "convergence.png",
        "clusters.png",
        "lora_w2.png",
        "departure_w2.png",
        "bound.png",
        "summary.json",
        "ladder_d2.npz",
        "lora_w2.npz",
        "bound.npz",
    } <= files
    assert not any(n.startswith(".tmp-") for n in files)
    s = json.loads((out / "summary.json").read_text())
    # The bound sits above the measured W2 at every time and every ε.
    assert s["bound"]["bound_holds"] and 0.0 < s["bound"]["worst_measured_over_bound"] <= 1.0
    # At t = 0 the runs at different n are samples of one μ0: W2 between two independent
    # samples decreases with n, and the fitted slope is negative.
    d2 = s["d2"]
    exact0 = np.asarray(d2["exact_w2_between_seeds_median"], float)[:, 0]
    assert exact0[-1] < exact0[0]
    assert d2["fits"]["0"]["exact_between_seeds"]["slope"] < 0
    lora = np.load(out / "lora_w2.npz")
    # Same μ0 for the original and the LoRA flow: W2 = 0 at t = 0, then > 0.
    assert np.all(lora["W"][:, :, 0] == 0.0) and np.all(lora["W"][:, :, -1] > 0.0)
    # Larger ε, larger measure-level divergence at the end (ε sorted descending).
    assert np.all(lora["W"][:, 0, -1] >= lora["W"][:, -1, -1])
    # Departures come after approaches where both are seen.
    app = np.asarray(s["lora"]["t_approach_w2"], dtype=float)
    dep = np.asarray(s["lora"]["t_departure_w2"], dtype=float)
    both = np.isfinite(app) & np.isfinite(dep)
    assert np.all(dep[both] > app[both])


def test_mean_field_listed_and_rejects_bad_options(capsys, tmp_path):
    assert main(["reproduce", "--list"]) == 0
    assert "mean-field" in capsys.readouterr().out
    assert (
        main(
            [
                "reproduce",
                "mean-field",
                "--quick",
                "--out",
                str(tmp_path / "x"),
                "--metric",
                "paper",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not take --metric" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_mean_field_large_quick_resumes(tmp_path):
    from jaxattn.experiments import mean_field_large as large

    out = tmp_path / "mfl"
    logs = []
    s = large.run(str(out), quick=True, log=logs.append)
    assert {"large_n.png", "summary.json", "ladder.npz", "departures.npz"} <= set(os.listdir(out))
    lad = np.load(out / "ladder.npz")
    ns = lad["ns"]
    # Nested samples of one μ0: at t = 0 the sliced W2 to the largest run shrinks with n.
    assert lad["sliced"].shape == (ns.size - 1, lad["ts"].size)
    assert lad["sliced"][-1, 0] < lad["sliced"][0, 0]
    assert np.all(lad["sliced"] > 0)
    dep = np.load(out / "departures.npz")
    assert dep["t_departure_w2"].shape == (2, 2, 2)  # (n, seed, ε)
    t = dep["t_departure_w2"]
    assert np.all(t[np.isfinite(t)] > 0)
    # A second run finds every checkpoint: same numbers, no solve.
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert len(ckpts) == ns.size + 1 + 2 * 2  # rungs, their distances, (n, seed) pairs
    s2 = large.run(str(out), quick=True, log=lambda m: None)
    np.testing.assert_array_equal(
        np.asarray(s2["ladder"]["sliced_w2_vs_largest"]),
        np.asarray(s["ladder"]["sliced_w2_vs_largest"]),
    )
    assert sorted(os.listdir(out / "checkpoints")) == ckpts


def test_mean_field_large_rejects_unknown_option(tmp_path):
    from jaxattn.experiments import mean_field_large as large

    with pytest.raises(ValueError, match=r"unknown option.*ladder_n\b"):
        large.run(str(tmp_path / "x"), quick=True, ladder_n=[1])
