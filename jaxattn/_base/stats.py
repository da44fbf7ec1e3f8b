"""Small statistics the analyses share (NumPy, float64): a median that skips non-finite
entries, and a power-law fit in log-log coordinates with its 95 % interval."""

from __future__ import annotations

import warnings

import numpy as np


def nanmedian(a, axis=None):
    """Median over finite entries (inf and NaN ignored); NaN where none, no warning."""
    a = np.asarray(a, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(np.where(np.isfinite(a), a, np.nan), axis=axis)


def loglog_fit(x, y, *, groups=None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Fit `y = c·x^s` by least squares in log-log. With `groups` (array (G, len(x)) of
    per-group y values, e.g. per initial condition), the 95 % interval comes from a
    bootstrap over groups of the median curve; otherwise from the OLS standard error."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(y) & (y > 0) & (x > 0)
    if ok.sum() < 2:
        return {
            "slope": None,
            "prefactor": None,
            "slope_ci95": None,
            "prefactor_ci95": None,
            "points": int(ok.sum()),
        }
    lx, ly = np.log(x[ok]), np.log(y[ok])
    s, b = np.polyfit(lx, ly, 1)
    out = {"slope": float(s), "prefactor": float(np.exp(b)), "points": int(ok.sum())}
    if groups is not None:
        groups = np.asarray(groups, np.float64)
        rng = np.random.default_rng(seed)
        ss, bs = [], []
        for _ in range(n_boot):
            pick = groups[rng.integers(0, groups.shape[0], groups.shape[0])]
            med = nanmedian(pick, axis=0)
            good = np.isfinite(med) & (med > 0) & (x > 0)
            if good.sum() >= 2:
                s_b, b_b = np.polyfit(np.log(x[good]), np.log(med[good]), 1)
                ss.append(s_b)
                bs.append(b_b)
        out["slope_ci95"] = [float(np.percentile(ss, 2.5)), float(np.percentile(ss, 97.5))]
        out["prefactor_ci95"] = [
            float(np.exp(np.percentile(bs, 2.5))),
            float(np.exp(np.percentile(bs, 97.5))),
        ]
        out["ci_method"] = f"bootstrap over {groups.shape[0]} initial conditions ({n_boot} draws)"
    else:
        resid = ly - (s * lx + b)
        dof = max(lx.size - 2, 1)
        se = np.sqrt(resid @ resid / dof / np.sum((lx - lx.mean()) ** 2))
        out["slope_ci95"] = [float(s - 1.96 * se), float(s + 1.96 * se)]
        out["prefactor_ci95"] = None
        out["ci_method"] = "OLS standard error (normal approximation)"
    return out
