"""The library never switches matplotlib's backend (a notebook that runs a sweep keeps
showing its own figures); the CLI picks a headless one unless the user chose. And what
some figures draw: the sweep overview's final-value row, colours visible on white."""

import subprocess
import sys
import textwrap

import numpy as np


def _run(code: str, env_backend: str | None = None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    if env_backend:
        env["MPLBACKEND"] = env_backend
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_importing_the_plotting_modules_keeps_the_users_backend():
    out = _run("""
        import matplotlib
        matplotlib.use("svg")  # stands for a notebook's inline backend
        import jaxattn, jaxattn.plotting
        import jaxattn.plotting._real_model, jaxattn.plotting._mean_field
        import jaxattn._sweep.runner
        print(matplotlib.get_backend())
    """)
    assert out.lower() == "svg"


def test_cli_defaults_to_a_headless_backend_but_respects_mplbackend():
    code = """
        import os
        from jaxattn.cli import main
        main(["reproduce", "--list"])
        import matplotlib
        print(matplotlib.get_backend())
    """
    assert _run(code).lower() == "agg"
    assert _run(code, env_backend="svg").lower() == "svg"


def test_study_colours_stay_visible_on_white():
    """Every depth colour of the modular study's figures is dark enough to read on white
    (relative luminance ≤ 0.6; viridis's pale-yellow end is 0.87), also for one depth."""
    from jaxattn.plotting._modular import depth_colors

    def luminance(rgba):
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    for depths in ([6], [2, 6], [2, 3, 4, 5, 6, 7, 8]):
        cols = depth_colors(depths)
        assert set(cols) == set(depths)
        assert max(luminance(c) for c in cols.values()) <= 0.6, depths


def test_sweep_overview_draws_the_final_values_against_a_numeric_first_axis(tmp_path, monkeypatch):
    """With a numeric first axis the overview has a second row: each scalar summary at
    the final time against that axis, its line the median over the other axes (failed
    points left out); with a categorical first axis, one row only."""
    import matplotlib.pyplot as plt

    from jaxattn.plotting import sweep_overview

    rng = np.random.default_rng(0)
    eps = np.array([0.001, 0.01, 0.1])
    clusters = rng.integers(1, 5, size=(3, 4, 6)).astype(float)  # (ε, seed, t)
    status = np.zeros((3, 4), int)
    status[2, 0] = 3  # a failed point: left out
    result = {"ts": np.linspace(0, 1, 6), "grid_eps": eps, "status": status, "clusters": clusters}
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    assert sweep_overview(result, ["eps", "seed"], ["clusters"], str(tmp_path / "a.png"))
    fig = figs[-1]
    assert len(fig.axes) == 2
    line = fig.axes[1].get_lines()[0]
    want = [np.median(clusters[k, 1:, -1] if k == 2 else clusters[k, :, -1]) for k in range(3)]
    np.testing.assert_allclose(line.get_xdata(), eps)
    np.testing.assert_allclose(line.get_ydata(), want)
    assert fig.axes[1].get_xscale() == "log"
    result2 = {**result, "grid_target": np.array(["Q", "K", "V"])}
    assert sweep_overview(result2, ["target", "seed"], ["clusters"], str(tmp_path / "b.png"))
    assert len(figs[-1].axes) == 1
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()


def test_cluster_change_figure_shows_a_change_that_keeps_the_count(tmp_path, monkeypatch):
    """A merge and a split keep 3 clusters: the figure still shows the change (the tokens
    whose cluster partners changed are ringed, each cluster carries its size), and both
    panels colour tokens by their cluster without the LoRA."""
    import matplotlib.pyplot as plt

    from jaxattn.plotting import cluster_change_figure

    before = np.array([0, 0, 1, 1, 2, 2])
    after = np.array([0, 0, 0, 1, 2, 2])  # token 2 joins cluster 0
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    xa = x.copy()
    xa[2] = [0.0, 0.0]
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    cluster_change_figure(x, xa, before, after, str(tmp_path / "c.png"))
    fig = figs[-1]
    left, right = fig.axes[:2]
    assert len(right.collections) == 2 and len(left.collections) == 1  # the rings
    rings = right.collections[1].get_offsets()
    assert len(rings) == 4  # tokens 0, 1 (gained 2), 2, 3 (lost 2); 4 and 5 unchanged
    np.testing.assert_array_equal(
        left.collections[0].get_array(), right.collections[0].get_array()
    )  # colours: the clusters without the LoRA, in both panels
    sizes = sorted(t.get_text() for t in right.texts)
    assert sizes == ["1", "2", "3"]
    assert (tmp_path / "c.png").exists()
