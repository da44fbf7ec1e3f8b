"""The `low-rank` and `geometries` experiments: quick forms, their checks, the CLI.

The quick runs happen once per module (fixtures); the tests then re-check the written
files against independent references (scipy's convex hull, the exact A = 0 solution,
the left-eigenvector identity) rather than trusting the experiment's own booleans.
"""

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import ConvexHull

import jaxattn
from jaxattn.cli import main
from jaxattn.experiments import geometries, low_rank
from jaxattn.experiments._clusters import hull_directions, hull_vertex_mask

GEO_FILES = (
    "polytope.png",
    "hyperplanes.png",
    "polygon_line.png",
    "collapse.png",
    "leaders_1d.png",
    "geometries.npz",
    "checks.csv",
    "summary.json",
)
LOW_RANK_FILES = (
    "cases.png",
    "cluster_counts.png",
    "lora.png",
    "low_rank.npz",
    "clusters.csv",
    "summary.json",
)


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    out = tmp_path_factory.mktemp("geometries")
    lines = []
    summary = geometries.run(out, quick=True, log=lines.append)
    return out, summary, lines


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    out = tmp_path_factory.mktemp("low_rank")
    lines = []
    summary = low_rank.run(out, quick=True, log=lines.append)
    return out, summary, lines


# -- helpers: the geometry checks themselves can fail ---------------------------------
def test_hull_vertex_mask_square_with_interior_and_edge_points():
    pts = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5], [0.5, 0.0]], float)
    mask = hull_vertex_mask(pts, hull_directions(2, 720))
    assert mask.tolist() == [True, True, True, True, False, False]


@pytest.mark.parametrize("d", [2, 3])
def test_hull_vertex_mask_matches_scipy(d):
    rng = np.random.default_rng(d)
    dirs = hull_directions(d, 20000, seed=1)
    for _ in range(5):
        pts = rng.standard_normal((12, d))
        ref = np.zeros(len(pts), bool)
        ref[ConvexHull(pts).vertices] = True
        got = hull_vertex_mask(pts, dirs)
        assert not np.any(got & ~ref)  # never a false positive
        assert got.sum() >= ref.sum() - 1  # dense directions find (almost) all


def test_count_levels_and_left_eigenvector():
    k, vals = geometries.count_levels([0.0, 1e-6, 1.0, 1.0 + 2e-4, 2.0, 3.0], 1e-3)
    assert k == 4 and np.allclose(vals, [5e-7, 1.0001, 2.0, 3.0])
    for V in (geometries.V_HYPER_2D, geometries.V_HYPER_3D):
        V = np.asarray(V)
        lam, phi, phi_star = geometries.left_top_eigenvector(V)
        np.testing.assert_allclose(phi_star @ V, lam * phi_star, atol=1e-12)
        np.testing.assert_allclose(V @ phi, lam * phi, atol=1e-12)
        assert lam == pytest.approx(max(np.linalg.eigvals(V).real))


# -- geometries -----------------------------------------------------------------------
@pytest.mark.slow
def test_geometries_writes_files_and_summary(geo):
    out, summary, lines = geo
    for name in GEO_FILES:
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["experiment"] == "geometries" and on_disk["quick"] is True
    assert on_disk["checks"] == summary["checks"]
    assert len(summary["checks"]) >= 10
    with open(out / "checks.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["check"]: r["holds"] == "True" for r in rows} == summary["checks"]
    assert any("polytope" in line for line in lines) and "checks pass" in lines[-1]
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_geometries_checks_hold(geo):
    _, s, _ = geo
    failed = [k for k, v in s["checks"].items() if not v]
    assert not failed and s["all_checks_pass"] is True
    c = s["cases"]
    n = s["config"]["n"]
    for d in ("d2", "d3"):
        assert all(1 <= k <= n for k in c["polytope"][d]["clusters"])
        assert all(p["support_gap_tokens_vs_centres"] < 1e-5 for p in c["polytope"][d]["per_seed"])
        assert all(1 <= k <= 3 for k in c["hyperplanes"][d]["levels"])
        assert c["hyperplanes"][d]["coordinate_motion_last_unit"] < 1e-4
    pl = c["polygon_line"]
    assert all(g == pytest.approx(0.5, abs=0.05) for g in pl["z3_spread_growth_rate"])
    assert pl["plane_motion_last_unit"] < 1e-4
    co = c["collapse"]
    assert all(-0.6 < sl < -0.4 for sl in co["late_loglog_slope"])
    assert max(co["radius_ratio"]) < 0.5
    for p in c["leaders_1d"]["per_seed"]:
        assert p["booleanness_final"] <= 1e-6
        assert 1 <= len(p["leaders"]) <= 2 and set(p["leaders"]) <= set(p["extreme_tokens"])


@pytest.mark.slow
def test_geometries_data_against_independent_references(geo):
    out, s, _ = geo
    data = np.load(out / "geometries.npz")
    thr = s["config"]["cluster_threshold"]
    # polytope: cluster centres are vertices of scipy's hull of the final tokens
    for d in (2, 3):
        for fin in data[f"polytope_d{d}_final"]:
            centres = jaxattn.cluster_centres(jnp.asarray(fin), thr)
            if len(centres) > d:  # a full-dimensional hull
                hull = ConvexHull(fin)
                hv = fin[hull.vertices]
                dist = np.min(np.linalg.norm(centres[:, None] - hv[None], axis=-1), axis=1)
                assert np.all(dist < 10 * thr)
    # hyperplanes: recount the levels of <phi1*, z> from the stored final tokens
    for d in (2, 3):
        phi_star = np.asarray(s["cases"]["hyperplanes"][f"d{d}"]["phi_1_star"])
        for fin in data[f"hyperplanes_d{d}_final"]:
            v = np.sort(fin @ phi_star)
            assert 1 + np.sum(np.diff(v) > 1e-3 * max(1.0, v[-1] - v[0])) <= 3
    # d = 1: the final attention matrix is 0/1, each row has one 1, columns = leaders
    for P in data["leaders_1d_P_final"]:
        assert np.all((P < 1e-9) | (P > 1 - 1e-9))
        assert np.linalg.matrix_rank(P) in (1, 2)
    # collapse: the radius never grows
    R = data["collapse_radius"]
    assert np.all(np.diff(R, axis=1) <= 1e-12)


@pytest.mark.slow
def test_cli_reproduce_geometries(tmp_path, capsys):
    out = tmp_path / "geo"
    assert main(["reproduce", "geometries", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_checks_pass"] is True
    assert "summary.json" in capsys.readouterr().out
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "geometries" in listed and "low-rank" in listed


def test_unknown_override_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        geometries.run(tmp_path, quick=True, nonsense=1)
    with pytest.raises(ValueError, match="unknown option"):
        low_rank.run(tmp_path, quick=True, nonsense=1)


# -- low-rank -------------------------------------------------------------------------
@pytest.mark.slow
def test_low_rank_writes_files_and_summary(lowrank):
    out, summary, lines = lowrank
    for name in LOW_RANK_FILES:
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["experiment"] == "low-rank" and on_disk["checks"] == summary["checks"]
    with open(out / "clusters.csv") as fh:
        rows = list(csv.DictReader(fh))
    S = summary["config"]["seeds"]
    assert len(rows) == S * (len(summary["members"]) + len(summary["lora"]["members"]))
    assert "checks pass" in lines[-1]


@pytest.mark.slow
def test_low_rank_checks_hold(lowrank):
    _, s, _ = lowrank
    failed = [k for k, v in s["checks"].items() if not v]
    assert not failed and s["all_checks_pass"] is True
    n = s["config"]["n"]
    # A = 0: one cluster at the mean, uniform attention (Booleanness 1/n), no leader
    for m in s["zero"]["members"]:
        assert m["clusters"] == [1] * s["config"]["seeds"]
        assert all(b == pytest.approx(1.0 / n) for b in m["booleanness"])
        assert m["n_leaders"] == [0] * s["config"]["seeds"]
    assert s["zero"]["max_centre_minus_initial_mean"] < 1e-6
    # A = e1e1ᵀ: at most two clusters (the extreme tokens along e1 lead), Boolean attention
    e1 = s["e1e1"]
    assert e1["rank_A"] == 1
    assert all(1 <= k <= 2 for k in e1["clusters"]) and max(e1["booleanness"]) < 1e-6
    assert all(L == k for L, k in zip(e1["n_leaders"], e1["clusters"]))
    # ranks of A are what the weights say
    ranks = {m["label"]: m["rank_A"] for m in s["members"]}
    assert ranks["A = 0 (Q = 0)"] == 0 and ranks["psd rank 3 (w0)"] == 3
    assert ranks["gen rank 2 (w0)"] == 2
    # the LoRA of K changes rank(A) as designed, s = 0 reproduces the rank-1 run exactly,
    # and a rank-3 A splits the two rank-1 clusters in at least one run
    lo = {tuple(m["s2_s3"]): m for m in s["lora"]["members"]}
    assert lo[(0.0, 0.0)]["rank_A"] == 1 and lo[(1.0, 0.0)]["rank_A"] == 2
    assert lo[(1.0, 1.0)]["rank_A"] == 3
    assert s["lora"]["max_difference_s0_vs_rank1_run"] < 1e-10
    assert max(lo[(1.0, 1.0)]["clusters"]) > max(lo[(0.0, 0.0)]["clusters"])
    assert all(e > 0.1 for e in lo[(1.0, 1.0)]["final_divergence_from_rank1"])


@pytest.mark.slow
def test_low_rank_zero_attention_matches_exact_solution(lowrank):
    """A = 0: z_i(t) = m + e^{-t}(z_i(0) − m) exactly (m = mean, conserved)."""
    out, _, _ = lowrank
    data = np.load(out / "low_rank.npz")
    labels = list(data["labels"])
    t1 = float(data["t1"])
    x0 = data["x0"]
    m = x0.mean(axis=1, keepdims=True)
    exact = m + np.exp(-t1) * (x0 - m)
    for lab in ("A = 0 (Q = 0)", "A = 0 (K = 0)"):
        np.testing.assert_allclose(data["final"][labels.index(lab)], exact, atol=1e-9)
        P = data["P_final_seed0"][labels.index(lab)]
        np.testing.assert_allclose(P, 1.0 / x0.shape[1], atol=1e-12)
