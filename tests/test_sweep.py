"""The sweep engine: grid specs, chunks, sharding, resume, bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxattn as ja
from jaxattn import cli
from jaxattn._spec.spec import parse_spec
from jaxattn._sweep.chunks import SweepError, load_chunks, run_chunks
from jaxattn._sweep.grid import parse_sweep
from jaxattn._sweep.runner import sweep

SPEC = {
    "dynamics": "rescaled",
    "init": {"kind": "uniform", "n": 10, "d": 2},
    "lora": {"rank": 1, "seed": 3},
    "solve": {"t1": 3.0, "dt": 0.1},
    "grid": {"lora.norm": [0.02, 0.3], "lora.target": ["Q", "V"], "init.seed": {"range": 3}},
    "sweep": {
        "chunk": 5,
        "summaries": ["divergence", "clusters", "diameter", "mean"],
        "save_points": 7,
    },
}


def _sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _run(spec, out, **kw):
    return sweep(spec, str(out), progress=False, log=None, **kw)


@pytest.mark.slow
def test_each_point_equals_its_own_simulation(tmp_path):
    # Point p of the sweep is the simulation of the spec with p's grid values filled in:
    # compare with two independent `simulate` calls (perturbed and unperturbed).
    res = _run(SPEC, tmp_path)
    plan = parse_sweep(SPEC)
    assert res["divergence"].shape == (2, 2, 3, 7) and res["mean"].shape == (2, 2, 3, 7, 2)
    assert np.all(res["status"] == 0)
    for p in range(plan.n_points):
        sim = parse_spec(plan.point_spec(p))
        a = ja.simulate(sim.field, sim.x0, sim.t1, **sim.solve)
        b = ja.simulate(sim.field.without_lora(), sim.x0, sim.t1, **sim.solve)
        idx = np.searchsorted(np.asarray(a.ts), res["ts"])
        assert np.allclose(np.asarray(a.ts)[idx], res["ts"], rtol=0, atol=1e-12)
        i = np.unravel_index(p, plan.shape)
        e = np.asarray(ja.divergence(a.xs, b.xs))[idx]
        # Same RK4 arithmetic on the same grid: agreement to rounding.
        np.testing.assert_allclose(res["divergence"][i], e, rtol=0, atol=1e-13)
        np.testing.assert_allclose(
            res["mean"][i], np.asarray(a.xs[idx].mean(axis=1)), rtol=0, atol=1e-13
        )
        cl = [int(ja.cluster_count(a.xs[k], 0.1)) for k in idx]
        np.testing.assert_array_equal(res["clusters"][i], cl)
    # Larger perturbations move further (same seed, same target, norm 0.3 vs 0.02).
    assert np.all(res["divergence"][1, ..., -1] > res["divergence"][0, ..., -1])
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["points"] == 12 and summary["failed"] == {} and summary["figure"] == "sweep.png"
    with np.load(tmp_path / "result.npz") as z:
        assert json.loads(str(z["sweep"]))["axes"] == ["lora.norm", "lora.target", "init.seed"]
        np.testing.assert_array_equal(z["grid_lora.target"], ["Q", "V"])


@pytest.mark.slow
def test_four_devices_give_identical_results(tmp_path, monkeypatch):
    assert len(jax.local_devices()) == 4  # conftest: 4 simulated CPU devices
    r1 = _run(SPEC, tmp_path / "one", devices=jax.local_devices()[:1])
    r4 = _run(SPEC, tmp_path / "four", devices=jax.local_devices())
    for k in ("divergence", "clusters", "diameter", "mean", "status", "num_steps"):
        np.testing.assert_array_equal(r1[k], r4[k])
    assert _sha(tmp_path / "one" / "result.npz") == _sha(tmp_path / "four" / "result.npz")
    # in memory (out_dir None): the same arrays, and its temporary folder is gone
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    rm = sweep(SPEC, None, devices=jax.local_devices()[:1], progress=False, log=None)
    for k in ("divergence", "clusters", "diameter", "mean", "status", "num_steps"):
        np.testing.assert_array_equal(r1[k], rm[k])
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_device_count_does_not_change_a_long_chaotic_sweep(tmp_path):
    # 1000 RK4 steps of 32 tokens, LoRAs of Q, K and V up to ε = 0.3: rounding
    # differences grow to 1e-4 here. Before each device ran its share as one vmap, the
    # width (256 points on one device, 64 on each of four) changed XLA's rounding, and
    # 1 and 4 devices differed in 63 % of the entries (up to 1.9e-4).
    spec = {
        "dynamics": "rescaled",
        "init": {"kind": "uniform", "n": 32, "d": 2},
        "lora": {"rank": 1, "seed": 7},
        "solve": {"t1": 50.0, "dt": 0.05},
        "grid": {
            "lora.norm": [0.01, 0.3],
            "lora.target": ["Q", "K", "V"],
            "init.seed": {"range": 40},
        },
        "sweep": {
            "chunk": 256,
            "batch": 32,
            "summaries": ["divergence", "diameter"],
            "save_points": 11,
        },
    }
    r1 = _run(spec, tmp_path / "one", devices=jax.local_devices()[:1])
    r4 = _run(spec, tmp_path / "four", devices=jax.local_devices())
    assert np.max(r1["divergence"]) > 0.1  # the runs did separate: a sensitive test
    for k in ("divergence", "diameter", "status", "num_steps"):
        np.testing.assert_array_equal(r1[k], r4[k])


class _Stop(Exception):
    pass


def test_interrupted_sweep_resumes_to_the_same_file(tmp_path):
    full = tmp_path / "full"
    _run(SPEC, full)

    part = tmp_path / "part"

    def stop_after_two(c):
        if c == 1:
            raise _Stop

    with pytest.raises(_Stop):
        _run(SPEC, part, on_chunk=stop_after_two)
    chunks = sorted(f for f in os.listdir(part / "chunks") if not f.startswith("."))
    assert chunks == ["chunk-000000.npz", "chunk-000001.npz", "manifest.json"]
    assert not (part / "result.npz").exists()
    before = {c: os.stat(part / "chunks" / c).st_mtime_ns for c in chunks[:2]}
    computed = []
    _run(SPEC, part, on_chunk=computed.append)
    assert computed == [2]  # 12 points in chunks of 5: only the last chunk was missing
    assert {c: os.stat(part / "chunks" / c).st_mtime_ns for c in chunks[:2]} == before
    assert _sha(part / "result.npz") == _sha(full / "result.npz")


@pytest.mark.slow
def test_processes_share_chunks_round_robin(tmp_path):
    single = _run(SPEC, tmp_path / "single")
    shared = tmp_path / "shared"
    assert _run(SPEC, shared, process_index=0, process_count=2) is None  # chunks 0, 2
    assert sorted(f for f in os.listdir(shared / "chunks") if not f.startswith("."))[:2] == [
        "chunk-000000.npz",
        "chunk-000002.npz",
    ]
    res = _run(SPEC, shared, process_index=1, process_count=2)  # chunk 1, then assembles
    np.testing.assert_array_equal(res["divergence"], single["divergence"])
    assert _sha(shared / "result.npz") == _sha(tmp_path / "single" / "result.npz")


_DISTRIBUTED = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
mode, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if mode != "single":
    jax.distributed.initialize(
        coordinator_address=sys.argv[4], num_processes=2, process_id=int(mode)
    )
    assert jax.process_count() == 2 and jax.process_index() == int(mode)
import jaxattn as ja
result = ja.sweep(spec, out, progress=False, log=None)
print("assembled" if result is not None else "left to the other process")
"""


@pytest.mark.slow
def test_two_jax_distributed_processes_share_one_folder(tmp_path):
    # Two local CPU processes initialised through jax.distributed (coordinator on
    # localhost) run one sweep into one folder: the process index and count come from
    # JAX, each computes its chunks, the last to finish assembles, and the result is
    # byte-identical to one process's.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    script = tmp_path / "run.py"
    script.write_text(_DISTRIBUTED)
    spec = dict(SPEC, sweep=dict(SPEC["sweep"], chunk=2))  # 12 points: 6 chunks, 3 each

    def start(mode, out):
        args = [sys.executable, str(script), mode, str(tmp_path / out), json.dumps(spec)]
        return subprocess.Popen(
            args + ([address] if mode != "single" else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start("0", "shared"), start("1", "shared")]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    assert "assembled" in outs  # at least one process saw every chunk
    chunks = sorted(f for f in os.listdir(tmp_path / "shared" / "chunks") if f.startswith("chunk-"))
    assert len(chunks) == 6
    locks = {f for f in os.listdir(tmp_path / "shared" / "chunks") if f.startswith(".jaxattn-lock")}
    assert locks == {".jaxattn-lock-p0", ".jaxattn-lock-p1"}  # each held its own index
    single = start("single", "single")
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-2000:]
    assert _sha(tmp_path / "shared" / "result.npz") == _sha(tmp_path / "single" / "result.npz")


@pytest.mark.slow
def test_killed_cli_sweep_resumes_to_the_same_file(tmp_path):
    spec = dict(
        SPEC,
        grid={"lora.norm": {"geomspace": [0.01, 0.3, 8]}, "init.seed": {"range": 6}},
        sweep={"chunk": 4},
    )
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxattn", "sweep", str(path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = list(os.listdir(out / "chunks")) if (out / "chunks").is_dir() else []
        if any(f.startswith("chunk-") for f in done):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before it could be killed")
    left = os.listdir(out / "chunks")
    assert not any(
        f.startswith(".tmp")
        for f in left
        if f.endswith(".npz") and os.path.getsize(out / "chunks" / f) == 0
    )
    n_before = sum(f.startswith("chunk-") for f in left)
    assert 1 <= n_before < 12 and not (out / "result.npz").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _sha(out / "result.npz") == _sha(tmp_path / "full" / "result.npz")


def test_run_chunks_engine_resumes_and_rejects_other_sweeps(tmp_path):
    calls = []

    def compute(idx):
        calls.append(idx.tolist())
        return {"sq": idx.astype(float) ** 2}

    out = run_chunks(str(tmp_path), {"a": 1}, 7, 3, compute, progress=False, log=None)
    np.testing.assert_array_equal(out["sq"], np.arange(7.0) ** 2)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]
    run_chunks(str(tmp_path), {"a": 1}, 7, 3, compute, progress=False, log=None)
    assert len(calls) == 3  # nothing recomputed
    with pytest.raises(SweepError, match="different sweep"):
        run_chunks(str(tmp_path), {"a": 2}, 7, 3, compute, progress=False, log=None)
    with pytest.raises(SweepError, match="chunk size 3 there, 2 here"):
        run_chunks(str(tmp_path), {"a": 1}, 7, 2, compute, progress=False, log=None)
    assert load_chunks(str(tmp_path), 7, 3)["sq"].shape == (7,)


@pytest.mark.parametrize(
    "grid,sweep_opts,message",
    [
        ({"beta": []}, {}, "the grid has no points: grid beta is empty"),
        ({}, {}, r"the grid has no points: \[grid\] is empty"),
        (None, {}, r"no \[grid\] section"),
        ({"init.seed": {"range": 0}}, {}, "grid init.seed is empty"),
        ({"lora.rank": [1, 2]}, {}, "unknown grid key 'lora.rank'"),
        ({"beta": [1.0, -2.0]}, {}, "grid beta values must be ≥ 0"),
        ({"lora.target": ["Q", "W"]}, {}, "must be one of Q, K, V, O, W1, W2"),
        ({"beta": [1.0]}, {"summaries": ["entropy"]}, "unknown summary 'entropy'"),
        ({"beta": [1.0]}, {"chunk": 0}, "sweep chunk must be ≥ 1"),
    ],
)
def test_bad_grids_are_one_line_errors(grid, sweep_opts, message):
    spec = {k: v for k, v in SPEC.items() if k not in ("grid", "sweep")}
    spec["lora"] = dict(spec["lora"], norm=0.1)
    if grid is not None:
        spec["grid"] = grid
    spec["sweep"] = sweep_opts
    with pytest.raises(SweepError, match=message):
        parse_sweep(spec)


def test_incompatible_spec_and_grid():
    explicit = dict(SPEC, init={"x0": [[0.0, 1.0], [1.0, 0.0]]})
    with pytest.raises(SweepError, match=r"init\.seed needs a random"):
        parse_sweep(explicit)
    no_lora = {k: v for k, v in SPEC.items() if k != "lora"}
    with pytest.raises(SweepError, match=r"grid lora.norm needs a \[lora\] section"):
        parse_sweep(no_lora)
    ab = dict(SPEC, lora={"A": [[1.0, 0.0]], "B": [[0.0], [1.0]]})
    assert parse_sweep(ab).shape == (2, 2, 3)  # lora.norm scales the given direction
    with pytest.raises(SweepError, match=r"lora\.seed needs a random"):
        parse_sweep(dict(ab, grid={"lora.seed": [0, 1]}))
    twice = dict(SPEC, lora={"rank": 1, "norm": 0.1})
    with pytest.raises(SweepError, match=r"lora.norm is given both in \[lora\] and in \[grid\]"):
        parse_sweep(twice)
    wrong_d = dict(SPEC, V=np.eye(3).tolist())
    with pytest.raises(SweepError, match="first point is invalid"):
        parse_sweep(wrong_d)
    with pytest.raises(SweepError, match="t1 must be > 0"):
        parse_sweep(dict(SPEC, solve={"t1": 0.0, "dt": 0.1}))
    no_lora_div = {k: v for k, v in SPEC.items() if k != "lora"}
    no_lora_div["grid"] = {"beta": [1.0, 2.0]}
    with pytest.raises(SweepError, match="need a \\[lora\\] section"):
        parse_sweep(no_lora_div)


def test_cli_bad_input_exits_2_and_overwrites_nothing(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SPEC))
    out = tmp_path / "out"
    assert cli.main(["sweep", str(good), "--out", str(out), "--quiet"]) == 0
    files = {
        p: _sha(p) for p in out.rglob("*") if p.is_file() and not p.name.startswith(".jaxattn-lock")
    }
    capsys.readouterr()

    other = dict(SPEC, solve={"t1": 2.0, "dt": 0.1})
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    assert cli.main(["sweep", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "of a different sweep" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(dict(SPEC, grid={"beta": []})))
    assert cli.main(["sweep", str(empty), "--out", str(out), "--quiet"]) == 2
    assert "grid beta is empty" in capsys.readouterr().err
    # Only result.npz, no chunks: still recognised as another sweep's output.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "result.npz").write_bytes((out / "result.npz").read_bytes())
    assert cli.main(["sweep", str(bad), "--out", str(lone), "--quiet"]) == 2
    assert "result.npz of a different sweep" in capsys.readouterr().err
    assert {
        p: _sha(p) for p in out.rglob("*") if p.is_file() and not p.name.startswith(".jaxattn-lock")
    } == files
    # The same spec again: everything is done, nothing recomputed, same bytes.
    assert cli.main(["sweep", str(good), "--out", str(out), "--quiet"]) == 0
    assert {
        p: _sha(p)
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".jaxattn-lock") and p.name != "summary.json"
    } == {p: h for p, h in files.items() if p.name != "summary.json"}


def test_sphere_sweep_over_beta_with_tokens_summary(tmp_path):
    spec = {
        "dynamics": "sphere",
        "init": {"kind": "sphere", "n": 8, "d": 3},
        "solve": {"t1": 2.0, "dt": 0.1, "renormalise": True},
        "grid": {"beta": [0.5, 4.0], "init.seed": [0, 1]},
        "sweep": {"summaries": ["tokens", "clusters"], "save_points": 3, "chunk": 3},
    }
    res = _run(spec, tmp_path)
    assert res["tokens"].shape == (2, 2, 3, 8, 3)
    np.testing.assert_allclose(np.linalg.norm(res["tokens"], axis=-1), 1.0, atol=1e-13)
    plan = parse_sweep(spec)
    sim = parse_spec(plan.point_spec(3))  # beta 4, seed 1
    a = ja.simulate(sim.field, sim.x0, sim.t1, ts=res["ts"], **sim.solve)
    np.testing.assert_allclose(res["tokens"][1, 1], np.asarray(a.xs), rtol=0, atol=1e-12)
    # On the sphere the default cluster_threshold 0.1 is a chord, as on R^d (not 1 − cos).
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import cdist

    tok = res["tokens"].reshape(-1, 8, 3)
    ref = [connected_components(cdist(x, x) <= 0.1, directed=False)[0] for x in tok]
    np.testing.assert_array_equal(res["clusters"].reshape(-1), ref)


def test_float32_adaptive_sweep_over_beta_seed_alpha(tmp_path):
    spec = {
        "dtype": "float32",
        "dynamics": "rescaled",
        "init": {"kind": "normal", "n": 6, "d": 3},
        "lora": {"rank": 2, "norm": 0.1},
        "solve": {"t1": 2.0, "solver": "tsit5", "rtol": 1e-6, "atol": 1e-8},
        "grid": {"beta": [0.5, 2.0], "lora.seed": [0, 1], "lora.alpha": [1.0, 4.0]},
        "sweep": {"summaries": ["hausdorff", "tokens"], "save_points": 5, "chunk": 3},
    }
    res = _run(spec, tmp_path)
    assert res["tokens"].dtype == np.float32 and np.all(res["status"] == 0)
    plan = parse_sweep(spec)
    for p in (0, 5, 7):
        sim = parse_spec(plan.point_spec(p))
        a = ja.simulate(sim.field, sim.x0, sim.t1, ts=res["ts"], **sim.solve)
        i = np.unravel_index(p, plan.shape)
        # Adaptive steps are chosen for the pair (original, perturbed) in the sweep and
        # for the perturbed run alone here: both meet rtol 1e-6, so they agree to ~1e-5.
        np.testing.assert_allclose(
            res["tokens"][i], np.asarray(a.xs), rtol=0, atol=1e-4 * float(np.abs(a.xs).max())
        )
    # alpha 4 vs 1 (same seed, same norm): LoRA.random fixes ‖ΔW‖ = norm for any alpha,
    # so the runs coincide.
    np.testing.assert_allclose(res["tokens"][:, :, 0], res["tokens"][:, :, 1], rtol=0, atol=1e-5)


def test_short_chunks_are_padded_to_a_few_sizes_only(tmp_path):
    from jaxattn._sweep.sharding import padded_size

    assert [padded_size(n, 4096) for n in (1, 2, 3, 5, 100, 4095, 4096)] == [
        1,
        2,
        4,
        8,
        128,
        4096,
        4096,
    ]
    assert [padded_size(n, 12) for n in (1, 5, 9, 12)] == [1, 8, 12, 12]
    assert len({padded_size(n, 4096) for n in range(1, 4097)}) == 13  # 2⁰ … 2¹²
    # A one-point sweep with a huge chunk solves one point (padded for the 4 devices),
    # and that point is its own simulation.
    spec = {**SPEC, "grid": {"beta": [1.5]}, "sweep": {"chunk": 4096, "summaries": ["mean"]}}
    spec = {k: v for k, v in spec.items() if k != "lora"}
    res = _run(spec, tmp_path)
    sim = parse_spec(parse_sweep(spec).point_spec(0))
    a = ja.simulate(sim.field, sim.x0, sim.t1, **sim.solve)
    idx = np.searchsorted(np.asarray(a.ts), res["ts"])
    np.testing.assert_allclose(
        res["mean"][0], np.asarray(a.xs[idx].mean(axis=1)), rtol=0, atol=1e-13
    )


def test_shared_references_equal_paired_solves(tmp_path, monkeypatch):
    # With fixed steps each distinct (initial condition, β) is solved once without its
    # LoRA and shared by the points (here 2 seeds × 2 β = 4 references for 24 points);
    # with the budget at 0 each point solves its own reference beside its run. Both are
    # the same RK4 arithmetic on the same grid: equal to rounding. A sphere spec with
    # renormalisation exercises the projected steps and the Hausdorff summary.
    import jaxattn._sweep.runner as sw

    for spec in (
        {
            **SPEC,
            "grid": {
                "beta": [0.5, 2.0],
                "lora.norm": [0.05, 0.3],
                "lora.target": ["Q", "K", "V"],
                "init.seed": [0, 1],
            },
            "sweep": {
                **SPEC["sweep"],
                "summaries": ["divergence", "hausdorff", "clusters", "clusters_reference"],
            },
        },
        {
            "dynamics": "sphere",
            "init": {"kind": "sphere", "n": 8, "d": 3},
            "lora": {"rank": 1, "seed": 1},
            "solve": {"t1": 2.0, "dt": 0.1, "renormalise": True},
            "grid": {"lora.norm": [0.01, 0.1, 0.5], "init.seed": [0, 1]},
            "sweep": {"summaries": ["tokens", "hausdorff", "divergence"], "save_points": 5},
        },
    ):
        logs = []
        shared = sweep(spec, str(tmp_path / "shared"), progress=False, log=logs.append)
        refs = sw._References(parse_sweep(spec), sw._PointBuilder(parse_sweep(spec)))
        assert any(f"{refs.count} unperturbed reference run" in m for m in logs)
        monkeypatch.setattr(sw, "REFERENCE_BYTES", 0)
        logs.clear()
        paired = sweep(spec, str(tmp_path / "paired"), progress=False, log=logs.append)
        monkeypatch.undo()
        assert not any("reference run" in m for m in logs)
        assert set(shared) == set(paired)
        for k in shared:
            if k.startswith("grid_") or k in ("status", "num_steps"):
                np.testing.assert_array_equal(shared[k], paired[k])
            else:
                np.testing.assert_allclose(shared[k], paired[k], rtol=0, atol=1e-13)
        assert np.max(shared["divergence"][..., -1]) > 1e-3  # the LoRAs moved the runs
        if "clusters_reference" in shared:  # the unperturbed run's, the same for every LoRA
            plan = parse_sweep(spec)
            p = plan.n_points - 1  # the last β, seed
            sim = parse_spec(plan.point_spec(p))
            ref = ja.simulate(
                sim.base_field, sim.x0, sim.t1, options=sim.solve.replace(ts=list(shared["ts"]))
            )
            want = [ja.cluster_count(x, 0.1) for x in ref.xs]
            got = shared["clusters_reference"].reshape(-1, shared["ts"].size)
            np.testing.assert_array_equal(got[p], want)
            same_ref = shared["clusters_reference"][:, :, :, -1]  # (β, norm, target, seed)
            assert np.all(same_ref == same_ref[:, :1, :1, :])
        for d in ("shared", "paired"):
            shutil.rmtree(tmp_path / d)


def test_references_are_indexed_by_initial_condition_and_beta():
    import jaxattn._sweep.runner as sw

    spec = {**SPEC, "grid": {"init.seed": [0, 1, 2], "lora.norm": [0.01, 0.1], "beta": [1, 2]}}
    plan = parse_sweep(spec)
    refs = sw._References(plan, sw._PointBuilder(plan))
    assert refs.count == 6 and refs.worth_it(7)
    # C order over (seed, norm, beta): the reference is (seed, beta), whatever the norm.
    idx = refs.index(np.arange(plan.n_points))
    for p in range(plan.n_points):
        s, _, b = np.unravel_index(p, plan.shape)
        assert idx[p] == 2 * s + b
    inp = refs.inputs()
    np.testing.assert_array_equal(inp["beta"], [1, 2] * 3)
    for r in range(6):  # each reference starts from its points' tokens
        p = int(np.flatnonzero(idx == r)[0])
        np.testing.assert_array_equal(inp["x0"][r], parse_spec(plan.point_spec(p)).x0)
    # One point per reference: sharing saves nothing, so each point pairs its own.
    lora = {**SPEC["lora"], "norm": 0.1}
    only_seeds = parse_sweep({**SPEC, "lora": lora, "grid": {"init.seed": [0, 1, 2]}})
    assert not sw._References(only_seeds, sw._PointBuilder(only_seeds)).worth_it(7)


def test_lora_norm_sweeps_an_explicit_direction_over_its_size():
    """With explicit A, B, `lora.norm` scales the direction B·A to operator norm ε: the
    paper's ΔV = −ε e₂e₂ᵀ swept over ε gives at each point the run of that exact LoRA
    (`Ṽ = diag(1, 1 − ε)`). A zero direction cannot be scaled; `lora.seed` still needs
    a random LoRA."""
    import jaxattn as ja
    from jaxattn._spec import SpecError

    x0 = [[0.5, -0.2], [-0.4, 0.9], [0.1, 0.3], [-0.8, -0.6]]
    spec = {
        "dynamics": "rescaled",
        "init": {"x0": x0},
        "lora": {"target": "V", "A": [[0.0, 1.0]], "B": [[0.0], [-1.0]]},
        "solve": {"t1": 2.0, "dt": 0.1},
        "grid": {"lora.norm": [0.05, 0.3]},
        "sweep": {"summaries": ["tokens"], "save_points": 3},
    }
    r = sweep(spec, None, progress=False, log=None)
    for k, eps in enumerate((0.05, 0.3)):
        lora = ja.LoRA(np.array([[0.0, 1.0]]), np.array([[0.0], [-eps]]), target="V")
        want = ja.simulate(ja.RescaledField(d=2).with_lora(lora), np.array(x0), 2.0, dt=0.1).final
        np.testing.assert_allclose(r["tokens"][k, -1], want, rtol=1e-12, atol=1e-13)
    zero = {**spec, "lora": {**spec["lora"], "B": [[0.0], [0.0]]}}
    with pytest.raises(SweepError, match="direction B·A is zero"):
        sweep(zero, None, progress=False, log=None)
    one = {k: v for k, v in zero.items() if k not in ("grid", "sweep")}
    with pytest.raises(SpecError, match="direction B·A is zero"):
        parse_spec({**one, "lora": {**zero["lora"], "norm": 0.1}})
    seeded = {**spec, "grid": {"lora.seed": [0, 1]}}
    with pytest.raises(SweepError, match="needs a random"):
        sweep(seeded, None, progress=False, log=None)
