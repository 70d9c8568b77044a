"""Stable rank ‖H‖_F²/‖H‖₂² and its relatives (top-k stable rank, intrinsic dimension)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import DenseOperator, exact_stable_rank, stable_rank

from .conftest import from_spectrum, indefinite, outliers

SEEDS = range(20)


def test_exact_stable_rank_matches_spectrum(spectrum):
    assert exact_stable_rank(spectrum.A) == pytest.approx(spectrum.srank, rel=1e-12)


@pytest.mark.parametrize("name", ["outliers", "indefinite"])
def test_within_one_percent_at_50_matvecs(spectra, name):
    # Outlier-dominated spectra: ‖H‖₂ converges to machine precision within a few Lanczos steps
    # and the Krylov space holds most of ‖H‖_F², so the sampled remainder is small. Measured max
    # relative error over 20 seeds: 0.03% (outliers), 0.5% (indefinite, whose [−1, 1] bulk
    # carries ~20% of ‖H‖_F²).
    s = spectra[name]
    res = [stable_rank(s.A, num_matvecs=50, seed=k) for k in SEEDS]
    values = np.array([r.value[0] for r in res])
    stderrs = np.array([r.stderr[0] for r in res])
    assert np.all(np.abs(values / s.srank - 1) < 0.01)
    # "Most seeds": the stderr comes from ~12 residual probes (Student-t-like tails), so a
    # 3-stderr interval is expected to miss occasionally; observed coverage ≥ 90%.
    assert np.mean(np.abs(values - s.srank) <= 3 * stderrs) >= 0.8
    assert all(r.num_matvecs == 50 for r in res)


def test_spectral_norm_and_its_error_bound(spectra):
    for name, expected in [("outliers", 100.0), ("indefinite", 20.0)]:
        r = stable_rank(spectra[name].A, num_matvecs=40, seed=1)
        # Well-separated outliers: converged to rounding; the reported bound covers the error.
        np.testing.assert_allclose(r.spectral_norm, [expected], rtol=1e-10)
        assert np.abs(r.spectral_norm[0] - expected) <= r.spectral_norm_error[0] + 1e-12 * expected
        assert r.top_eigenvalues[0, 0] == pytest.approx(-20.0 if name == "indefinite" else 100.0)


def test_spectral_norm_is_a_lower_bound_with_small_budget(spectra):
    # max|θ| ≤ ‖H‖₂ by interlacing (Ritz values lie in [λ_min, λ_max]), at any budget.
    s = spectra["wishart"]
    for k in range(5):
        r = stable_rank(s.A, num_matvecs=10, seed=k)
        assert r.spectral_norm[0] <= s.norm * (1 + 1e-12)


def test_stacked_stable_rank_per_slice(stack):
    # Each slice of the (4, p, p) stack is its own problem: the error of each slice stays within
    # 4 of its own reported stderr (the bulk-dominated Wishart slice has a ~2% error bar).
    A, items = stack
    r = stable_rank(A, num_matvecs=50, seed=0)
    truth = np.array([s.srank for s in items])
    assert r.value.shape == r.stderr.shape == (4,)
    assert r.top_eigenvalues.shape == (4, 10)
    assert np.all(np.abs(r.value - truth) <= 4 * r.stderr)
    assert len(r.rows()) == 4 and r.rows()[3]["stable_rank"] == pytest.approx(r.value[3])


def test_top_k_stable_rank_is_a_lower_bound(stack):
    # Σ_{i≤k} θ_i² ≤ ‖T‖_F² ≤ the deflated ‖H‖_F² estimate, so top-k ≤ the estimate always;
    # once θ_1 has converged (all four spectra at 40 matvecs) also ≤ the true stable rank.
    A, items = stack
    truth = np.array([s.srank for s in items])
    for k in range(5):
        r = stable_rank(A, num_matvecs=40, seed=k, k_top=5)
        assert np.all(r.top_k_stable_rank >= 1 - 1e-12)
        assert np.all(r.top_k_stable_rank <= r.value * (1 + 1e-12))
        assert np.all(r.top_k_stable_rank <= truth * (1 + 1e-9))
        assert np.all(r.top_k_stable_rank <= 5 + 1e-12)


def test_top_eigenvalues_ordered_by_magnitude(spectra):
    # The adaptive split stops Lanczos once the four outliers are captured (about 11 of the 40
    # products), so the smallest, 5, is converged to ~1e-8 rather than to rounding.
    r = stable_rank(spectra["indefinite"].A, num_matvecs=40, seed=2, k_top=4)
    np.testing.assert_allclose(r.top_eigenvalues[0], [-20.0, -12.0, 8.0, 5.0], rtol=1e-6)


@pytest.mark.parametrize("name", ["outliers", "wishart", "power_law"])
def test_intrinsic_dimension_for_psd(spectra, name):
    s = spectra[name]
    r = stable_rank(s.A, num_matvecs=40, seed=3)
    np.testing.assert_array_equal(r.intrinsic_dimension, r.trace / r.spectral_norm)
    # Compare with tr(H)/‖H‖₂: the trace is a deflated estimate, so within 3 of its stderr, plus
    # the (relative) error of ‖H‖₂ at 40 steps (< 1e-3 for the Wishart edge, tighter elsewhere).
    truth = s.trace / s.norm
    tol = 3 * r.trace_stderr[0] / r.spectral_norm[0] + 1e-3 * truth
    assert abs(r.intrinsic_dimension[0] - truth) <= tol


def test_exact_once_lanczos_spans_the_space():
    s = indefinite(p=40)
    n = 60
    assert n >= s.p  # the budget reaches p: Lanczos spans the space, no probe is drawn
    op = DenseOperator(s.A)
    r = stable_rank(op, num_matvecs=n, seed=0)
    np.testing.assert_allclose(r.value, [s.srank], rtol=1e-10)
    np.testing.assert_allclose(r.frobenius_sq, [s.fro_sq], rtol=1e-10)
    np.testing.assert_allclose(r.trace, [s.trace], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.stderr, [0.0], atol=1e-10 * s.srank)  # ‖H‖₂ bound ~ rounding
    assert r.num_matvecs == s.p == op.num_matvecs


def test_exact_when_budget_reaches_p():
    s = outliers(p=40)
    r = stable_rank(s.A, num_matvecs=s.p, seed=0)
    np.testing.assert_allclose(r.value, [s.srank], rtol=1e-10)


def test_same_seed_identical_different_seed_different(spectra):
    A = spectra["wishart"].A
    a, b = stable_rank(A, num_matvecs=20, seed=9), stable_rank(A, num_matvecs=20, seed=9)
    assert a.rows() == b.rows()
    c = stable_rank(A, num_matvecs=20, seed=10)
    assert not np.allclose(a.value, c.value, rtol=1e-9)


def test_value_is_never_below_one_rank_one():
    # Rank one: srank = 1 exactly and the Krylov space is invariant after two steps.
    lam = np.concatenate([[3.0], np.zeros(29)])
    r = stable_rank(from_spectrum(lam, seed=1), num_matvecs=12, seed=0)
    np.testing.assert_allclose(r.value, [1.0], rtol=1e-10)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("n", [0, 3, 9])
def test_too_small_budget(n):
    with pytest.raises(ValueError, match=rf"stable_rank needs num_matvecs >= 10 .*got {n}"):
        stable_rank(torch.eye(10, dtype=torch.float64), num_matvecs=n)


def test_too_many_probes_leave_no_lanczos_step():
    with pytest.raises(ValueError, match="leaves no Lanczos step after 6 residual probes"):
        stable_rank(torch.eye(10, dtype=torch.float64), num_matvecs=6, num_probes=6)


def test_zero_operator_has_no_stable_rank():
    with pytest.raises(ValueError, match="zero on the Krylov space: the stable rank is undefined"):
        stable_rank(torch.zeros(8, 8, dtype=torch.float64), num_matvecs=8)


def test_nonsymmetric_and_nan_rejected():
    with pytest.raises(ValueError, match="not symmetric"):
        stable_rank(torch.triu(torch.ones(6, 6, dtype=torch.float64)), num_matvecs=6)
    A = torch.eye(6, dtype=torch.float64)
    A[3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        stable_rank(A, num_matvecs=6)


def test_k_top_must_be_positive():
    with pytest.raises(ValueError, match="k_top"):
        stable_rank(torch.eye(10, dtype=torch.float64), num_matvecs=8, k_top=0)
