"""Error bars are a contract (docs/design.md §4): over 30 seeds, at every budget the API accepts, on
real Hessians (a digits MLP at initialization and after training) and on matrices with known
spectra, ≥ 90% of estimates lie within 2 stderr of the truth and none beyond 5.

The dense Hessians are built once per session (tests/linalg/conftest.py); the four 200×200
spectra run as one stacked (4, p, p) operator and the two MLP Hessians as one (2, p, p) operator
(each slice's result depends on its own matrix only, test_trace.py). Budgets: the smallest the
API accepts, then a grid up to 40 products (the benchmark experiments/benchmarks/
bench_estimators.py --section calibration runs 10…80). Where a smaller budget failed this test
the API refuses it (MIN_PROBES, min_budget, MIN_SKETCH_BUDGET).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import frobenius_sq, hutchinson, hutchpp, stable_rank, trace, xtrace
from hessrank.linalg.deflated import min_budget

SEEDS = range(30)
BUDGETS = (min_budget(), 14, 20, 40)

ESTIMATORS = {
    # name: (call(A, budget, seed) -> (value, stderr), truth attribute, budgets)
    "stable_rank": (lambda A, b, s: _vs(stable_rank(A, num_matvecs=b, seed=s)), "srank",
                    BUDGETS),
    "frobenius_sq": (lambda A, b, s: _vs(frobenius_sq(A, num_matvecs=b, seed=s)), "fro_sq",
                     BUDGETS),
    "trace": (lambda A, b, s: _vs(trace(A, num_matvecs=b, seed=s)), "trace", BUDGETS),
    "hutchinson": (lambda A, b, s: _vs(hutchinson(A, num_matvecs=b, seed=s)), "trace",
                   (10, 12, 40)),  # smallest budgets: 10 (plain), 20 (sketching ones)
    "hutchpp": (lambda A, b, s: _vs(hutchpp(A, num_matvecs=b, seed=s)), "trace", (20, 40)),
    "xtrace": (lambda A, b, s: _vs(xtrace(A, num_matvecs=b, seed=s)), "trace", (20, 40)),
}


def _vs(r):
    return r.value, r.stderr


@pytest.fixture(scope="module")
def operators(spectra, mlp_hessians):
    """Two stacked operators with their per-slice truths."""
    small = list(spectra.values())
    big = list(mlp_hessians.values())
    return [(torch.stack([s.A for s in small]), small), (torch.stack([s.A for s in big]), big)]


def coverage(call, operators, quantity: str, budget: int) -> dict[str, tuple[float, float]]:
    """{spectrum name: (fraction within 2 stderr, worst |error| / stderr)} over SEEDS."""
    out = {}
    for A, items in operators:
        truth = np.array([getattr(s, quantity) for s in items])
        z = []
        for seed in SEEDS:
            value, stderr = call(A, budget, seed)
            err = np.abs(value - truth)
            exact = err <= 1e-9 * np.abs(truth)  # an exact estimate may report stderr 0
            z.append(np.where(exact, 0.0, err / np.where(stderr > 0, stderr, np.inf)))
        z = np.array(z)
        for i, s in enumerate(items):
            out[s.name] = (float(np.mean(z[:, i] <= 2)), float(np.max(z[:, i])))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_error_bars_cover_at_every_budget(operators, name):
    call, quantity, budgets = ESTIMATORS[name]
    bad = []
    for b in budgets:
        for spectrum, (frac, worst) in coverage(call, operators, quantity, b).items():
            if frac < 0.9 or worst > 5:
                bad.append(f"{b} matvecs, {spectrum}: {frac:.0%} within 2 stderr, "
                           f"worst {worst:.1f}")
    assert not bad, f"{name}: " + "; ".join(bad)


def test_smallest_budget_is_refused_below(spectra):
    A = spectra["wishart"].A
    for fn in (stable_rank, frobenius_sq, trace):
        with pytest.raises(ValueError, match=rf"needs num_matvecs >= {min_budget()}"):
            fn(A, num_matvecs=min_budget() - 1)
