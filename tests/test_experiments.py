"""Quick forms of the paper experiments: they run, write their files, and the
checks in their summary.json hold."""

import json
import os

import numpy as np
import pytest

from jaxattn.cli import main


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def _no_temp_files(path):
    return not any(n.startswith(".tmp-") for n in os.listdir(path))


def test_reproduce_list(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("lora-divergence", "stability-bound", "departure-time"):
        assert name in out


@pytest.mark.slow
def test_lora_divergence_quick(tmp_path):
    out = tmp_path / "ld"
    assert main(["reproduce", "lora-divergence", "--quick", "--out", str(out)]) == 0
    assert {
        "trajectories.png",
        "trajectories.gif",
        "divergence.png",
        "targets.png",
        "horizon_vs_eps.png",
        "summary.json",
    } <= set(os.listdir(out))
    s = _summary(out)
    assert s["max_measured_over_bound"] <= 1.0
    assert set(s["targets"]) == {"Q", "K", "V"}
    for t in s["targets"].values():
        assert t["certified_horizon"] is not None and t["certified_horizon"] > 0
    # the one-sided bound certifies longer than the Grönwall one, never past the truth
    assert s["certified_horizon_a_posteriori"] < s["certified_horizon"] <= s["measured_horizon"]
    rows = s["horizon_vs_eps"]
    assert [r["eps"] for r in rows] == [0.1, 0.01]
    for r in rows:
        assert r["bound_never_below"]
        assert r["certified_horizon_gronwall"] <= r["certified_horizon"] <= r["measured_horizon"]
    assert rows[1]["certified_horizon"] > rows[0]["certified_horizon"]
    assert _no_temp_files(out)


@pytest.mark.slow
def test_stability_bound_quick(tmp_path):
    out = tmp_path / "sb"
    assert main(["reproduce", "stability-bound", "--quick", "--out", str(out)]) == 0
    s = _summary(out)
    assert s["bound_holds"] and 0 < s["worst_measured_over_bound"] <= 1.0
    assert 0 < s["median_measured_over_bound"] <= s["worst_measured_over_bound"]
    # Smaller perturbations are certified for longer, and never past the measured horizon.
    for t in s["targets"].values():
        h = np.asarray(t["median_certified_horizon"], float)
        assert np.all(np.diff(h) <= 1e-12)  # eps ascending -> horizon non-increasing
        assert np.all(h <= np.asarray(t["median_measured_horizon"], float) + 1e-12)
        assert np.all(h >= np.asarray(t["median_gronwall_horizon"], float) - 1e-12)
    assert s["median_measured_over_certified_horizon"] >= 1.0
    assert {"bound_vs_eps.png", "horizon_vs_eps.png"} <= set(os.listdir(out))


@pytest.mark.slow
def test_departure_time_quick_and_resume(tmp_path, capsys):
    out = tmp_path / "dt"
    assert main(["reproduce", "departure-time", "--quick", "--out", str(out)]) == 0
    s = _summary(out)
    assert -1.2 <= s["slope"] <= -0.8
    assert all(3.0 <= t <= 6.0 for t in s["t_approach"])  # paper: t ≈ 4–5, ε-independent
    dep = np.asarray(s["t_departure"], float)
    assert np.all(np.diff(dep) > 0)  # eps descending -> later departure
    rel = s["paper_scheme_comparison"]["relative_difference_paper_vs_converged"]
    assert all(abs(r) < 0.1 for r in rel)  # "a few percent"
    assert {"departure_vs_eps.png", "phases.png", "departure_time.csv"} <= set(os.listdir(out))
    capsys.readouterr()
    # A second run of the same configuration reuses the saved chunks and gives the same data.
    assert main(["reproduce", "departure-time", "--quick", "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert _summary(out)["t_departure"] == s["t_departure"]


@pytest.mark.slow
def test_departure_time_from_x0_file_and_eps(tmp_path):
    x0 = np.random.default_rng(3).uniform(-1, 1, size=(6, 2))
    np.save(tmp_path / "x0.npy", x0)
    out = tmp_path / "dt"
    assert (
        main(
            [
                "reproduce",
                "departure-time",
                "--quick",
                "--out",
                str(out),
                "--x0",
                str(tmp_path / "x0.npy"),
                "--eps",
                "0.1,0.05",
                "--metric",
                "paper",
            ]
        )
        == 0
    )
    s = _summary(out)
    assert s["eps"] == [0.1, 0.05] and s["config"]["n"] == 6 and s["config"]["metric"] == "paper"


@pytest.mark.parametrize(
    "args,match",
    [
        (["reproduce", "nope", "--out", "X"], "unknown experiment 'nope'; available:"),
        (["reproduce", "departure-time", "--out", "X", "--eps", "0.1,,2"], "--eps must be"),
        (["reproduce", "departure-time", "--out", "X", "--eps", "0.1,-1"], "must lie in"),
        (["reproduce", "departure-time", "--out", "X", "--metric", "l2"], "unknown metric"),
        (["reproduce", "stability-bound", "--out", "X", "--x0", "x0.npy"], "does not take --x0"),
        (["reproduce", "departure-time", "--out", "X", "--x0", "missing.npy"], "not found"),
        (["reproduce", "departure-time", "--out", "X", "--x0", "bad.npy"], "shape"),
        # an .npz archive was an AttributeError traceback
        (["reproduce", "departure-time", "--out", "X", "--x0", "x0s.npz"], "archive"),
        (
            ["reproduce", "departure-time", "--out", "X", "--x0", "."],
            "is a directory",
        ),  # was "not found"
        (
            ["reproduce", "departure-time", "--out", "/proc/x/y", "--quick"],
            "cannot create|writable",
        ),
        (["reproduce"], "experiment name"),
    ],
)
def test_reproduce_errors(tmp_path, capsys, monkeypatch, args, match):
    import re

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "x0.npy", np.zeros((3, 2)))
    np.savez(tmp_path / "x0s.npz", x=np.zeros((3, 2)))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert not (tmp_path / "X").exists()


@pytest.mark.slow
def test_sphere_phase_quick_and_equiangular_curve(tmp_path):
    from jaxattn.experiments.sphere_phase import equiangular_time

    out = tmp_path / "sp"
    assert main(["reproduce", "sphere-phase", "--quick", "--out", str(out)]) == 0
    z = np.load(out / "sphere_phase.npz")
    P = z["probability"]
    assert np.all((P >= 0) & (P <= 1))
    assert np.all(P[..., 0] < 0.05)  # random tokens are rarely within 1 − 1e-3 at t = 0
    assert np.all(P[..., -1] >= P[..., 0])
    counts = z["plateau_counts_beta4"]
    assert np.all(counts[:, -1] <= counts[:, 0])  # clusters only merge
    # Equiangular curve: closed-form check at β = 0, where ρ' = 2(1−ρ)((n−1)ρ+1)/n solves
    # to (1−ρ)/(1+(n−1)ρ) = e^{−2t}  =>  t* = ½ log((1+(n−1)(1−δ))/δ).
    n, delta = 32, 1e-3
    exact = 0.5 * np.log((1 + (n - 1) * (1 - delta)) / delta)
    assert equiangular_time(0.0, n, delta, 100.0, dt=1e-3) == pytest.approx(exact, rel=1e-6)


@pytest.mark.slow
def test_normalisation_quick(tmp_path):
    out = tmp_path / "norm"
    assert main(["reproduce", "normalisation", "--quick", "--out", str(out)]) == 0
    z = np.load(out / "normalisation.npz")
    s = json.loads((out / "summary.json").read_text())
    for scheme in ("post", "pre", "peri", "ngpt"):
        mc, r = z[f"{scheme}_mean_cosine"], z[f"{scheme}_radius"]
        assert np.all(np.isfinite(mc)) and np.all(np.abs(mc) <= 1 + 1e-9)
        if scheme in ("post", "ngpt"):  # on the sphere (RK4 drift only)
            assert np.abs(r - 1).max() < 1e-3
        else:  # the radii grow: ṙ = ⟨θ, S⟩ (pre) or ⟨θ, S⟩/|S| (peri), > 0 here
            assert np.all(np.diff(r, axis=1) > 0)
    # causal: the first token attends to itself only, so it never moves
    theta = z["causal_angles"]
    assert np.ptp(theta[:, 0]) < 1e-12 and np.ptp(theta[:, -1]) > 1e-3
    assert set(s["ordering"]) == {
        "early_fastest_two",
        "peri_and_ngpt_faster_early_than_post_and_pre",
        "post_most_collapsed_at_the_end",
    }
    assert (out / "normalisation.png").stat().st_size > 0 and (out / "causal.png").exists()
