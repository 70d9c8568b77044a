"""Lanczos: Ritz pairs, residuals, full-order reconstruction, restarts, stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import DenseOperator, lanczos, lanczos_tridiagonal
from hessrank.linalg.operator import make_generator, random_block

from .conftest import from_spectrum, indefinite, outliers, power_law, projector


def true_residuals(A: torch.Tensor, vals: np.ndarray, vecs: torch.Tensor) -> np.ndarray:
    """‖A s − θ s‖ for each column s of vecs (p, k)."""
    R = A @ vecs - vecs * torch.as_tensor(vals)
    return torch.linalg.vector_norm(R, dim=0).numpy()


def test_docstring_example_as_written():
    A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    assert lanczos(A, k=2, num_matvecs=50).eigenvalues.round(6)[0].tolist() == [100.0, 99.0]


def test_equally_spaced_spectrum_converges_with_enough_steps():
    # diag(1..100) has relative gaps of 1%: 40 steps give λ₂ only to ~5e-7 relative, 50 steps
    # to below 1e-9 (observed), so 50 steps are asserted at 1e-9.
    A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    np.testing.assert_allclose(lanczos(A, k=2, num_matvecs=40).eigenvalues[0], [100.0, 99.0],
                               rtol=1e-6)
    np.testing.assert_allclose(lanczos(A, k=2, num_matvecs=50).eigenvalues[0], [100.0, 99.0],
                               rtol=1e-9)


def test_outliers_to_1e8_relative(spectra):
    # Five outliers separated from a [0, 1] bulk by gaps ≥ 9: Lanczos converges geometrically
    # at a rate set by gap/spread, so 60 steps put them far below 1e-8 (observed ~1e-15).
    s = spectra["outliers"]
    r = lanczos(s.A, k=5, num_matvecs=60, seed=0)
    np.testing.assert_allclose(r.eigenvalues[0], s.top(5), rtol=1e-8)
    assert r.converged.all()
    assert r.num_matvecs == 60
    assert r.eigenvalues.shape == r.residual_norms.shape == (1, 5)
    assert r.eigenvectors.shape == (1, s.p, 5)


def test_lm_picks_negative_outliers(spectra):
    s = spectra["indefinite"]  # outliers −20, −12, 8, 5 on a [−1, 1] bulk
    r = lanczos(s.A, k=4, which="LM", num_matvecs=60, seed=1)
    np.testing.assert_allclose(r.eigenvalues[0], [-20.0, -12.0, 8.0, 5.0], rtol=1e-8)
    assert r.converged.all()


@pytest.mark.parametrize(("which", "expected"), [("SA", [-20.0, -12.0]), ("LA", [8.0, 5.0])])
def test_sa_la_give_bottom_and_top(spectra, which, expected):
    r = lanczos(spectra["indefinite"].A, k=2, which=which, num_matvecs=60, seed=2)
    np.testing.assert_allclose(r.eigenvalues[0], expected, rtol=1e-8)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_ordering_matches_which(spectra, which):
    # Unconverged Ritz values (power-law tail, 20 steps) still come out sorted by `which`.
    vals = lanczos(spectra["power_law"].A, k=20, which=which, num_matvecs=20).eigenvalues[0]
    key = {"LM": -np.abs(vals), "LA": -vals, "SA": vals}[which]
    assert np.all(np.diff(key) >= 0)


def test_reported_residuals_are_true_residuals(spectra):
    # 15 steps on a power-law spectrum: most pairs are far from converged, so the residuals are
    # sizable and β_m|e_mᵀy| can be compared with ‖A s − θ s‖ to 1e-6 relative; the absolute
    # floor 1e-12·‖A‖ is the rounding level of the matrix product for converged pairs.
    s = spectra["power_law"]
    r = lanczos(s.A, k=15, num_matvecs=15, seed=3)
    true = true_residuals(s.A, r.eigenvalues[0], r.eigenvectors[0])
    assert true.max() > 1e-3  # the test exercises unconverged pairs
    np.testing.assert_allclose(r.residual_norms[0], true, rtol=1e-6, atol=1e-12 * s.norm)


@pytest.mark.parametrize("tol", [1e-5, 1e-8])
def test_converged_flags_agree_with_true_residuals(spectra, tol):
    s = spectra["power_law"]  # 25 steps: 7–9 of 25 pairs below these thresholds
    r = lanczos(s.A, k=25, num_matvecs=25, seed=4, tol=tol)
    true = true_residuals(s.A, r.eigenvalues[0], r.eigenvectors[0])
    scale = np.abs(r.eigenvalues[0]).max()  # k = m: every Ritz value is returned
    expected = true <= tol * scale
    # Pairs within a factor 2 of the threshold could go either way on rounding; skip those.
    clear = np.abs(np.log(np.maximum(true, 1e-300) / (tol * scale))) > np.log(2)
    np.testing.assert_array_equal(r.converged[0][clear], expected[clear])
    assert r.converged[0].any() and not r.converged[0].all()  # both branches exercised


@pytest.mark.parametrize("name", ["indefinite", "power_law"])
def test_ritz_vectors_orthonormal(spectra, name):
    r = lanczos(spectra[name].A, k=40, num_matvecs=40, seed=5)
    V = r.eigenvectors[0]
    torch.testing.assert_close(V.T @ V, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-10)


def test_no_eigenvectors_when_not_requested(spectra):
    r = lanczos(spectra["outliers"].A, k=3, num_matvecs=30, return_eigenvectors=False)
    assert r.eigenvectors is None
    np.testing.assert_allclose(r.eigenvalues[0], [100.0, 50.0, 30.0], rtol=1e-8)


def test_budget_capped_at_p():
    s = power_law(p=30)
    op = DenseOperator(s.A)
    r = lanczos(op, k=30, num_matvecs=100)
    assert r.num_matvecs == 30 == op.num_matvecs  # reported budget = products actually spent
    np.testing.assert_allclose(np.sort(r.eigenvalues[0]), np.sort(s.lam), rtol=0, atol=1e-12)


def test_same_seed_same_result_different_seed_different(spectra):
    A = spectra["power_law"].A
    a, b = lanczos(A, k=10, num_matvecs=20, seed=7), lanczos(A, k=10, num_matvecs=20, seed=7)
    assert np.array_equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    c = lanczos(A, k=10, num_matvecs=20, seed=8)
    assert not np.allclose(a.eigenvalues, c.eigenvalues, rtol=1e-6)  # tail is unconverged


# ---------------------------------------------------------------- full order: V T Vᵀ = A


def reconstruct(A: torch.Tensor, seed: int = 0):
    p = A.shape[-1]
    start = random_block((1, p, 1), make_generator(seed), kind="gaussian",
                         dtype=torch.float64, device="cpu")
    kr = lanczos_tridiagonal(A, start, p, generator=make_generator(seed + 1))
    V = kr.basis[0, 0].T  # (p, m): columns are Lanczos vectors
    T = kr.tridiagonal()[0, 0]
    return kr, V, T


@pytest.mark.parametrize("make", [indefinite, outliers, power_law], ids=lambda f: f.__name__)
def test_full_order_reconstructs_matrix(make):
    s = make(p=60)
    kr, V, T = reconstruct(s.A)
    assert kr.steps == 60 and kr.num_matvecs == 60
    eye = torch.eye(60, dtype=torch.float64)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ T @ V.T, s.A, rtol=0, atol=1e-10 * s.norm)
    np.testing.assert_allclose(torch.linalg.eigvalsh(T).numpy(), np.sort(s.lam), rtol=0,
                               atol=1e-10 * s.norm)
    assert abs(float(kr.beta[0, 0, -1])) <= 1e-10 * s.norm  # nothing left outside the basis


@pytest.mark.parametrize("rank", [1, 7])
def test_full_order_rank_deficient_restarts(rank):
    # A rank-r matrix: the Krylov space of a start vector is invariant after r + 1 steps
    # (range plus the null-space component), so the recurrence must restart with β = 0.
    p = 40
    lam = np.concatenate([np.linspace(1.0, 3.0, rank), np.zeros(p - rank)])
    A = from_spectrum(lam, seed=11)
    kr, V, T = reconstruct(A)
    off = kr.beta[0, 0, :-1]
    # β_r (coupling vector r+1 to r+2) is zero up to rounding; the code may treat it as a
    # breakdown (exact 0) or continue from the normalized rounding residue (observed 1e-12 for
    # r = 7): either way later steps hit exact breakdowns and restart.
    assert float(off[rank]) <= 1e-10 * 3.0
    assert (off == 0).any(), "expected at least one restart (exact zero off-diagonal)"
    torch.testing.assert_close(V.T @ V, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ T @ V.T, A, rtol=0, atol=1e-10 * 3.0)
    np.testing.assert_allclose(torch.linalg.eigvalsh(T).numpy(), np.sort(lam), atol=1e-10)


def test_full_order_projector_repeated_eigenvalues():
    s = projector(p=30, r=6)
    kr, V, T = reconstruct(s.A)
    assert (kr.beta[0, 0, :-1] == 0).sum() >= 2  # Krylov space of dim 2, then restarts
    torch.testing.assert_close(V @ T @ V.T, s.A, rtol=0, atol=1e-10)


def test_zero_matrix_restarts_every_step():
    kr, V, T = reconstruct(torch.zeros(6, 6, dtype=torch.float64))
    assert torch.all(kr.beta == 0) and torch.all(kr.alpha == 0)
    torch.testing.assert_close(V.T @ V, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- stacking and blocks


def test_stacked_recurrences_are_independent(spectra):
    # J recurrences run in lockstep: slice j of a stacked run is the single run of slice j from
    # the same start vector (no restart happens on these full-rank spectra).
    A, B = spectra["indefinite"].A, spectra["wishart"].A
    starts = torch.randn(2, A.shape[0], 1, generator=make_generator(0), dtype=torch.float64)
    both = lanczos_tridiagonal(torch.stack([A, B]), starts, 30)
    for j, M in enumerate([A, B]):
        one = lanczos_tridiagonal(M, starts[j : j + 1], 30)
        torch.testing.assert_close(both.alpha[j], one.alpha[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(both.beta[j], one.beta[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(both.basis[j], one.basis[0], rtol=0, atol=1e-12)


def test_block_starts_equal_separate_runs(spectra):
    A = spectra["outliers"].A
    starts = torch.randn(1, A.shape[0], 3, generator=make_generator(1), dtype=torch.float64)
    block = lanczos_tridiagonal(A, starts, 25)
    assert block.num_matvecs == 75  # b matvecs per step
    for i in range(3):
        one = lanczos_tridiagonal(A, starts[:, :, i : i + 1], 25)
        torch.testing.assert_close(block.alpha[:, i], one.alpha[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(block.beta[:, i], one.beta[:, 0], rtol=0, atol=1e-12)


def test_stacked_lanczos_per_slice_correct(stack):
    A, items = stack
    r = lanczos(A, k=2, which="LM", num_matvecs=60, seed=0)
    assert r.eigenvalues.shape == (4, 2)
    for j, s in enumerate(items):
        # The top-2 of the Wishart/power-law spectra have gaps ~1e-2 of their spread: only the
        # largest-magnitude value is asserted at 1e-8 for all, the second at 1e-4.
        np.testing.assert_allclose(r.eigenvalues[j, 0], s.top(1)[0], rtol=1e-8)
        np.testing.assert_allclose(r.eigenvalues[j, 1], s.top(2)[1], rtol=1e-4)
    assert len(r.rows()) == 4


def test_stacked_slice_does_not_depend_on_other_slices(spectra):
    A = spectra["outliers"].A
    r1 = lanczos(torch.stack([A, spectra["wishart"].A]), k=5, num_matvecs=30, seed=3)
    r2 = lanczos(torch.stack([A, spectra["indefinite"].A]), k=5, num_matvecs=30, seed=3)
    np.testing.assert_allclose(r1.eigenvalues[0], r2.eigenvalues[0], rtol=1e-12)
    np.testing.assert_allclose(r1.residual_norms[0], r2.residual_norms[0], rtol=1e-6,
                               atol=1e-12 * 100)


# ---------------------------------------------------------------- bad input


def test_k_larger_than_budget():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cannot return k=5 eigenpairs from a budget of 4"):
        lanczos(A, k=5, num_matvecs=4)
    with pytest.raises(ValueError, match=r"cannot return k=11"):
        lanczos(A, k=11, num_matvecs=50)  # k > p even with a large budget
    with pytest.raises(ValueError, match=r"cannot return k=0"):
        lanczos(A, k=0)


def test_unknown_which():
    with pytest.raises(ValueError, match=r"unknown which='BE'; use one of LM, LA, SA"):
        lanczos(torch.eye(4, dtype=torch.float64), k=1, which="BE")


@pytest.mark.parametrize("shape", [(1, 9, 1), (2, 10, 1), (10, 1), (1, 10)])
def test_wrong_start_shape(shape):
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"starts must have shape \(J=1, p=10, b\)"):
        lanczos_tridiagonal(A, torch.ones(shape, dtype=torch.float64), 3)


def test_zero_start_rejected():
    with pytest.raises(ValueError, match="start vector is zero"):
        lanczos_tridiagonal(torch.eye(4, dtype=torch.float64), torch.zeros(1, 4, 1), 2)


@pytest.mark.parametrize(("steps", "msg"), [(0, "num_steps must be >= 1"),
                                            (5, "num_steps=5 exceeds the dimension p=4")])
def test_bad_num_steps(steps, msg):
    with pytest.raises(ValueError, match=msg):
        lanczos_tridiagonal(torch.eye(4, dtype=torch.float64), torch.ones(1, 4, 1), steps)


def test_nonsymmetric_and_nan_rejected_by_lanczos():
    A = torch.arange(16.0, dtype=torch.float64).reshape(4, 4)
    with pytest.raises(ValueError, match="not symmetric"):
        lanczos(A, k=1, num_matvecs=4)
    A = torch.eye(4, dtype=torch.float64)
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        lanczos(A, k=1, num_matvecs=4)


def test_until_converged_stops_when_the_pairs_have_converged():
    """Stops at the first step where the k selected pairs have residual ≤ tol·max|θ|, and
    those eigenvalues are then within that residual of the truth (the steps before did not
    qualify); with an unreachable tol it runs to the cap."""
    lam = torch.cat([torch.tensor([50.0, -30.0, 20.0]), torch.linspace(-1, 1, 197)])
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    A = (q * lam) @ q.T
    A = (A + A.T) / 2
    res = lanczos(A, k=3, num_matvecs=150, tol=1e-6, seed=1, until_converged=True)
    assert res.num_matvecs < 60 and res.converged.all()
    truth = np.array([50.0, -30.0, 20.0])
    assert np.all(np.abs(res.eigenvalues[0] - truth) <= res.residual_norms[0] + 1e-12)
    shorter = lanczos(A, k=3, num_matvecs=res.num_matvecs - 1, tol=1e-6, seed=1)
    assert not shorter.converged.all()
    capped = lanczos(A, k=3, num_matvecs=20, tol=1e-30, seed=1, until_converged=True)
    assert capped.num_matvecs == 20
