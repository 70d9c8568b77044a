"""Hutchinson, Hutch++ and the Krylov-deflated tr(H) / ‖H‖_F² estimators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import deflated_estimate, frobenius_sq, hutchinson, hutchpp, trace, xtrace

from .conftest import from_spectrum, indefinite, outliers, power_law

SEEDS = range(40)


def seed_study(estimate, seeds=SEEDS) -> tuple[np.ndarray, np.ndarray]:
    """Values and reported stderrs over seeds, each (S, J)."""
    results = [estimate(seed) for seed in seeds]
    return np.array([r.value for r in results]), np.array([r.stderr for r in results])


def assert_unbiased_with_honest_stderr(values, stderrs, truth, *, what: str):
    """Mean over seeds within 3 SEM of the truth; reported stderr is of the seed spread's size.

    The stderr check compares the RMS of the reported stderr with the spread over seeds: the
    sample variance is unbiased for the variance, so E[se²] = Var(estimate) and the ratio is ~1
    (its sampling error over 40 seeds is well inside [0.5, 2]). The RMS, not the median, because
    a stderr from a handful of probes is skewed (chi-square-like) and its median runs low.
    """
    S = values.shape[0]
    spread = values.std(axis=0, ddof=1)
    sem = spread / np.sqrt(S)
    # 1e-12·|truth| floor: where the estimate is exact up to rounding the SEM is ~0.
    floor = 1e-12 * np.abs(truth)
    np.testing.assert_array_less(np.abs(values.mean(axis=0) - truth), 3 * sem + floor,
                                 err_msg=f"{what}: mean over seeds is biased")
    ratio = np.sqrt(np.mean(stderrs**2, axis=0)) / spread
    # Up to 2.5: the reported stderr is t-widened (×t_{0.9875}(dof)/2, 1.2 at 20 probes) and
    # floored by a worst-case variance bound where few probes can miss outliers; plain
    # Hutchinson's floor 2‖H‖_F² is twice the Rademacher variance 2(‖H‖_F² − Σ H_ii²) on Wishart.
    assert np.all((ratio > 0.5) & (ratio < 2.5)), f"{what}: stderr/spread ratios {ratio}"


ESTIMATORS = {
    "hutchinson-rademacher": (lambda A, s: hutchinson(A, num_matvecs=20, seed=s), "trace"),
    "hutchinson-gaussian": (
        lambda A, s: hutchinson(A, num_matvecs=20, seed=s, distribution="gaussian"), "trace"),
    "hutch++": (lambda A, s: trace(A, num_matvecs=30, seed=s, method="hutch++"), "trace"),
    "trace-deflated": (lambda A, s: trace(A, num_matvecs=24, seed=s, method="deflated"), "trace"),
    "xtrace": (lambda A, s: xtrace(A, num_matvecs=30, seed=s), "trace"),
    "frobenius-fixed-split": (
        lambda A, s: frobenius_sq(A, num_matvecs=24, seed=s, num_probes=6), "fro_sq"),
    "frobenius-deflated": (lambda A, s: frobenius_sq(A, num_matvecs=24, seed=s), "fro_sq"),
    "frobenius-hutchinson": (
        lambda A, s: frobenius_sq(A, num_matvecs=20, seed=s, method="hutchinson"), "fro_sq"),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased_on_stacked_spectra(stack, name):
    # One stacked (4, 200, 200) operator: Wishart, power law, indefinite, outliers. Each slice
    # must be an unbiased estimate of its own matrix, with an honest error bar.
    A, items = stack
    fn, quantity = ESTIMATORS[name]
    values, stderrs = seed_study(lambda s: fn(A, s))
    assert values.shape == (len(SEEDS), 4)
    truth = np.array([getattr(s, quantity) for s in items])
    assert_unbiased_with_honest_stderr(values, stderrs, truth, what=name)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_same_seed_identical_different_seed_different(spectra, name):
    A = spectra["power_law"].A
    fn, _ = ESTIMATORS[name]
    a, b, c = fn(A, 5), fn(A, 5), fn(A, 6)
    assert np.array_equal(a.value, b.value) and np.array_equal(a.stderr, b.stderr)
    assert not np.allclose(a.value, c.value, rtol=1e-9)
    assert a.seed == 5


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_stacked_slice_does_not_depend_on_other_slices(spectra, name):
    # Lockstep recurrences with probes drawn for the whole stack: a slice's result depends on the
    # seed and its own matrix only (for full-rank matrices, where no Lanczos restart consumes
    # extra random numbers).
    fn, _ = ESTIMATORS[name]
    A = spectra["outliers"].A
    r1 = fn(torch.stack([A, spectra["wishart"].A]), 3)
    r2 = fn(torch.stack([A, spectra["indefinite"].A]), 3)
    np.testing.assert_allclose(r1.value[0], r2.value[0], rtol=1e-12)
    np.testing.assert_allclose(r1.stderr[0], r2.stderr[0], rtol=1e-9)


def test_results_report_budget_and_method(spectra):
    A = spectra["wishart"].A
    assert hutchinson(A, num_matvecs=11).num_matvecs == 11
    assert hutchpp(A, num_matvecs=20).method == "hutch++"
    assert trace(A, num_matvecs=11, method="hutchinson").method == "hutchinson-rademacher"
    r = frobenius_sq(A, num_matvecs=16, num_probes=4)
    assert (r.num_matvecs, r.method) == (16, "krylov-deflated")
    assert r.rows()[0]["num_matvecs"] == 16
    assert r.rows()[0]["dof"] == 3 and r.rows()[0]["num_probes"] == 4
    with pytest.raises(ValueError, match="needs num_matvecs >= 10"):
        hutchinson(A, num_matvecs=1)  # too few samples for a calibrated error bar


def test_deflated_counts_products_actually_spent():
    from hessrank.linalg import DenseOperator

    op = DenseOperator(power_law(p=60).A)
    est = deflated_estimate(op, num_matvecs=20, num_probes=5)
    assert est.num_matvecs == 20 == op.num_matvecs
    assert est.lanczos_steps[0] == 15 and est.num_probes[0] == 5


# ---------------------------------------------------------------- deflation vs. Hutchinson


def test_deflated_frobenius_beats_hutchinson_on_outliers(spectra):
    # Same budget (30 matvecs) on 5 outliers + bulk: deflation captures the outliers exactly and
    # samples only the bulk; plain Hutchinson samples everything. Measured median relative
    # errors over 30 seeds: 1.1e-4 (deflated) vs 1.4e-1 (Hutchinson), a factor ~1300; asserted 100.
    s = spectra["outliers"]
    seeds = range(30)
    d, _ = seed_study(lambda k: frobenius_sq(s.A, num_matvecs=30, seed=k), seeds)
    h, _ = seed_study(lambda k: frobenius_sq(s.A, num_matvecs=30, seed=k, method="hutchinson"),
                      seeds)
    err_d = np.median(np.abs(d / s.fro_sq - 1))
    err_h = np.median(np.abs(h / s.fro_sq - 1))
    assert err_d < 1e-3
    assert err_h > 100 * err_d, (err_d, err_h)


@pytest.mark.parametrize("make", [indefinite, outliers], ids=lambda f: f.__name__)
def test_deflated_exact_once_lanczos_spans_the_space(make):
    s = make(p=40)
    for n, probes in [(42, 2), (80, None)]:  # m = n − s ≥ p, or n ≥ p (adaptive): exact
        est = deflated_estimate(s.A, num_matvecs=n, seed=1, num_probes=probes)
        assert est.num_matvecs == s.p  # the probes are not spent
        np.testing.assert_allclose(est.frobenius_sq, [s.fro_sq], rtol=1e-10)
        np.testing.assert_allclose(est.trace, [s.trace], rtol=0, atol=1e-10 * s.norm * s.p)
        assert np.all(est.frobenius_sq_stderr == 0) and np.all(est.trace_stderr == 0)


def test_deflated_exact_when_budget_reaches_p():
    s = indefinite(p=40)
    r = frobenius_sq(s.A, num_matvecs=s.p, seed=1)
    np.testing.assert_allclose(r.value, [s.fro_sq], rtol=1e-10)
    assert np.all(r.stderr == 0)


def test_deflated_with_rank_deficient_matrix_restarts_and_stays_exact():
    lam = np.concatenate([[5.0, -3.0, 2.0], np.zeros(27)])
    A = from_spectrum(lam, seed=7)
    est = deflated_estimate(A, num_matvecs=32, num_probes=2, seed=0)  # m = p = 30
    assert (est.lanczos.beta[0, :29] == 0).any()  # the restart path ran
    np.testing.assert_allclose(est.frobenius_sq, [38.0], rtol=1e-10)
    np.testing.assert_allclose(est.trace, [4.0], rtol=1e-10)


# ---------------------------------------------------------------- Hutch++ at large budgets


def test_hutchpp_exact_at_three_p():
    # num_matvecs ≥ 3p: the sketch has p columns, Q spans the whole space, tr(QᵀHQ) = tr(H)
    # and the projected probes are zero up to rounding.
    s = indefinite(p=30)
    r = hutchpp(s.A, num_matvecs=90, seed=0)
    np.testing.assert_allclose(r.value, [s.trace], rtol=0, atol=1e-10 * s.norm * s.p)
    assert np.all(r.stderr <= 1e-10 * s.norm)


def test_hutchpp_exact_on_low_rank_when_sketch_covers_range():
    # Rank 5 and a sketch of 5 columns: range(HS) = range(H), so the exact part is the trace and
    # the remainder (I−QQᵀ)H(I−QQᵀ) vanishes.
    lam = np.concatenate([[4.0, 3.0, -2.0, 1.0, 0.5], np.zeros(95)])
    A = from_spectrum(lam, seed=8)
    r = hutchpp(A, num_matvecs=20, seed=2)  # sketch of 6 columns, 8 probes
    np.testing.assert_allclose(r.value, [6.5], rtol=1e-10)
    assert np.all(r.stderr <= 1e-10)


# ---------------------------------------------------------------- bad input


def test_deflated_without_lanczos_steps_rejected():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"frobenius_sq needs num_matvecs >= 10 .*got 2"):
        frobenius_sq(A, num_matvecs=2)
    with pytest.raises(ValueError, match=r"leaves no Lanczos step after 8 residual probes"):
        frobenius_sq(A, num_matvecs=8, num_probes=8)
    with pytest.raises(ValueError, match=r"trace needs num_matvecs >= 10"):
        trace(A, num_matvecs=2, method="deflated")


@pytest.mark.parametrize("num_probes", [0, -1])
def test_deflated_rejects_nonpositive_probes(num_probes):
    A = power_law(p=30).A
    with pytest.raises(ValueError, match="num_probes"):
        frobenius_sq(A, num_matvecs=10, num_probes=num_probes)


def test_too_small_budgets_rejected():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"hutchinson needs num_matvecs >= 10, got 0"):
        hutchinson(A, num_matvecs=0)
    with pytest.raises(ValueError, match=r"hutchpp needs num_matvecs >= 20, got 19"):
        hutchpp(A, num_matvecs=19)
    with pytest.raises(ValueError, match=r"frobenius_sq \(hutchinson\) needs num_matvecs >= 6"):
        frobenius_sq(A, num_matvecs=5, method="hutchinson")
    with pytest.raises(ValueError, match=r"xtrace needs num_matvecs >= 20, got 19"):
        xtrace(A, num_matvecs=19)


def test_unknown_methods_rejected():
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown method 'exact'; use 'deflated' or"):
        frobenius_sq(A, num_matvecs=4, method="exact")
    with pytest.raises(ValueError, match=r"unknown method 'slq'; use one of auto, hutchinson"):
        trace(A, num_matvecs=4, method="slq")


def test_nonsymmetric_and_nan_rejected_by_estimators():
    A = torch.triu(torch.ones(5, 5, dtype=torch.float64))
    for fn in (hutchinson, hutchpp, frobenius_sq):
        with pytest.raises(ValueError, match="not symmetric"):
            fn(A, num_matvecs=20)
    B = torch.eye(5, dtype=torch.float64)
    B[1, 2] = B[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        frobenius_sq(B, num_matvecs=6)
