"""The analyses' shared statistics against independent references (SciPy, NumPy)."""

import numpy as np
import pytest
from scipy import stats

from jaxattn._base.stats import loglog_fit, nanmedian


def test_nanmedian_skips_inf_and_nan():
    a = np.array([[1.0, np.inf, 3.0, np.nan], [np.nan, np.nan, np.nan, np.inf]])
    got = nanmedian(a, axis=1)
    assert got[0] == 2.0 and np.isnan(got[1])
    assert nanmedian([5.0, -np.inf, 1.0]) == 3.0


def test_loglog_fit_matches_scipy_linregress():
    """Without groups: OLS in log-log, interval = slope ± 1.96·SE (SciPy's stderr)."""
    rng = np.random.default_rng(0)
    x = np.logspace(-3, -1, 12)
    y = 0.54 * x**-1.0 * np.exp(0.05 * rng.standard_normal(x.size))
    fit = loglog_fit(x, y)
    ref = stats.linregress(np.log(x), np.log(y))
    np.testing.assert_allclose(fit["slope"], ref.slope, rtol=1e-12)
    np.testing.assert_allclose(fit["prefactor"], np.exp(ref.intercept), rtol=1e-12)
    np.testing.assert_allclose(
        fit["slope_ci95"], [ref.slope - 1.96 * ref.stderr, ref.slope + 1.96 * ref.stderr]
    )
    assert fit["points"] == 12


def test_loglog_fit_drops_nonpositive_and_needs_two_points():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    fit = loglog_fit(x, np.array([1.0, np.inf, 0.25, -1.0]))  # only x = 1, 4 usable
    assert fit["points"] == 2
    np.testing.assert_allclose(fit["slope"], -1.0, rtol=1e-12)
    assert loglog_fit(x, np.array([1.0, np.nan, 0.0, np.inf]))["slope"] is None


@pytest.mark.parametrize("seed", [0, 1])
def test_loglog_fit_bootstrap_interval_covers_the_true_slope(seed):
    """Groups (per-initial-condition curves with the exact slope −2 and multiplicative
    noise): the fit of the median curve is near −2 and the bootstrap interval contains it;
    same seed, same interval."""
    rng = np.random.default_rng(seed)
    x = np.linspace(1.0, 10.0, 8)
    groups = 3.0 * x[None, :] ** -2.0 * np.exp(0.1 * rng.standard_normal((20, x.size)))
    fit = loglog_fit(x, np.median(groups, axis=0), groups=groups, n_boot=400, seed=3)
    lo, hi = fit["slope_ci95"]
    assert lo < -2.0 < hi and hi - lo < 0.5
    assert abs(fit["slope"] + 2.0) < 0.1
    again = loglog_fit(x, np.median(groups, axis=0), groups=groups, n_boot=400, seed=3)
    assert again["slope_ci95"] == fit["slope_ci95"]
