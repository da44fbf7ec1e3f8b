"""Regression tests for failures found by adversarial use: output files that must not
be destroyed, two writers in one folder, spec files that are not files, damaged chunks,
and misleading exit codes. Each test failed before its fix."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import unchecked

from jaxattn import cli
from jaxattn._base.io import (
    OutputBusyError,
    check_output_file,
    output_lock,
    remove_stale_temporaries,
)
from jaxattn._sweep.chunks import SweepError, load_chunks
from jaxattn._sweep.runner import sweep

SIM = {
    "dynamics": "rescaled",
    "init": {"x0": [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]]},
    "solve": {"t1": 1.0, "dt": 0.1},
}
SWEEP = {
    "dynamics": "rescaled",
    "init": {"kind": "uniform", "n": 6, "d": 2},
    "solve": {"t1": 1.0, "dt": 0.1},
    "grid": {"init.seed": {"range": 4}},
    "sweep": {"chunk": 2, "summaries": ["diameter"], "save_points": 3},
}


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("jaxattn: error:") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------- --out never destroys
def test_out_equal_to_the_spec_is_refused(tmp_path, capsys):
    spec = _write(tmp_path / "spec.json", SIM)
    before = open(spec).read()
    assert cli.main(["simulate", spec, "--out", spec]) == 2
    assert "is the input file" in _err(capsys)
    assert open(spec).read() == before
    obj = dict(SIM, objective={"kind": "energy"})
    spec2 = _write(tmp_path / "obj.json", obj)
    assert cli.main(["sensitivity", spec2, "--out", spec2]) == 2
    assert "is the input file" in _err(capsys)
    assert json.loads(open(spec2).read()) == obj


def test_an_over_long_out_is_refused_before_the_run_naming_it(tmp_path, capsys):
    # Before: the run went to the end, then failed renaming its temporary file, and the
    # one-line error named that temporary file instead of --out.
    spec = _write(tmp_path / "spec.json", SIM)
    swept = _write(tmp_path / "sweep.json", SWEEP)
    long = "a" * 300
    for argv in (
        ["simulate", spec, "--out", str(tmp_path / f"{long}.npz")],
        ["sweep", swept, "--out", str(tmp_path / long)],
        ["reproduce", "lora-divergence", "--quick", "--out", str(tmp_path / long)],
    ):
        assert cli.main(argv) == 2
        err = _err(capsys)
        assert "over the file system's limit of 255" in err and ".tmp-" not in err, err
    deep = tmp_path.joinpath(*["b" * 200] * 25, "x.npz")
    assert cli.main(["simulate", spec, "--out", str(deep)]) == 2
    assert "output path is" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json", "sweep.json"]


def test_foreign_file_needs_force_and_own_output_is_replaced(tmp_path, capsys):
    spec = _write(tmp_path / "spec.json", SIM)
    out = tmp_path / "notes.npz"
    out.write_text("my notes")
    assert cli.main(["simulate", spec, "--out", str(out)]) == 2
    assert "--force" in _err(capsys)
    assert out.read_text() == "my notes"
    assert cli.main(["simulate", spec, "--out", str(out), "--force"]) == 0
    first = np.load(out)["xs"]
    # An earlier simulate output is replaced without --force.
    assert cli.main(["simulate", spec, "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out)["xs"], first)


def test_non_regular_outputs_are_never_replaced(tmp_path, capsys):
    spec = _write(tmp_path / "spec.json", SIM)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert cli.main(["simulate", spec, "--out", str(fifo)]) == 2
    assert "FIFO" in _err(capsys)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    # Only the check runs here (a regression must not get a chance to replace it).
    with pytest.raises(ValueError, match="character device"):
        check_output_file("/dev/null", force=True)


def test_failed_solve_leaves_an_existing_output_unchanged(tmp_path, capsys):
    spec = _write(tmp_path / "spec.json", SIM)
    out = tmp_path / "out.npz"
    assert cli.main(["simulate", spec, "--out", str(out)]) == 0
    before = out.read_bytes()
    failing = dict(
        SIM, solve={"t1": 50.0, "solver": "tsit5", "rtol": 1e-12, "atol": 1e-12, "max_steps": 2}
    )
    spec_f = _write(tmp_path / "fail.json", failing)
    capsys.readouterr()
    assert cli.main(["simulate", spec_f, "--out", str(out)]) == 1
    assert "left unchanged" in capsys.readouterr().err
    assert out.read_bytes() == before
    # Into a new path the failed run's data is written, with its status.
    new = tmp_path / "new.npz"
    assert cli.main(["simulate", spec_f, "--out", str(new)]) == 1
    assert int(np.load(new)["status"]) == 1


# ------------------------------------------------------------------- spec files
def test_spec_must_be_a_small_regular_file(tmp_path, capsys):
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    # In a subprocess with a timeout: before the fix, reading a FIFO blocked forever.
    proc = subprocess.run(
        [sys.executable, "-m", "jaxattn", "simulate", str(fifo), "--out", str(tmp_path / "o.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "FIFO" in proc.stderr and "Traceback" not in proc.stderr
    assert cli.main(["simulate", "/dev/zero", "--out", str(tmp_path / "o.npz")]) == 2
    assert "character device" in _err(capsys)
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:  # sparse: no disk used
        fh.truncate(300 * 2**20)
    assert cli.main(["simulate", str(big), "--out", str(tmp_path / "o.npz")]) == 2
    assert "over the limit" in _err(capsys)
    for name, text in (
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000),
    ):
        (tmp_path / name).write_text(text)
        assert cli.main(["simulate", str(tmp_path / name), "--out", str(tmp_path / "o.npz")]) == 2
        assert "nested too deeply" in _err(capsys)
    assert not (tmp_path / "o.npz").exists()


# ------------------------------------------------------------------------ locks
class _Holder:
    """Another process holding `output_lock(folder, name)` until killed."""

    def __init__(self, folder, name=""):
        code = (
            "import time; from jaxattn._base.io import output_lock\n"
            f"with output_lock({str(folder)!r}, {name!r}):\n"
            "    print('held', flush=True); time.sleep(120)\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_a_held_sweep_folder_refuses_a_second_writer(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with _Holder(out, "-p0") as holder:
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid}"):
            sweep(SWEEP, str(out), progress=False, log=None)
    assert not (out / "chunks").exists()
    with output_lock(out, "-p0"), output_lock(out, "-p0"):  # re-entrant in one process
        pass
    # Released (also when the holder was killed): the sweep now runs.
    assert sweep(SWEEP, str(out), progress=False, log=None)["diameter"].shape == (4, 3)


def test_a_held_modular_folder_refuses_a_second_writer(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    cfg = _write(tmp_path / "cfg.json", {"p": 5, "d_model": 16, "max_steps": 2})
    with _Holder(out) as holder:
        assert cli.main(["modular", "pretrain", "--config", cfg, "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in _err(capsys)
    assert not (out / "pretrain").exists()


@pytest.mark.parametrize("kind", ["symlink", "dangling", "hardlink", "fifo"])
def test_the_lock_never_follows_a_link_or_writes_a_user_file(tmp_path, capsys, kind):
    # Before the fix the lock opened its path following links, then truncated it and
    # wrote the holder's line: a link to the spec at the lock's path overwrote the spec
    # (sweep and modular alike), a dangling link created a file outside --out.
    spec = _write(tmp_path / "spec.json", SWEEP)
    cfg = _write(tmp_path / "cfg.json", {"p": 5, "d_model": 16, "max_steps": 2})
    before = {p: open(p, "rb").read() for p in (spec, cfg)}
    for command, lock, user in (
        (["sweep", spec], ".jaxattn-lock-p0", spec),
        (["modular", "pretrain", "--config", cfg], ".jaxattn-lock", cfg),
    ):
        out = tmp_path / f"out-{command[0]}"
        out.mkdir()
        target = tmp_path / "elsewhere"
        if kind == "symlink":
            os.symlink(user, out / lock)
        elif kind == "dangling":
            os.symlink(target, out / lock)
        elif kind == "hardlink":
            os.link(user, out / lock)
        else:
            os.mkfifo(out / lock)
        assert cli.main([*command, "--out", str(out)]) == 2
        err = _err(capsys)
        assert "is not a jaxattn lock file" in err and lock in err, err
        assert not target.exists()
        assert sorted(p.name for p in out.iterdir()) == [lock]
    assert {p: open(p, "rb").read() for p in (spec, cfg)} == before


def test_reproduce_and_demo_never_replace_files_they_did_not_write(tmp_path, capsys, monkeypatch):
    # Before the fix `reproduce` and `demo` wrote into any --out: a user's summary.json
    # (or figure of the same name) was replaced, and a second experiment replaced the
    # first's summary. The run is a stub here (the rule is the CLI's, checked before it).
    from jaxattn.experiments import lora_divergence, stability_bound

    runs = []

    def fake_run(name):
        def run(out, quick=False, **kw):
            runs.append(name)
            with open(os.path.join(out, "summary.json"), "w") as fh:
                json.dump({"experiment": name}, fh)
            return {}

        return run

    monkeypatch.setattr(stability_bound, "run", fake_run(stability_bound.NAME))
    monkeypatch.setattr(lora_divergence, "run", fake_run(lora_divergence.NAME))
    r = tmp_path / "r"
    r.mkdir()
    (r / "summary.json").write_bytes(b"precious\n")
    (r / "bound.png").write_bytes(b"mine")
    for args in (["reproduce", "stability-bound"], ["demo", "--quick"]):
        assert cli.main([*args, "--out", str(r)]) == 2
        err = _err(capsys)
        assert "files that jaxattn" in err and "--force" in err, err
    assert (r / "summary.json").read_bytes() == b"precious\n" and runs == []
    assert sorted(p.name for p in r.iterdir()) == ["bound.png", "summary.json"]
    # --force writes; a rerun of the same experiment needs no --force; another
    # experiment (the demo is lora-divergence) into that folder is refused.
    assert cli.main(["reproduce", "stability-bound", "--out", str(r), "--force"]) == 0
    assert cli.main(["reproduce", "stability-bound", "--out", str(r)]) == 0
    assert runs == ["stability-bound"] * 2
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(r)]) == 2
    assert "results of experiment 'stability-bound'" in _err(capsys)
    # A new folder, and one holding only a killed run's resumable chunks, are fine.
    (tmp_path / "k" / "chunks").mkdir(parents=True)
    for out in (tmp_path / "new", tmp_path / "k"):
        assert cli.main(["demo", "--out", str(out)]) == 0
        assert (out / ".jaxattn-lock").is_file()  # it held the folder's lock
    # The lock: a second writer is refused while one holds the folder.
    with _Holder(tmp_path / "new"):
        assert cli.main(["demo", "--out", str(tmp_path / "new")]) == 2
        assert "in use by another jaxattn run" in _err(capsys)


def test_a_refused_sweep_leaves_the_folder_as_it_was(tmp_path):
    # Before the fix the lock file was created first, then the folder's contents refused.
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(SweepError, match="not written by a sweep"):
        sweep(SWEEP, str(out), progress=False, log=None)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    other = tmp_path / "other"
    sweep(dict(SWEEP, beta=2.0), str(other), progress=False, log=None)
    (out / "summary.json").unlink()
    os.replace(other / "result.npz", out / "result.npz")
    with pytest.raises(SweepError, match="different sweep"):
        sweep(SWEEP, str(out), progress=False, log=None)
    assert sorted(p.name for p in out.iterdir()) == ["result.npz"]


def test_sweep_batch_beyond_the_chunk_is_refused_and_a_changed_sweep_says_what(tmp_path):
    # Before: batch = 10⁷ passed validation, padded every chunk to 10⁷ points, ran out of
    # memory and left a manifest; the corrected rerun then blamed a "different spec or grid".
    out = tmp_path / "out"
    big = dict(SWEEP, sweep=dict(SWEEP["sweep"], batch=10**7))
    with pytest.raises(SweepError, match=r"sweep batch \(10000000\) must be ≤ sweep chunk \(2\)"):
        sweep(big, str(out), progress=False, log=None)
    assert not out.exists()
    # a manifest left by a run that stopped (here: killed after its first chunk is
    # simulated by removing the result) names what changed in the rerun
    sweep(SWEEP, str(out), progress=False, log=None)
    (out / "result.npz").unlink()
    other = dict(SWEEP, sweep=dict(SWEEP["sweep"], batch=1))
    with pytest.raises(SweepError, match=r"\(options.batch: 2 there, 1 here\)"):
        sweep(other, str(out), progress=False, log=None)
    moved = dict(SWEEP, solve={"t1": 2.0, "dt": 0.1})
    with pytest.raises(SweepError, match=r"\(spec.solve.t1: 1.0 there, 2.0 here\)"):
        sweep(moved, str(out), progress=False, log=None)


def test_departure_time_sizes_and_x0_shape_are_checked_before_out_is_made(tmp_path, capsys):
    # Before: 200,000 tokens started a reference solve of hours before any check, and a
    # wrong --x0 shape left an empty --out.
    out = tmp_path / "r"
    for shape, msg in (((200_000, 2), "departure-time with 200000 tokens"), ((20, 3), "(n, 2)")):
        path = tmp_path / "x0.npy"
        np.save(path, np.zeros(shape))
        argv = ["reproduce", "departure-time", "--x0", str(path), "--out", str(out)]
        assert cli.main(argv) == 2
        assert msg in _err(capsys)
        assert not out.exists()


def test_two_sweeps_racing_into_one_folder_never_both_succeed(tmp_path):
    # Before the fix, both could pass the manifest check and mix their chunks.
    a = _write(tmp_path / "a.json", SWEEP)
    b = _write(tmp_path / "b.json", dict(SWEEP, beta=2.0))
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxattn", "sweep", s, "--out", str(out), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in (a, b)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 2], codes
    winner = (a, b)[codes.index(0)]
    with np.load(out / "result.npz") as z:
        spec = json.loads(str(z["sweep"]))["spec"]
    assert spec.get("beta", 1.0) == json.loads(open(winner).read()).get("beta", 1.0)


# ------------------------------------------------------------------ sweep folders
def test_sweep_refuses_a_users_summary_json_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("mine")
    spec = _write(tmp_path / "s.json", SWEEP)
    assert cli.main(["sweep", spec, "--out", str(out), "--quiet"]) == 2
    assert "summary.json" in _err(capsys)
    assert (out / "summary.json").read_text() == "mine" and not (out / "chunks").exists()
    assert cli.main(["sweep", spec, "--out", str(out), "--quiet", "--force"]) == 0


def test_bad_process_index_writes_nothing(tmp_path, capsys):
    spec = _write(tmp_path / "s.json", SWEEP)
    out = tmp_path / "out"
    assert (
        cli.main(["sweep", spec, "--out", str(out), "--process-index", "3", "--process-count", "2"])
        == 2
    )
    assert "process index 3" in _err(capsys)
    assert not out.exists()


def test_quiet_sweep_with_failed_points_says_so(tmp_path, capsys):
    failing = dict(
        SWEEP, solve={"t1": 50.0, "solver": "tsit5", "rtol": 1e-12, "atol": 1e-12, "max_steps": 2}
    )
    spec = _write(tmp_path / "s.json", failing)
    assert cli.main(["sweep", spec, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and "4 of 4 points failed" in cap.err


def test_damaged_chunks_are_recomputed_or_named(tmp_path):
    out = tmp_path / "out"
    first = sweep(SWEEP, str(out), progress=False, log=None)
    result = (out / "result.npz").read_bytes()
    chunk = out / "chunks" / "chunk-000000.npz"
    chunk.write_bytes(chunk.read_bytes()[:40])  # truncated by a crash or a full disk
    with pytest.raises(SweepError, match=r"chunk-000000\.npz is damaged"):
        load_chunks(str(out / "chunks"), 4, 2)
    logs = []
    again = sweep(SWEEP, str(out), progress=False, log=logs.append)
    assert any("chunk-000000.npz is damaged" in m for m in logs)
    np.testing.assert_array_equal(again["diameter"], first["diameter"])
    assert (out / "result.npz").read_bytes() == result


def test_orphan_temporaries_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".tmp-{host}-{dead.pid}-abc.npz"
    live = tmp_path / f".tmp-{host}-{os.getpid()}-abc.npz"
    other = tmp_path / f".tmp-otherhost-{dead.pid}-abc.npz"
    for p in (orphan, live, other):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == 1
    assert not orphan.exists() and live.exists() and other.exists()


# --------------------------------------------------------------- sizes before work
@pytest.mark.parametrize(
    "spec,match",
    [
        (dict(SIM, solve={"t1": 1.0, "dt": 1e-12}), "fixed steps needs"),
        (dict(SIM, solve={"t1": 1e308, "dt": 0.1}), "too many steps"),
        (dict(SIM, solve={"t1": 1e12, "dt": 0.1}), "fixed steps needs"),
        ({"init": {"kind": "uniform", "n": 10**9, "d": 2}, "solve": {"t1": 1.0}}, "n = 1000000000"),
        ({"init": {"kind": "uniform", "n": 3, "d": 200_000}, "solve": {"t1": 1.0}}, "d = 200000"),
        (
            {"init": {"kind": "uniform", "n": 3, "d": 2, "seed": 2**64}, "solve": {"t1": 1.0}},
            "seed must be ≤ 2\\*\\*63",
        ),
        (
            {
                "init": {"kind": "uniform", "n": 50_000, "d": 2},
                "attention": "dense",
                "solve": {"t1": 1.0, "dt": 0.5},
            },
            "needs .* of memory",
        ),
    ],
)
def test_oversized_simulations_are_refused_before_allocating(tmp_path, capsys, spec, match):
    path = _write(tmp_path / "s.json", spec)
    out = tmp_path / "o.npz"
    assert cli.main(["simulate", path, "--out", str(out)]) == 2
    err = _err(capsys)
    assert __import__("re").search(match, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "upd,match",
    [
        ({"grid": {"init.seed": {"range": 10**12}}}, "over the limit of 10000000"),
        ({"grid": {"init.seed": [2**64]}}, "≤ 2\\*\\*63"),
        ({"sweep": {"save_points": 10**9}}, "save points\\) needs"),
    ],
)
def test_oversized_sweeps_are_refused_before_any_output(tmp_path, capsys, upd, match):
    path = _write(tmp_path / "s.json", {**SWEEP, **upd})
    out = tmp_path / "o"
    assert cli.main(["sweep", path, "--out", str(out)]) == 2
    assert __import__("re").search(match, _err(capsys))
    assert not out.exists()


def test_memory_limit_is_overridable(monkeypatch):
    import jax.numpy as jnp

    import jaxattn as ja

    field = ja.RescaledField(d=2)
    x0 = jnp.ones((4, 2)) * jnp.arange(4.0)[:, None]
    monkeypatch.setenv("JAXATTN_MAX_MEMORY", "1K")
    with pytest.raises(ValueError, match="over the limit of 1 KiB"):
        ja.simulate(field, x0, 10.0, dt=0.1)
    monkeypatch.setenv("JAXATTN_MAX_MEMORY", "1G")
    assert ja.simulate(field, x0, 10.0, dt=0.1).xs.shape == (101, 4, 2)


def test_other_commands_check_sizes_first(tmp_path, capsys):
    cfg = _write(tmp_path / "cfg.json", {"p": 1000003})
    assert cli.main(["modular", "pretrain", "--config", cfg, "--out", str(tmp_path / "m")]) == 2
    assert "p = 1000003" in _err(capsys)
    assert not (tmp_path / "m").exists()
    assert (
        cli.main(
            [
                "reproduce",
                "stability-bound",
                "--quick",
                "--eps",
                "1e308",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "(0, 1)" in _err(capsys)
    assert not (tmp_path / "r").exists()


def test_real_model_repeat_is_checked_before_running(tmp_path, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "rm"
    assert (
        cli.main(["real-model", "analyze", "--quick", "--repeat", "100000000", "--out", str(out)])
        == 2
    )
    assert "hidden states of 100000000×" in _err(capsys)
    assert not out.exists()


# -------------------------------------------------------------- values, not strings
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(t1="10"), "t1 must be a finite number"),
        (dict(dt="0.1"), "dt must be a number"),
        (dict(ts=[float("nan")]), "ts contains NaN"),
        (dict(dt=0.1, max_steps=5), "max_steps applies to adaptive"),
        (dict(x0=np.ones((3, 2), bool)), "booleans"),
    ],
)
def test_simulate_rejects_values_that_used_to_pass(kw, match):
    import jaxattn as ja

    args = {"x0": np.arange(6.0).reshape(3, 2), "t1": 1.0, **kw}
    # simulate's own checks (the annotations refuse the strings and booleans first)
    with unchecked(), pytest.raises((ValueError, TypeError), match=match):
        ja.simulate(ja.RescaledField(d=2), args.pop("x0"), args.pop("t1"), **args)


def test_fields_reject_non_integer_dimension_and_string_beta():
    import jaxattn as ja

    # the constructor's own checks (the annotations refuse both values first)
    with unchecked(), pytest.raises(ValueError, match="d must be an integer"):
        ja.RescaledField(d=2.5)
    with unchecked(), pytest.raises(ValueError, match="beta must be a number"):
        ja.RescaledField(d=2, beta="1.0")


def test_spec_rejects_nan_ts_and_max_steps_with_fixed_steps(tmp_path, capsys):
    for solve, match in (
        ({"t1": 1.0, "ts": [float("nan")]}, "finite"),
        ({"t1": 1.0, "dt": 0.1, "max_steps": 3}, "max_steps applies"),
    ):
        path = tmp_path / "s.json"
        path.write_text(json.dumps(dict(SIM, solve=solve)))  # NaN as JSON's NaN literal
        assert cli.main(["simulate", str(path), "--out", str(tmp_path / "o.npz")]) == 2
        assert match in _err(capsys)


# ------------------------------------------------------------------------ sphere
@pytest.mark.parametrize("dtype,big", [("float64", 1e200), ("float32", 3e19)])
def test_huge_sphere_tokens_normalise_without_overflow(dtype, big):
    import jax.numpy as jnp

    import jaxattn as ja

    x0 = jnp.asarray([[big, 0.0, 0.0], [0.0, big, big], [1.0, 2.0, 2.0]], dtype)
    for field in (ja.SphereField(d=3, dtype=dtype), ja.USAField(d=3, dtype=dtype)):
        sol = ja.simulate(field, x0, 0.5, dt=0.1)
        first = np.asarray(sol.xs[0], np.float64)
        want = np.array([[1, 0, 0], [0, 2**-0.5, 2**-0.5], [1 / 3, 2 / 3, 2 / 3]])
        np.testing.assert_allclose(first, want, rtol=0, atol=1e-6)
        assert sol.ok


def test_usa_overflow_is_named_not_blamed_on_max_steps():
    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    x0 = jax.random.normal(jax.random.key(0), (8, 3))
    with pytest.raises(ValueError, match="overflow float64 at t = 0"):
        ja.simulate(ja.USAField(d=3, beta=720.0), x0, 1.0, solver="tsit5")
    with pytest.raises(ValueError, match="overflow float32"):
        ja.simulate(ja.USAField(d=3, beta=89.0, dtype="float32"), x0.astype(jnp.float32), 1.0)


def test_renormalise_with_backsolve_is_a_clear_error():
    import jax

    import jaxattn as ja

    x0 = jax.random.normal(jax.random.key(0), (5, 3))
    with pytest.raises(ValueError, match="renormalise is not available with the backsolve"):
        ja.simulate(ja.SphereField(d=3), x0, 1.0, dt=0.1, renormalise=True, adjoint="backsolve")


def test_wrt_in_any_case_gives_the_canonical_gradient():
    import jax

    import jaxattn as ja

    x0 = jax.random.normal(jax.random.key(1), (4, 2))
    field = ja.RescaledField(d=2)
    low = ja.objective_value_and_grad(field, x0, 1.0, wrt=["q", "BETA"], dt=0.1)
    canon = ja.objective_value_and_grad(field, x0, 1.0, wrt=["Q", "beta"], dt=0.1)
    assert set(low.grads) == {"Q", "beta"}
    np.testing.assert_array_equal(np.asarray(low.grads["Q"]), np.asarray(canon.grads["Q"]))


# ------------------------------------------------------------------------ float32
NON_NORMAL_V = [[1.0, 0.5], [0.0, 0.5]]


def testexponential_shift_is_the_spectral_abscissa():
    import jax.numpy as jnp

    from jaxattn._model.fields import exponential_shift

    rng = np.random.default_rng(0)
    for V in (np.asarray(NON_NORMAL_V), rng.normal(size=(4, 4)), rng.normal(size=(3, 3))):
        want = np.max(np.linalg.eigvals(V).real)
        assert abs(float(exponential_shift(jnp.asarray(V))) - want) < 1e-12
    S = rng.normal(size=(4, 4))
    S = S + S.T
    assert float(exponential_shift(jnp.asarray(S))) == float(jnp.linalg.eigvalsh(S)[-1])


@pytest.mark.slow
def test_float32_non_normal_v_keeps_the_float64_clustering_and_warns():
    import warnings

    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    # Before: e^{t(V − cI)} with c the numerical abscissa decayed like e^{−0.1t}, and
    # float32 ended this run in 1 cluster where float64 has 2.
    x0 = jax.random.uniform(jax.random.key(0), (32, 2), minval=-1.0, maxval=1.0)
    f64 = ja.simulate(ja.RescaledField(V=NON_NORMAL_V), x0, 1000.0, dt=0.1, ts=[1000.0])
    with pytest.warns(ja.Float32PrecisionWarning, match="beyond t ≈ 15.9"):
        f32 = ja.simulate(
            ja.RescaledField(V=NON_NORMAL_V, dtype="float32"),
            x0.astype(jnp.float32),
            1000.0,
            dt=0.1,
            ts=[1000.0],
        )
    assert f64.ok and f32.ok
    c64 = int(ja.cluster_count(f64.xs[-1], 0.1))
    c32 = int(ja.cluster_count(f32.xs[-1].astype(jnp.float64), 0.1))
    assert c64 == c32 == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # V = I: no warning
        ja.simulate(ja.RescaledField(d=2, dtype="float32"), x0.astype(jnp.float32), 100.0, dt=0.1)


# ------------------------------------------------------ one line, not JAX's internals
def _bad_calls():
    import jax
    import jax.numpy as jnp

    import jaxattn as ja

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)))
    k = jax.random.key(0)
    lo = lambda r: ja.LoRA.random(2, rank=r, norm=0.1, key=k)
    return [
        ("stack", lambda: ja.LoRA.stack([lo(1), lo(2)]), "different shapes"),
        (
            "ts-2d",
            lambda: ja.simulate(ja.PlainField(d=2), x, 1.0, dt=0.1, ts=[[0.5], [1.0]]),
            "1-D",
        ),
        ("field-d", lambda: ja.PlainField(d=3)(0.0, x), "d = 3"),
        ("attention-d", lambda: ja.SphereField(d=3).attention(0.0, x), "d = 3"),
        ("threshold<0", lambda: ja.cluster_count(x, -1.0), "threshold"),
        ("threshold-nan", lambda: ja.cluster_labels(x, float("nan")), "threshold"),
        ("tokens-1d", lambda: ja.cluster_count(x[:, 0], 0.1), r"\(\.\.\., n, d\)"),
        ("divergence", lambda: ja.divergence(x, x[:4]), "same"),
        ("hausdorff", lambda: ja.hausdorff(x, jnp.ones((5, 3))), "disagree on d"),
        ("float16", lambda: ja.RescaledField(d=2, dtype="float16"), "dtype"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_python_calls_are_one_line_value_errors(case):
    # Each raised from inside JAX or equinox (a TypeError or IndexError naming shapes of
    # internals) or was accepted (ts flattened, a negative threshold, a float16 field
    # nothing else takes) before its check.
    name, call, match = _bad_calls()[case]
    with unchecked(), pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value), name


def test_reproduce_seed_reaches_the_config_or_is_refused(tmp_path, capsys, monkeypatch):
    """`reproduce --seed S` runs the experiment with `seed = S` (the same tokens as
    `run(out, seed=S)` from Python); an experiment without a seed option, or a seed that
    is not a non-negative integer, is a one-line error before any output."""
    from jaxattn.experiments import stability_bound

    got = {}

    def run(out, quick=False, **kw):
        got.update(kw)
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump({"experiment": stability_bound.NAME}, fh)
        return {}

    monkeypatch.setattr(stability_bound, "run", run)
    out = tmp_path / "s"
    assert cli.main(["reproduce", "stability-bound", "--seed", "5", "--out", str(out)]) == 0
    assert got == {"seed": 5}
    capsys.readouterr()
    for argv, needle in (
        (["reproduce", "mean-field", "--seed", "1"], "has no seed option"),
        (["reproduce", "stability-bound", "--seed", "x"], "--seed must be a non-negative integer"),
        (["reproduce", "stability-bound", "--seed", "-3"], "--seed must be ≥ 0"),
    ):
        bad = tmp_path / "bad"
        assert cli.main([*argv, "--out", str(bad)]) == 2
        err = _err(capsys)
        assert needle in err and "\n" not in err.strip(), err
        assert not bad.exists()
