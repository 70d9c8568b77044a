"""Property tests on small random symmetric matrices (zeros, repeats and negative eigenvalues)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hessrank.linalg import (
    deflated_estimate,
    exact_stable_rank,
    hutchpp,
    lanczos,
    lanczos_tridiagonal,
    stable_rank,
)
from hessrank.linalg.deflated import MIN_PROBES, min_budget
from hessrank.linalg.operator import make_generator
from hessrank.linalg.trace import MIN_SKETCH_BUDGET

from .conftest import from_spectrum

PROPS = settings(max_examples=20, deadline=None)

# Exact zeros and ±1 make repeated eigenvalues (hence invariant subspaces and restarts) common;
# nonzero magnitudes stay ≥ 1e-2 so that "relative to max|λ|" is a meaningful tolerance.
eigenvalue = st.one_of(
    st.just(0.0),
    st.sampled_from([1.0, -1.0]),
    st.floats(0.01, 10.0),
    st.floats(-10.0, -0.01),
)


@st.composite
def symmetric(draw, min_p: int = 2):
    p = draw(st.integers(min_p, 30))
    lam = np.array(draw(st.lists(eigenvalue, min_size=p, max_size=p)))
    seed = draw(st.integers(0, 2**16))
    return lam, from_spectrum(lam, seed)


def scale(lam: np.ndarray) -> float:
    """Absolute tolerance unit: ‖A‖₂, or 1 for the zero matrix."""
    return float(np.abs(lam).max()) or 1.0


@PROPS
@given(case=symmetric(), data=st.data())
def test_ritz_values_inside_spectrum(case, data):
    # Cauchy interlacing: Ritz values are eigenvalues of VᵀAV, so they lie in [λ_min, λ_max].
    lam, A = case
    p = lam.size
    m = data.draw(st.integers(1, p), label="m")
    seed = data.draw(st.integers(0, 1000), label="seed")
    r = lanczos(A, k=m, num_matvecs=m, seed=seed)
    tol = 1e-10 * scale(lam)  # rounding of the products and of the m×m eigensolver
    assert r.eigenvalues.min() >= lam.min() - tol
    assert r.eigenvalues.max() <= lam.max() + tol
    assert np.all(r.residual_norms >= 0)


@PROPS
@given(case=symmetric(), seed=st.integers(0, 1000))
def test_full_order_lanczos_reproduces_matrix(case, seed):
    lam, A = case
    p = lam.size
    r = lanczos(A, k=p, num_matvecs=p, seed=seed)
    np.testing.assert_allclose(np.sort(r.eigenvalues[0]), np.sort(lam), rtol=0,
                               atol=1e-9 * scale(lam))
    start = torch.randn(1, p, 1, generator=make_generator(seed), dtype=torch.float64)
    kr = lanczos_tridiagonal(A, start, p, generator=make_generator(seed + 1))
    V, T = kr.basis[0, 0].T, kr.tridiagonal()[0, 0]
    torch.testing.assert_close(V.T @ V, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(V @ T @ V.T, A, rtol=0, atol=1e-9 * scale(lam))


@PROPS
@given(case=symmetric(), seed=st.integers(0, 1000))
def test_deflated_exact_when_lanczos_reaches_p(case, seed):
    # With num_probes=2 and num_matvecs = p + 2 the Lanczos part alone spans R^p.
    lam, A = case
    p = lam.size
    est = deflated_estimate(A, num_matvecs=p + 2, num_probes=2, seed=seed)
    s = scale(lam)
    np.testing.assert_allclose(est.frobenius_sq, [np.sum(lam**2)], rtol=0, atol=1e-9 * s * s * p)
    np.testing.assert_allclose(est.trace, [lam.sum()], rtol=0, atol=1e-9 * s * p)
    assert np.all(est.frobenius_sq_stderr == 0) and np.all(est.trace_stderr == 0)


@PROPS
@given(case=symmetric(), seed=st.integers(0, 1000))
def test_hutchpp_exact_at_three_p(case, seed):
    # num_matvecs = max(3p, 2p + MIN_PROBES, 20): the sketch has p columns (and MIN_PROBES
    # probes are left), so Q is a full orthogonal basis.
    lam, A = case
    p = lam.size
    r = hutchpp(A, num_matvecs=max(3 * p, 2 * p + MIN_PROBES, MIN_SKETCH_BUDGET), seed=seed)
    np.testing.assert_allclose(r.value, [lam.sum()], rtol=0, atol=1e-9 * scale(lam) * p)


@PROPS
@given(case=symmetric(), data=st.data())
def test_stable_rank_bounds(case, data):
    lam, A = case
    p = lam.size
    if not np.any(lam):
        return  # the zero matrix has no stable rank (tested in test_ranks.py)
    exact = exact_stable_rank(A)
    assert 1 - 1e-12 <= exact <= p + 1e-12
    seed = data.draw(st.integers(0, 1000), label="seed")
    # Full budget (Lanczos spans R^p): exact, hence in [1, p].
    full = stable_rank(A, num_matvecs=p + 2, num_probes=2, seed=seed)
    np.testing.assert_allclose(full.value, [exact], rtol=1e-8)
    # Any budget: ‖H‖_F² estimate ≥ ‖T‖_F² ≥ θ_1², so the estimate is ≥ 1, and the top-k stable
    # rank (Σθ_i²/θ_1² over the top k) lies between 1 and the estimate.
    lo = min_budget("stable_rank")
    n = data.draw(st.integers(lo, max(lo, p + 4)), label="num_matvecs")
    r = stable_rank(A, num_matvecs=n, seed=seed)
    assert r.value[0] >= 1 - 1e-10
    assert 1 - 1e-10 <= r.top_k_stable_rank[0] <= r.value[0] * (1 + 1e-10)
