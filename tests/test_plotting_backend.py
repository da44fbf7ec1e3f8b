"""The library never switches matplotlib's backend (a notebook that runs a sweep keeps
showing its own figures); the CLI picks a headless one unless the user chose."""

import subprocess
import sys
import textwrap


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
