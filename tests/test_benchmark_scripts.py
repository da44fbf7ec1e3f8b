"""Smoke tests of benchmarks/exp_floor.py and benchmarks/gpu.py (subprocess, CPU, tiny n).

Each subprocess is capped so a hang fails the test rather than the suite. They check that
the scripts run, print their table rows and reject bad flag values with a one-line error —
not the numbers. The runs of the scripts (about 150 s together on the 2-core machine) are
marked slow (`make test-slow`); the bad-flag checks are in `make test`.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
ROW = r"\s+\d+\.\d+"  # a number in a table row


def _run(script, *args, timeout=90, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake devices
    env["JAX_PLATFORMS"] = "cpu"
    if pythonpath:  # time this checkout's jaxattn, not an installed one
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_exp_floor_quick():
    r = _run("exp_floor.py", "--quick", "--n", "512", "--blocks", "256")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for form in (
        "xla exp(x) -> new array",
        "xla sum(exp(iota*c)) in-register",
        "xla sum(exp(a*x+b))",
        "numpy exp(x, out=) 1 thread",
    ):
        assert re.search(re.escape(form) + ROW + ROW, out), form  # all cores and 1 core
    assert re.search(r"float32 matmul peak \(512², jax\):" + ROW + " GFLOP/s", out)
    for kernel in ("blockwise 256", "dense", "dot_product"):
        assert re.search(rf"^{kernel}{ROW}{ROW}{ROW}{ROW}\s+\d+\.\d%", out, re.M), kernel
    assert re.search(r"\(d\) floor at n = 512, d = 3: .* = \d+\.\d ms/step", out)
    assert "machine load during this run" in out
    assert out.rstrip().splitlines()[-1].startswith("Conclusion: ")


@pytest.mark.slow
@pytest.mark.parametrize("extra,isolate", [((), True), (("--dtype", "bf16"), False)])
def test_gpu_script_cpu_smoke(extra, isolate):
    args = ["--n", "64,128", "--steps", "2", "--repeat", "1", *extra]
    r = _run("gpu.py", *args, *(() if isolate else ("--no-isolate",)))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "devices: [CpuDevice" in out
    assert "no GPU found" in out
    kernel = "dot_product_bf16" if extra else "auto"
    dtype = "bf16" if extra else "float32"
    for n in (64, 128):
        assert re.search(rf"^\s+{n}\s+{dtype}\s+{kernel}{ROW}{ROW}{ROW}{ROW}\s+RSS$", out, re.M), (
            n,
            out,
        )
    assert "failed" not in out


@pytest.mark.slow
def test_gpu_script_small_batch():
    r = _run(
        "gpu.py",
        "--n",
        "64",
        "--steps",
        "1",
        "--repeat",
        "1",
        "--no-isolate",
        "--batch",
        "3",
        "--batch-n",
        "8",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(
        r"^batch of 3 × \(n = 8, d = 8\), 200 RK4 steps.*:\s+\d+\.\d+ ms/step", r.stdout, re.M
    ), r.stdout


@pytest.mark.slow
def test_gpu_script_sphere_blockwise():
    r = _run(
        "gpu.py",
        "--n",
        "100",
        "--steps",
        "1",
        "--repeat",
        "1",
        "--dynamics",
        "sphere",
        "--kernel",
        "blockwise",
        "--block",
        "32",
        "--no-isolate",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(rf"^\s+100\s+float32\s+blockwise{ROW}", r.stdout, re.M), r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--n", "0"),
        ("--n", "200000"),
        ("--n", "ten"),
        ("--dtype", "fp16"),
        ("--kernel", "flash"),
        ("--dtype", "bf16", "--kernel", "dense"),
        ("--steps", "0"),
        ("--batch", "-1"),
    ],
)
def test_gpu_script_bad_flag_one_line_error(args):
    r = _run("gpu.py", *args, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.slow
def test_peers_quick_smoke():
    # The side-by-side peers at tiny sizes: rows for every size, the batch line with the
    # hand-written scan, and the docs sweep against its hand-written scan.
    env_path = str(BENCH.parent)
    r = _run(
        "peers.py",
        "--quick",
        "--skip-big",
        "--repeat",
        "1",
        "--batch",
        "2",
        "--sweep-seeds",
        "1",
        timeout=300,
        pythonpath=env_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for n in (50, 1000):
        assert re.search(rf"^\s+{n}\s+2\s+20 \|{ROW}", out, re.M), out
    assert re.search(
        r"^batch 2×\(n=16, d=8, 20 RK4 steps\).*hand-written scan \d+\.\d+x", out, re.M
    ), out
    assert re.search(r"^docs sweep \(6 points.*→ \d+\.\d+x", out, re.M), out


def test_peers_bad_flag():
    r = _run("peers.py", "--batch", "0", timeout=60)
    assert r.returncode != 0 and "error" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_modular_finetune_targets_smoke(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "p = 7\nd_model = 16\ntrain_frac = 0.6\nmax_steps = 40\nlog_every = 20\n"
        'checkpoint_every = 40\nrank = 4\nalpha = 2.0\nschedule = "cosine"\n'
        "warmup = 5\nclip = 1.0\n"
    )
    out = tmp_path / "r.json"
    r = _run(
        "modular_finetune_targets.py",
        "--config",
        str(cfg),
        "--depth",
        "2",
        "--seeds",
        "2",
        "--ft-steps",
        "50",
        "--grid",
        "V:1e-3:4:0.01",
        "ALL:1e-3:0:0.01",
        "--json",
        str(out),
        pythonpath=str(BENCH.parent),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"V:1e-3:4:0.01 \|\s+\d\.\d{3} \| \d\.\d{3} \(\d\.\d{3}\)", r.stdout)
    assert "ALL:1e-3:0:0.01" in r.stdout
    import json

    res = json.loads(out.read_text())["results"]
    assert [x["setting"] for x in res] == ["V:1e-3:4:0.01", "ALL:1e-3:0:0.01"]
    assert all(len(x["sub_test_acc"]) == 2 and 0 <= min(x["sub_test_acc"]) for x in res)


@pytest.mark.slow
def test_family_benchmark_smoke():
    # Tiny sizes: a row per variant, and jaxattn agreeing with the hand-written scan of
    # the same maths (the last column, float32 rounding).
    r = _run(
        "family.py", "--n", "16", "--d", "4", "--steps", "6", "--repeat", "1",
        timeout=300, pythonpath=str(BENCH.parent),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"^\| \d heads?,", line)]
    assert len(rows) == 3, r.stdout
    for line in rows:
        assert float(line.rstrip(" |").split("|")[-1]) < 1e-5, line
