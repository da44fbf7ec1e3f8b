"""The `jaxattn` CLI: specs in TOML and JSON, the demo, and one-line errors (exit 2,
no traceback, no output file left behind)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxattn.cli import main

TOML = """
dynamics = "rescaled"
beta = 1.0
dtype = "float64"
Q = [[1.0, 0.0], [0.0, 1.0]]
[init]
x0 = [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]]
[lora]
target = "V"
A = [[0.0, 1.0]]
B = [[0.0], [-0.1]]
alpha = 1.0
[solve]
t1 = 2.0
solver = "rk4"
dt = 0.1
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_simulate_toml(tmp_path, capsys):
    spec = _write(tmp_path, "s.toml", TOML)
    out = str(tmp_path / "o.npz")
    assert main(["simulate", spec, "--out", out]) == 0
    z = np.load(out)
    assert z["ts"].shape == (21,) and z["xs"].shape == (21, 3, 2)
    resolved = json.loads(str(z["spec"]))
    assert resolved["lora"]["B"] == [[0.0], [-0.1]] and resolved["dynamics"] == "rescaled"
    assert "wrote" in capsys.readouterr().out
    # Same seed, same numbers: the run is deterministic.
    out2 = str(tmp_path / "o2.npz")
    assert main(["simulate", spec, "--out", out2]) == 0
    np.testing.assert_array_equal(np.load(out2)["xs"], z["xs"])


def test_simulate_json_random_init_and_lora(tmp_path):
    spec = {
        "dynamics": "sphere",
        "beta": 2.0,
        "init": {"kind": "sphere", "n": 7, "d": 3, "seed": 4},
        "lora": {"target": "K", "rank": 2, "norm": 0.2, "seed": 1},
        "solve": {
            "t1": 1.0,
            "solver": "dopri5",
            "rtol": 1e-7,
            "atol": 1e-9,
            "ts": [0.0, 0.5, 1.0],
            "renormalise": True,
        },
    }
    p = _write(tmp_path, "s.json", json.dumps(spec))
    out = str(tmp_path / "o.npz")
    assert main(["simulate", p, "--out", out]) == 0
    z = np.load(out)
    assert z["xs"].shape == (3, 7, 3) and float(z["norm_drift"]) < 1e-12
    lora = json.loads(str(z["spec"]))["lora"]
    assert np.linalg.norm(np.asarray(lora["B"]) @ np.asarray(lora["A"]) / 2, 2) == pytest.approx(
        0.2, rel=1e-10
    )
    # The saved spec (random draws written out) runs again as it is, to the same numbers;
    # the draw's parameters are kept as provenance under [init] drawn.
    saved = json.loads(str(z["spec"]))
    assert saved["init"]["drawn"] == {"kind": "sphere", "n": 7, "d": 3, "seed": 4}
    again = str(tmp_path / "again.npz")
    assert (
        main(["simulate", _write(tmp_path, "saved.json", json.dumps(saved)), "--out", again]) == 0
    )
    np.testing.assert_array_equal(np.load(again)["xs"], z["xs"])
    assert json.loads(str(np.load(again)["spec"])) == saved


BAD = [
    ("", r"needs an \[init\] table"),
    ('[init]\nkind="uniform"\nn=2\nd=2\n[init.drawn]\nseed=1\n[solve]\nt1=1.0', "drawn records"),
    ('dynamics = "foo"\n[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0', "unknown dynamics 'foo'"),
    ("colour = 1\n[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0", "unknown key in the spec: colour"),
    ("[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0\ndtt=0.1", r"unknown key in \[solve\]: dtt"),
    ("[init]\nx0=[[0.0,1.0],[1.0]]\n[solve]\nt1=1.0", "ragged"),
    ("[init]\nx0=[[nan,1.0]]\n[solve]\nt1=1.0", "NaN or inf"),
    ("[init]\nx0=[]\n[solve]\nt1=1.0", "x0"),
    ("Q=[[1.0,0.0]]\n[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0", "square"),
    (
        "V=[[1.0,0.0,0.0],[0.0,1.0,0.0],[0.0,0.0,1.0]]\n[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0",
        "d = 2",
    ),
    ("[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0\ndt=0.0", "dt must be finite and > 0"),
    ("[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=-1.0", "t1 must be ≥ 0"),
    ('[init]\nx0=[[0.0,1.0]]\n[solve]\nt1=1.0\nsolver="rk9"', "unknown solver 'rk9'"),
    (
        '[init]\nx0=[[0.0,1.0]]\n[lora]\ntarget="W"\nrank=1\nnorm=0.1\n[solve]\nt1=1.0',
        "unknown lora target 'W'",
    ),
    ("[init]\nx0=[[0.0,1.0]]\n[lora]\nrank=3\nnorm=0.1\n[solve]\nt1=1.0", "rank 3 exceeds"),
    (
        "[init]\nx0=[[0.0,1.0]]\n[lora]\nA=[[1.0,0.0]]\nB=[[1.0,0.0],[0.0,1.0]]\n[solve]\nt1=1.0",
        "rank mismatch",
    ),
    ('[init]\nkind="gaussian"\nn=3\nd=2\n[solve]\nt1=1.0', "unknown init kind"),
    # was "contains NaN or inf" after a NumPy overflow warning
    ('dtype="float32"\n[init]\nx0=[[1e39,0.0]]\n[solve]\nt1=1.0', "beyond float32's largest"),
    ("[init]\nx0=[[0.0,1.0]]", r"needs t1"),
    ("this is = = not toml", "cannot parse"),
]


@pytest.mark.parametrize("text,match", BAD)
def test_bad_specs_one_line_exit_2_no_output(tmp_path, capsys, text, match):
    import re

    spec = _write(tmp_path, "bad.toml", text)
    out = tmp_path / "o.npz"
    assert main(["simulate", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxattn: error:")
    assert re.search(match, err), err
    assert not out.exists() and os.listdir(tmp_path) == ["bad.toml"]


def test_missing_spec_and_unwritable_out(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    spec = _write(tmp_path, "s.toml", TOML)
    assert main(["simulate", spec, "--out", str(tmp_path / "no" / "dir" / "o.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["simulate", spec, "--out", "/proc/o.npz"]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["simulate", spec, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    spec = _write(
        tmp_path,
        "bad.json",
        '{"dynamics": "plain", "init": {"x0": [[1, 2]]}, "solve": {"t1": 1.0, "dt": -1}}',
    )
    r = subprocess.run(
        [sys.executable, "-m", "jaxattn", "simulate", spec, "--out", str(tmp_path / "o.npz")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "dt must be finite and > 0" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "jaxattn", "frobnicate"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"trajectories.png", "divergence.png", "summary.json", "trajectories.npz"} <= names
    assert not any(n.startswith(".tmp-") for n in names)
    s = json.loads((out / "summary.json").read_text())
    assert s["clusters_original"] >= 1 and s["clusters_lora"] >= 1
    assert s["max_measured_over_bound"] <= 1.0
    assert s["certified_horizon_a_posteriori"] > 0


def test_every_cli_module_is_a_registered_command():
    """The CLI is one package: each module in it is a subcommand listed in COMMANDS (a new
    module that is not listed would silently be missing from `jaxattn --help`)."""
    import pkgutil

    import jaxattn.cli as cli

    modules = {m.name for m in pkgutil.iter_modules(cli.__path__)}
    assert modules == set(cli.COMMANDS)
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"simulate", "demo", "sweep", "reproduce", "modular", "real-model"} <= names
