"""The spiked random-matrix model: Monte Carlo vs the large-p prediction, and the fit.

Tolerance for MC vs prediction (p = 1000): the prediction is the p → ∞ limit. At finite p
- ‖H‖_F² fluctuates by O(s²) against (p + 1)s² (relative O(1/p)) and its mean is exact;
- an outlier fluctuates by O(s/√p) around θ + s²/θ with an O(1/p) bias: the mean over draws
  carries the fluctuation as a standard error (measured from the draws) plus the bias, taken
  as 5/p (measured: |bias| ≤ 0.4 % at p = 1000 away from the BBP point);
- when no spike survives, the top eigenvalue is the bulk edge 2s, whose mean sits below 2s by
  1.21·s·p^{-2/3} (Tracy–Widom, GOE), i.e. srank is high by ≈ 1.21·p^{-2/3} ≈ 1.2 %: allowed
  twice that.
So |mean MC − prediction| / prediction ≤ t·stderr + 5/p (+ 2.4·p^{-2/3} in the bulk regime),
with t the 99.95 % quantile of Student's t for draws − 1 degrees of freedom (six draws: the
standard error is itself noisy; a normal 3 failed 2 of 24 seeded checks in the bulk regime).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from hessrank.analysis.theory import (
    SpikedModel,
    fit_spectrum,
    monte_carlo_stable_rank,
    outlier_locations,
    predict_stable_rank,
    reversal_table,
)

pytestmark = pytest.mark.slow  # every test here takes seconds (make check skips them)

P = 1000


def _check_agreement(model: SpikedModel, ns, draws: int, seed: int = 0) -> None:
    mc = monte_carlo_stable_rank(model, ns, draws=draws, seed=seed)
    pred = predict_stable_rank(model, ns, seed=seed).set_index("n")
    for n, sub in mc.groupby("n"):
        v = sub["stable_rank"].to_numpy()
        want = float(pred.loc[n, "stable_rank"])
        rel = abs(v.mean() - want) / want
        se = v.std(ddof=1) / math.sqrt(len(v)) / want
        tol = scipy.stats.t.ppf(0.9995, len(v) - 1) * se + 5 / model.dim
        if pred.loc[n, "num_outliers"] == 0:
            tol += 2 * 1.21 * model.dim ** (-2 / 3)
        assert rel <= tol, (n, v.mean(), want, rel, tol)


def test_monte_carlo_matches_prediction_outlier_and_bulk_regimes():
    # two spikes: both outliers at n = 400, the second close to the BBP point at n = 25
    _check_agreement(SpikedModel(theta=(1.0, 0.6), sigma=2.0, dim=P), ns=(25, 400), draws=6)
    # a weak spike swallowed by the bulk at n = 25 (s = 0.6 > 0.2): top = bulk edge
    _check_agreement(SpikedModel(theta=(0.2,), sigma=3.0, dim=P), ns=(25,), draws=6)


def test_monte_carlo_matches_prediction_with_subspace_noise():
    _check_agreement(SpikedModel(theta=(1.0, 0.9, 0.8), sigma=1.0, dim=P, tau=1.0), ns=(100,),
                     draws=6, seed=3)


def test_monte_carlo_is_seeded():
    m = SpikedModel(theta=(1.0,), sigma=1.0, dim=50)
    a = monte_carlo_stable_rank(m, [10], draws=2, seed=7)
    b = monte_carlo_stable_rank(m, [10], draws=2, seed=7)
    c = monte_carlo_stable_rank(m, [10], draws=2, seed=8)
    assert a.equals(b) and not a.equals(c)
    assert a["stable_rank"].nunique() == 2  # draws are independent streams


def test_prediction_closed_forms():
    # BBP location, and a swallowed spike
    out = outlier_locations([2.0, -1.0, 0.1], s=0.5)
    assert out[0] == pytest.approx(2.125) and out[1] == pytest.approx(-1.25)
    assert np.isnan(out[2])
    # pure noise: ‖H‖_F² = (p+1)s², ‖H‖₂ = 2s → srank = (p + 1)/4
    pred = predict_stable_rank(SpikedModel(theta=(), sigma=1.0, dim=99), [4])
    assert pred["stable_rank"].item() == pytest.approx(25.0)
    # one strong spike: (θ² + (p+1)s²)/(θ + s²/θ)²
    pred = predict_stable_rank(SpikedModel(theta=(2.0,), sigma=1.0, dim=99), [4])
    assert pred["stable_rank"].item() == pytest.approx((4 + 100 / 4) / 2.125**2)


def test_reversal_only_with_subspace_noise():
    """The module docstring's table: the plain model keeps small n above large n on a trained
    spectrum; noise inside the outlier subspace reverses it."""
    trained = tuple(np.linspace(1.0, 0.55, 10))
    plain = reversal_table(SpikedModel(trained, 0.1, 2000), 50, 500)
    assert not plain["reverses"]
    assert plain["srank_small"] == pytest.approx(6.61, abs=0.01)
    assert plain["srank_large"] == pytest.approx(6.25, abs=0.01)
    mixed = reversal_table(SpikedModel(trained, 0.1, 2000, tau=0.25), 50, 500)
    assert mixed["reverses"]
    assert mixed["srank_small"] == pytest.approx(5.92, abs=0.02)
    initial = reversal_table(SpikedModel((1.0,), 4.0, 2000), 50, 500)
    assert initial["srank_small"] > 5 * initial["srank_large"]


@pytest.mark.parametrize("route", ["frobenius", "bulk_edge"])
def test_fit_recovers_known_parameters(route):
    model = SpikedModel(theta=(3.0, -2.0, 1.5), sigma=5.0, dim=1500)
    n = 100  # s = 0.5, bulk edge 1.0
    H = model.sample(n, np.random.default_rng(11))
    lam = scipy.linalg.eigvalsh(H)
    top = lam[np.argsort(-np.abs(lam))[:10]]  # what Lanczos would give: 3 outliers + 7 bulk
    kwargs = ({"frobenius_sq": float(np.sum(H * H))} if route == "frobenius"
              else {"bulk_edge": 2 * model.noise_scale(n)})
    fit = fit_spectrum(top, model.dim, n=n, **kwargs)
    assert len(fit.theta) == 3
    # outliers fluctuate by O(s/√p) ≈ 0.013; the fitted s by O(1/p) relatively
    np.testing.assert_allclose(fit.theta, [3.0, -2.0, 1.5], atol=0.05)
    assert fit.sigma == pytest.approx(5.0, rel=0.02)
    assert fit.model().dim == 1500


def test_fit_errors():
    with pytest.raises(ValueError, match="frobenius_sq or bulk_edge"):
        fit_spectrum([1.0], 10)
    fit = fit_spectrum([1.0, 0.1], 10, frobenius_sq=1.5)
    with pytest.raises(ValueError, match="pass n"):
        fit.model()
    with pytest.raises(ValueError, match="dim must exceed"):
        SpikedModel(theta=(1.0, 2.0), sigma=1.0, dim=2)
