"""Stochastic Lanczos quadrature: traces of f(H), smoothed densities, effective rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import DensityResult, spectral_density

from .conftest import indefinite, projector
from .test_trace import assert_unbiased_with_honest_stderr

SEEDS = range(30)


def slq_study(A, f, seeds=SEEDS, **kw):
    out = [spectral_density(A, seed=s, **kw).trace_fn(f) for s in seeds]
    return np.array([v for v, _ in out]), np.array([se for _, se in out])


@pytest.mark.parametrize(
    ("f", "quantity"),
    [(lambda x: x, "trace"), (lambda x: x**2, "fro_sq")],
    ids=["tr", "fro_sq"],
)
def test_trace_fn_unbiased_on_stacked_spectra(stack, f, quantity):
    # Gauss quadrature with m nodes is exact for polynomials of degree ≤ 2m − 1, so for x and x²
    # SLQ is exactly Hutchinson with unit-norm Rademacher probes: unbiased.
    A, items = stack
    values, stderrs = slq_study(A, f, num_probes=6, lanczos_steps=8)
    truth = np.array([getattr(s, quantity) for s in items])
    assert_unbiased_with_honest_stderr(values, stderrs, truth, what=f"SLQ {quantity}")


def test_single_run_within_three_stderr(spectra):
    s = spectra["outliers"]
    d = spectral_density(s.A, num_probes=16, lanczos_steps=30, seed=0)
    for f, truth in [(lambda x: x, s.trace), (lambda x: x**2, s.fro_sq)]:
        value, se = d.trace_fn(f)
        assert abs(value[0] - truth) <= 3 * se[0]


def test_quadrature_structure(spectra):
    s = spectra["indefinite"]
    d = spectral_density(s.A, num_probes=5, lanczos_steps=25, seed=1)
    assert d.nodes.shape == d.weights.shape == d.alpha.shape == d.beta.shape == (1, 5, 25)
    assert d.num_matvecs == 125 and d.dim == s.p
    np.testing.assert_allclose(d.weights.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(d.weights >= 0)
    # Ritz values interlace: inside [λ_min, λ_max] up to rounding.
    assert d.nodes.min() >= s.lam.min() - 1e-10 * s.norm
    assert d.nodes.max() <= s.lam.max() + 1e-10 * s.norm
    # tr(I) = p exactly for every probe: the weights of a unit probe sum to one.
    value, se = d.trace_fn(np.ones_like)
    np.testing.assert_allclose(value, [s.p], rtol=1e-12)
    np.testing.assert_allclose(se, [0.0], atol=1e-10)


def test_from_tridiagonals_round_trip(spectra):
    d = spectral_density(spectra["wishart"].A, num_probes=3, lanczos_steps=12, seed=2)
    e = DensityResult.from_tridiagonals(d.alpha, d.beta, d.dim, d.num_matvecs, d.seed)
    np.testing.assert_allclose(e.nodes, d.nodes, rtol=0, atol=1e-14)
    np.testing.assert_allclose(e.weights, d.weights, rtol=0, atol=1e-14)


@pytest.mark.parametrize("sigma", [None, 1.0, 5.0])
def test_smoothed_density_integrates_to_one(spectra, sigma):
    d = spectral_density(torch.stack([spectra["outliers"].A, spectra["indefinite"].A]),
                         num_probes=8, lanczos_steps=30, seed=3)
    grid, dens = d.smoothed(sigma=sigma)
    assert dens.shape == (2, grid.size) and np.all(dens >= 0)
    # The default grid extends 5σ beyond the outermost nodes: the Gaussian tails outside it hold
    # < 6e-7 of the mass, and 512 points over a range of ~120 (spacing ~0.25) resolve σ ≥ 1 for
    # the trapezoid rule. (A σ below the grid spacing, e.g. 0.05 here, is not resolved by the
    # default 512 points and integrates to ~1.05: callers must pass a finer grid.)
    np.testing.assert_allclose(np.trapezoid(dens, grid, axis=-1), 1.0, atol=1e-5)


def test_smoothed_on_custom_grid_peaks_at_eigenvalue():
    lam = np.concatenate([np.full(10, 2.0), np.full(30, -1.0)])
    from .conftest import from_spectrum

    d = spectral_density(from_spectrum(lam, seed=4), num_probes=4, lanczos_steps=10)
    grid = np.linspace(-3, 4, 701)
    g, dens = d.smoothed(grid, sigma=0.1)
    assert g is grid
    peaks = grid[np.argsort(dens[0])[-1]], grid[(grid > 0.5)][np.argmax(dens[0][grid > 0.5])]
    np.testing.assert_allclose(sorted(peaks), [-1.0, 2.0], atol=0.011)  # grid spacing 0.01


def test_effective_rank_of_projector():
    # For a rank-r projector |λ| log|λ| = 0 on the whole spectrum, so the entropy effective rank
    # is exp(log tr P) = r. The estimate is a ratio of Hutchinson traces: check the mean over
    # seeds within 3 SEM and a single run within 4 reported stderr (a delta-method error bar).
    r, p = 10, 100
    A = projector(p, r).A
    runs = [spectral_density(A, num_probes=8, lanczos_steps=10, seed=s).effective_rank()
            for s in SEEDS]
    vals = np.array([v[0] for v, _ in runs])
    ses = np.array([e[0] for _, e in runs])
    assert abs(vals.mean() - r) <= 3 * vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals[0] - r) <= 4 * ses[0]
    ratio = np.sqrt(np.mean(ses**2)) / vals.std(ddof=1)
    assert 0.5 < ratio < 2.0


def test_effective_rank_exact_with_full_quadrature_on_flat_spectrum():
    # All |λ| equal (±c): q_i = 1/p, so erank = p whatever the probes; with m = p and J = 2.
    lam = np.where(np.arange(20) % 2 == 0, 3.0, -3.0)
    from .conftest import from_spectrum

    A = torch.stack([from_spectrum(lam, 5), from_spectrum(lam, 6)])
    erank, se = spectral_density(A, num_probes=4, lanczos_steps=20, seed=0).effective_rank()
    np.testing.assert_allclose(erank, [20.0, 20.0], rtol=1e-10)
    np.testing.assert_allclose(se, [0.0, 0.0], atol=1e-8)


def test_same_seed_identical_different_seed_different(spectra):
    A = spectra["power_law"].A
    a = spectral_density(A, num_probes=3, lanczos_steps=10, seed=4)
    b = spectral_density(A, num_probes=3, lanczos_steps=10, seed=4)
    c = spectral_density(A, num_probes=3, lanczos_steps=10, seed=5)
    assert np.array_equal(a.alpha, b.alpha) and np.array_equal(a.nodes, b.nodes)
    assert not np.allclose(a.alpha, c.alpha)


def test_stacked_slice_does_not_depend_on_other_slices(spectra):
    A = spectra["outliers"].A
    d1 = spectral_density(torch.stack([A, spectra["wishart"].A]), num_probes=4, lanczos_steps=15)
    d2 = spectral_density(torch.stack([A, spectra["power_law"].A]), num_probes=4,
                          lanczos_steps=15)
    np.testing.assert_allclose(d1.nodes[0], d2.nodes[0], rtol=1e-10, atol=1e-12)


def test_steps_capped_at_p():
    d = spectral_density(indefinite(p=12).A, num_probes=2, lanczos_steps=50)
    assert d.nodes.shape == (1, 2, 12) and d.num_matvecs == 24


def test_single_probe_stderr_shape_on_stack():
    d = spectral_density(torch.stack([torch.eye(5, dtype=torch.float64)] * 3), num_probes=1,
                         lanczos_steps=3)
    value, se = d.trace_fn(lambda x: x)
    assert value.shape == se.shape == (3,)
    assert np.isnan(se).all()


def test_single_probe_stderr_is_nan():
    d = spectral_density(torch.eye(5, dtype=torch.float64), num_probes=1, lanczos_steps=3)
    value, se = d.trace_fn(lambda x: x)
    np.testing.assert_allclose(value, [5.0], rtol=1e-12)
    assert np.isnan(se).all()
    erank, erank_se = d.effective_rank()
    assert erank.shape == erank_se.shape == (1,) and np.isnan(erank_se).all()


@pytest.mark.parametrize(
    ("kw", "msg"),
    [({"num_probes": 0}, "num_probes must be >= 1, got 0"),
     ({"lanczos_steps": 0}, "lanczos_steps must be >= 1, got 0")],
)
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        spectral_density(torch.eye(4, dtype=torch.float64), **kw)


def test_nonsymmetric_rejected():
    with pytest.raises(ValueError, match="not symmetric"):
        spectral_density(torch.tril(torch.ones(4, 4, dtype=torch.float64)))
