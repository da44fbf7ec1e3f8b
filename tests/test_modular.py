"""Modular-arithmetic transformer: data, model, LoRA, training, resume, CLI."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cli import main
from jaxattn.modular import (
    ModularTransformer,
    all_pairs,
    finetune,
    half_life,
    make_config,
    pretrain,
    split_indices,
    trainable_filter,
)
from jaxattn.modular._config import pretrain_fingerprint
from jaxattn.modular._train import adamw, save_tree

TINY = {
    "p": 7,
    "d_model": 16,
    "depth": 2,
    "max_steps": 120,
    "log_every": 20,
    "checkpoint_every": 40,
    "ft_steps": 60,
    "ft_log_every": 10,
    "ft_checkpoint_every": 20,
    "rank": 4,
    "alpha": 2.0,
    "lr": 3e-3,
    "ft_lr": 1e-3,
    "train_frac": 0.6,
    "target_acc": 1.0,
}


def tiny(**kw):
    return make_config(**(TINY | kw))


# -- data ---------------------------------------------------------------------------
def test_data_layout():
    tok, lab = all_pairs(7, "+")
    assert tok.shape == (49, 4) and tok.dtype == np.int32
    assert list(tok[3 * 7 + 5]) == [3, 8, 5, 7]  # x, '+', y, '='
    assert lab[3 * 7 + 5] == 1
    tok, lab = all_pairs(7, "-")
    assert list(tok[2 * 7 + 5]) == [2, 9, 5, 7] and lab[2 * 7 + 5] == (2 - 5) % 7


def test_split_is_deterministic():
    a = split_indices(11, 0.6, 3)
    b = split_indices(11, 0.6, 3)
    c = split_indices(11, 0.6, 4)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert len(a[0]) == round(0.6 * 121)
    assert sorted(np.concatenate(a).tolist()) == list(range(121))


# -- model ----------------------------------------------------------------------------
def _random_loras(model, key):
    """Give the model's LoRAs non-zero B (fresh ones have B = 0)."""
    los = []
    for lo, k in zip(model.loras, jax.random.split(key, len(model.loras))):
        B = jax.random.normal(k, lo.B.shape, lo.B.dtype)
        los.append(eqx.tree_at(lambda m: m.B, lo, B))
    return eqx.tree_at(lambda m: m.loras, model, tuple(los))


def test_lora_scaling_alpha_over_r():
    c = tiny(dtype="float64")
    m = ModularTransformer(c, key=jax.random.key(0)).with_loras(
        ("V", "O"), rank=4, alpha=2.0, key=jax.random.key(1)
    )
    tok = jnp.asarray(all_pairs(7, "+")[0][:5])
    assert jnp.array_equal(jax.vmap(m)(tok), jax.vmap(m.without_loras())(tok))  # B = 0
    m = _random_loras(m, jax.random.key(2))
    lo = m.loras[0]
    V = m.block.V[0]
    want = V + (2.0 / 4) * (lo.B[0] @ lo.A[0])
    np.testing.assert_allclose(m.weight("V"), want, rtol=1e-12)
    # the output equals a model whose base weights are the merged ones
    merged = eqx.tree_at(
        lambda mm: (mm.block.V, mm.block.O),
        m.without_loras(),
        (m.weight("V")[None], m.weight("O")[None]),
    )
    np.testing.assert_allclose(jax.vmap(m)(tok), jax.vmap(merged)(tok), rtol=1e-10, atol=1e-12)


def test_residual_stream_is_euler_of_particle_dynamics():
    from jaxattn import PlainField, simulate

    c = tiny(dtype="float64", depth=3)
    m = ModularTransformer(c, key=jax.random.key(0)).with_loras(
        ("V",), rank=2, alpha=1.0, key=jax.random.key(1)
    )
    m = _random_loras(m, jax.random.key(3))
    tok = jnp.asarray(all_pairs(7, "+")[0][:3])
    xs = jax.vmap(m.residual_stream)(tok)  # (3, depth+1, 4, d)
    Q, K, V, beta = m.particle_weights()
    sol = simulate(
        PlainField(Q, K, V, beta=beta, dtype=jnp.float64), xs[:, 0], 3.0, solver="euler", dt=1.0
    )
    np.testing.assert_allclose(sol.xs, xs, rtol=1e-10, atol=1e-10)


def test_fused_layer_is_the_same_function():
    tok = jnp.asarray(all_pairs(7, "+")[0])
    for kw in ({}, {"layernorm": True, "tied": False}):
        outs = []
        for fused in (True, False):
            m = ModularTransformer(tiny(dtype="float64", fused=fused, **kw), key=jax.random.key(0))
            m = _random_loras(
                m.with_loras(("Q", "V", "O"), rank=2, alpha=1.0, key=jax.random.key(1)),
                jax.random.key(2),
            )
            outs.append(jax.vmap(m)(tok))
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_options_untied_layernorm_heads_run():
    c = tiny(tied=False, layernorm=True, heads=2, depth=3)
    m = ModularTransformer(c, key=jax.random.key(0)).with_loras(
        ("Q", "K"), rank=2, alpha=1.0, key=jax.random.key(1)
    )
    assert m.block.Q.shape == (3, 16, 16) and m.loras[0].A.shape == (3, 2, 16)
    out = jax.vmap(m)(jnp.asarray(all_pairs(7, "+")[0][:4]))
    assert out.shape == (4, 7) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_half_life():
    assert half_life([0, 10, 20], [1.0, 0.8, 0.4]) == pytest.approx(17.5)
    assert half_life([0, 10], [1.0, 0.9]) is None


# -- training, resume, fine-tuning -------------------------------------------------------
class Killed(Exception):
    pass


def _kill_at(step):
    def on_log(s, row):
        if s == step:
            raise Killed

    return on_log


def test_pretrain_resume_after_kill_is_identical(tmp_path):
    c = tiny()
    m_ref, rows_ref, _ = pretrain(c, str(tmp_path / "ref"))
    with pytest.raises(Killed):  # killed at step 100, last checkpoint at 80
        pretrain(c, str(tmp_path / "run"), on_log=_kill_at(100))
    m, rows, s = pretrain(c, str(tmp_path / "run"))
    assert s["resumed_from"] == 80
    assert rows == rows_ref
    assert bool(eqx.tree_equal(m, m_ref))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert saved == rows_ref and [r["step"] for r in saved] == list(range(0, 121, 20))
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == len(rows) + 1


def test_finetune_freezes_base_and_resumes(tmp_path):
    c = tiny()
    base, _, _ = pretrain(c, str(tmp_path / "pre"))
    bp = str(tmp_path / "pre" / "model.eqx")
    tuned, rows_ref, s = finetune(c, str(tmp_path / "ft_ref"), bp)
    # base weights unchanged, only the LoRA factors moved
    assert bool(eqx.tree_equal(tuned.without_loras(), base))
    assert float(jnp.max(jnp.abs(tuned.loras[0].B))) > 0
    assert s["add_acc_start"] == rows_ref[0]["add_all_acc"]
    # no optimiser state for frozen leaves
    model = base.with_loras(("V",), rank=4, alpha=2.0, key=jax.random.key(0))
    params, _ = eqx.partition(model, trainable_filter(model, lora_only=True))
    assert len(jax.tree.leaves(params)) == 2
    with jax.numpy_dtype_promotion("standard"):
        state = adamw(1e-3, 0.9, 0.98, 0.0, 0, "float32").init(params)
    n_float = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    lora_size = sum(x.size for x in jax.tree.leaves(params))
    assert n_float == 2 * lora_size  # Adam's mu and nu for A and B only
    # resume after a kill
    with pytest.raises(Killed):
        finetune(c, str(tmp_path / "ft"), bp, on_log=_kill_at(50))
    tuned2, rows, s2 = finetune(c, str(tmp_path / "ft"), bp)
    assert s2["resumed_from"] == 40 and rows == rows_ref
    assert bool(eqx.tree_equal(tuned2, tuned))


# -- command line --------------------------------------------------------------------------
def _cfg(tmp_path, name="c.json", **kw):
    path = tmp_path / name
    path.write_text(json.dumps(TINY | kw))
    return str(path)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"p": 9}, "prime"),
        ({"p": 3}, "prime"),
        ({"depth": 0}, "depth"),
        ({"rank": 17}, "rank 17 exceeds d_model"),
        ({"targets": ["W"]}, "unknown LoRA target"),
        ({"nonsense": 1}, "unknown config key"),
    ],
)
def test_cli_bad_config(tmp_path, capsys, bad, msg):
    out = tmp_path / "out"
    assert main(["modular", "pretrain", "--config", _cfg(tmp_path, **bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_unreadable_config(tmp_path, capsys):
    for path in (tmp_path / "missing.toml", tmp_path / "garbage.toml"):
        if "garbage" in path.name:
            path.write_bytes(b"p = = \xff")
        assert main(["modular", "study", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxattn: error:") and err.count("\n") == 1


def test_cli_pretrain_finetune_and_foreign_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, max_steps=40)
    assert main(["modular", "pretrain", "--config", cfg, "--out", str(out)]) == 0
    assert main(["modular", "finetune", "--config", cfg, "--out", str(out)]) == 0
    assert (out / "finetune" / "summary.json").exists()
    capsys.readouterr()
    files = {
        p: p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".jaxattn-lock")
    }
    other = _cfg(tmp_path, "other.json", max_steps=40, d_model=8, rank=2, ranks=[1, 2])
    for action in ("pretrain", "finetune"):
        assert main(["modular", action, "--config", other, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "another configuration" in err and err.count("\n") == 1
    # a rerun asking for fewer steps than its checkpoint holds cannot go back: refused,
    # instead of a summary recording max_steps = 20 beside steps = 40
    for action, key in (("pretrain", "max_steps"), ("finetune", "ft_steps")):
        fewer = _cfg(tmp_path, "fewer.json", **({"max_steps": 40} | {key: 20}))
        assert main(["modular", action, "--config", fewer, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"past {key} = 20" in err and err.count("\n") == 1
    assert {
        p: p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".jaxattn-lock")
    } == files
    # fine-tuning without a pre-trained model
    assert main(["modular", "finetune", "--config", cfg, "--out", str(tmp_path / "e")]) == 2
    assert "no pre-trained model" in capsys.readouterr().err


def _fake_checkpoint(folder, kind, fingerprint, step):
    folder.mkdir(parents=True, exist_ok=True)
    header = {"kind": kind, "fingerprint": fingerprint, "step": step, "metrics": []}
    save_tree(str(folder / "checkpoint.eqx"), header | {"stopped_at": None}, jnp.zeros(1))


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cli_refuses_before_creating_anything(tmp_path, capsys):
    """Refusals that need no training: each leaves the folder exactly as it was (no
    lock file, no sub-folder) and says why in one line."""
    out = tmp_path / "out"

    def refused(action, cfg, msg, quick=False):
        before = _tree(out) if out.exists() else None
        argv = ["modular", action, "--config", cfg, "--out", str(out)]
        assert main(argv + (["--quick"] if quick else [])) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert (_tree(out) if out.exists() else None) == before

    c = tiny()
    # sizes and rules that a single config does not show
    refused("pretrain", _cfg(tmp_path, d_model=200_000), "full-batch training")
    refused("pretrain", _cfg(tmp_path, max_steps=20), "needs max_steps (20) > warmup", True)
    wide = _cfg(tmp_path, capacity_widths=[300_000], capacity_lrs=[1e-3])
    refused("study", wide, "d_model = 300000")
    # checkpoints already there: garbage, past the steps asked for, another schedule
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "checkpoint.eqx").write_bytes(b"garbage\n")
    refused("pretrain", _cfg(tmp_path), "is not a jaxattn modular checkpoint")
    _fake_checkpoint(out / "pretrain", "pretrain", pretrain_fingerprint(c), 400)
    refused("pretrain", _cfg(tmp_path), "at step 400, past max_steps = 120")
    # a cosine decay spans max_steps: another max_steps is another run from step 0
    cos = tiny(schedule="cosine", warmup=10)
    _fake_checkpoint(out / "pretrain", "pretrain", pretrain_fingerprint(cos), 100)
    refused("pretrain", _cfg(tmp_path, schedule="cosine", warmup=10, max_steps=240), "max_steps")
    # the study checks every run's checkpoint before it starts the first
    run = out / "runs" / "d2_s0" / "pretrain"
    _fake_checkpoint(run, "pretrain", pretrain_fingerprint(c.replace(depth=2)), 400)
    refused("study", _cfg(tmp_path, depths=[1, 2], seeds=[0]), "at step 400")
    assert not any(p.name.startswith(".jaxattn-lock") for p in out.rglob("*"))


# -- the study protocol: schedule, clipping, the bar, reading forgetting, the trend test ----
def test_cosine_schedule_and_constant_schedule_unchanged():
    import optax

    # constant: the historical rule lr · min(1, (count + 1) / warmup), bit for bit
    p = {"w": jnp.ones((3,), jnp.float32)}
    g = {"w": jnp.asarray([0.3, -2.0, 1e-3], jnp.float32)}
    ref = optax.adamw(
        lambda c: (1e-3 * jnp.minimum(1, (c + 1).astype(jnp.float32) / 10)).astype(jnp.float32),
        b1=0.9,
        b2=0.98,
        weight_decay=0.5,
    )
    new = adamw(1e-3, 0.9, 0.98, 0.5, 10, "float32")
    sa, sb = ref.init(p), new.init(p)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(12):
            ua, sa = ref.update(g, sa, p)
            ub, sb = new.update(g, sb, p)
            np.testing.assert_array_equal(ua["w"], ub["w"])
    # cosine: warm-up to lr, then the cosine to min_lr_frac · lr at total_steps. With
    # weight decay only (zero gradient, Adam's update is 0), the update is −lr_t · wd · p,
    # which reads the schedule off exactly.
    opt = adamw(
        1e-2, 0.9, 0.98, 1.0, 4, "float64", schedule="cosine", total_steps=20, min_lr_frac=0.1
    )
    p = jnp.ones((), jnp.float64)
    s = opt.init(p)
    got = []
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(22):
            u, s = opt.update(jnp.zeros((), jnp.float64), s, p)
            got.append(-float(u))
    want = [1e-2 * k / 4 for k in range(4)]
    want += [1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + np.cos(np.pi * (k - 4) / 16)) for k in range(4, 22)]
    want = [w if k <= 20 else 1e-3 for k, w in enumerate(want)]
    np.testing.assert_allclose(
        got, want, rtol=1e-6, atol=1e-12
    )  # optax evaluates the cosine in float32
    with pytest.raises(ValueError, match="total_steps"):
        adamw(1e-3, 0.9, 0.98, 0.0, 10, "float32", schedule="cosine", total_steps=5)


def test_clipping_scales_the_gradient_before_adam():
    import optax

    p = {"a": jnp.zeros((2,), jnp.float64), "b": jnp.zeros((), jnp.float64)}
    g = {"a": jnp.asarray([30.0, -40.0], jnp.float64), "b": jnp.asarray(120.0, jnp.float64)}
    norm = float(np.sqrt(30.0**2 + 40.0**2 + 120.0**2))  # 130
    clipped = jax.tree.map(lambda x: x * (2.0 / norm), g)
    opt = adamw(1e-3, 0.9, 0.98, 0.0, 0, "float64", clip=2.0)
    plain = optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=0.0)
    with jax.numpy_dtype_promotion("standard"):
        s, s_ref = opt.init(p), plain.init(p)
        for _ in range(3):
            u, s = opt.update(g, s, p)
            u_ref, s_ref = plain.update(clipped, s_ref, p)
            for k in p:
                np.testing.assert_allclose(u[k], u_ref[k], rtol=1e-12)
    # the second moment saw the clipped gradient, not the raw one
    nu = [x for x in jax.tree.leaves(s) if getattr(x, "shape", None) == (2,)]
    assert max(float(jnp.max(jnp.abs(x))) for x in nu) < 1.0


def test_the_bar_and_reading_forgetting_against_learning():
    from jaxattn.modular import at_learning, bar_text, meets_bar

    c = tiny(target_acc=0.0, target_train_acc=0.99, target_all_acc=0.9)
    assert meets_bar({"test_acc": 0.1, "train_acc": 0.995, "all_acc": 0.92}, c)
    assert not meets_bar({"test_acc": 1.0, "train_acc": 0.98, "all_acc": 0.99}, c)
    assert not meets_bar({"test_acc": 1.0, "train_acc": 1.0, "all_acc": 0.85}, c)
    assert bar_text(c) == "train acc ≥ 0.99, all-pairs acc ≥ 0.9"
    r = at_learning([0, 5, 10, 15], [0.0, 0.4, 0.6, 0.95], [1.0, 0.5, 0.3, 0.1])
    assert r == {"0.5": {"step": 10, "add_acc": 0.3}, "0.9": {"step": 15, "add_acc": 0.1}}
    r = at_learning([0, 5], [0.0, 0.2], [1.0, 0.5])
    assert r["0.5"] == {"step": None, "add_acc": None}
    for bad, msg in (
        ({"schedule": "linear"}, "schedule"),
        ({"target_all_acc": 1.5}, "target_all_acc"),
        ({"clip": -1.0}, "clip"),
        ({"capacity_widths": [0]}, "capacity_widths"),
    ):
        with pytest.raises(ValueError, match=msg):
            tiny(**bad)


def test_trend_test_against_numpy_and_scipy_definitions():
    from scipy import stats

    from jaxattn.modular import trend_test

    rng = np.random.default_rng(0)
    d = np.repeat([2, 4, 6, 8], 5)
    v = 300 - 20 * d + rng.normal(0, 15, d.size)
    t = trend_test(d.tolist(), v.tolist() + [None])  # a None is dropped, not counted
    assert t["n"] == 20
    # slope: ordinary least squares, as numpy's polyfit computes it
    slope, _ = np.polyfit(d, v, 1)
    assert t["slope"] == pytest.approx(slope, rel=1e-10)
    lo, hi = t["slope_ci95"]
    assert lo < -20 < hi and lo < slope < hi
    # Spearman's rho is Pearson's correlation of the ranks (ties: average ranks)
    rd, rv = stats.rankdata(d), stats.rankdata(v)
    assert t["spearman_rho"] == pytest.approx(np.corrcoef(rd, rv)[0, 1], rel=1e-12)
    assert t["spearman_rho"] < -0.8 and t["p_value"] < 1e-4
    # no trend: a shuffled response is not significant
    flat = trend_test(d.tolist(), rng.permutation(np.tile([1.0, 2.0, 3.0, 4.0, 5.0], 4)).tolist())
    assert flat["p_value"] > 0.05
    assert trend_test([2, 2, 2], [1.0, 2.0, 3.0])["p_value"] is None
    assert trend_test([2, 4, 6], [5.0, 5.0, 5.0])["p_value"] is None


@pytest.mark.slow
def test_study_summary_trend_and_capacity(tmp_path):
    from jaxattn.modular import run_study

    c = tiny(
        depths=(1, 2),
        seeds=(0, 1, 2),
        ranks=(4,),
        rank_depth=2,
        max_steps=60,
        ft_steps=30,
        schedule="cosine",
        warmup=5,
        clip=1.0,
        stop_at_target=False,
        target_acc=0.0,
        target_train_acc=0.05,
        target_all_acc=0.05,
        capacity_lrs=(1e-3,),
        capacity_widths=(8,),
        particle_prompts=4,
    )
    s = run_study(c, str(tmp_path), log=lambda *_: None)
    runs = {r["key"]: r for r in s["runs"]}
    assert set(runs) == {f"d{d}_s{k}_r4" for d in (1, 2) for k in (0, 1, 2)}
    # only models that meet the bar enter the per-depth statistics and the trend
    for d in (1, 2):
        ok = [runs[f"d{d}_s{k}_r4"] for k in (0, 1, 2) if runs[f"d{d}_s{k}_r4"]["reached_target"]]
        assert s["per_depth"][str(d)]["in_trend"] == len(ok)
        assert s["per_depth"][str(d)]["add_acc_start"]["values"] == [r["add_acc_start"] for r in ok]
    assert s["trend"]["half_life"]["n"] == sum(v["in_trend"] for v in s["per_depth"].values())
    assert isinstance(s["trend"]["verdict"], str)
    assert len(s["capacity"]) == 1 and s["capacity"][0]["d_model"] == 8
    assert s["capacity"][0]["steps"][-1] == 60  # no early stop for the evidence runs
    for name in ("forgetting", "tradeoff", "depth_summary", "pretrain", "capacity", "ranks"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    # the results table: one row per depth with the counts of the summary
    from jaxattn.modular._study import results_table

    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert table == results_table(s)
    for d in (1, 2):
        row = next(r for r in table.splitlines() if r.startswith(f"| {d} |"))
        assert f"| {s['per_depth'][str(d)]['in_trend']}/3 |" in row
    assert f"verdict: {s['trend']['verdict']}" in table


@pytest.mark.slow
def test_particle_divergence_runs_in_float64_without_precision_warnings():
    """The study's particle step is computed in float64 whatever the model was trained
    in: a float32 model whose `O V` has a wide eigenvalue spread (here scaled ×8, so that
    float32 logits cannot resolve it to T = depth) gives no `Float32PrecisionWarning` and
    the numbers of the same weights in float64, and 64-bit JAX is restored after."""
    import warnings

    from jaxattn import Float32PrecisionWarning
    from jaxattn.modular import particle_divergence

    base = ModularTransformer(tiny(dtype="float32", depth=3), key=jax.random.key(0))
    base = eqx.tree_at(lambda m: m.block.V, base, 8.0 * base.block.V)
    tuned = eqx.tree_at(lambda m: m.block.Q, base, 1.01 * base.block.Q)
    tokens, _ = all_pairs(7, "+")
    tokens = tokens[:6]
    jax.config.update("jax_enable_x64", False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Float32PrecisionWarning)
            got = particle_divergence(base, tuned, tokens)
        assert jax.config.read("jax_enable_x64") is False
        with pytest.warns(Float32PrecisionWarning):  # the float32 step would warn
            particle_divergence(base, tuned, tokens, dtype=jnp.float32)
    finally:
        jax.config.update("jax_enable_x64", True)
    base64, tuned64 = (
        jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, m)
        for m in (base, tuned)
    )
    want = particle_divergence(base64, tuned64, tokens)
    assert set(got) == {"div_euler", "rel_div_euler", "div_rk4", "rel_div_rk4"}
    for k in got:
        # the same maths; O·V is formed in the model's dtype (float32 rounding of O V)
        assert np.isclose(got[k], want[k], rtol=1e-5), (k, got[k], want[k])
