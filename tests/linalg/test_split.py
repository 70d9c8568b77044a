"""The adaptive Lanczos/probe split is never worse than the naive estimators (issue 9).

At equal budget and over 100 seeds, the median relative error of the default ‖H‖_F² estimate is
within 10% of the better of plain Hutchinson (every product a probe) and the fixed 3:1 split
(the previous default: B − s Lanczos steps, s = max(MIN_PROBES, B/4) probes), on every spectrum
of the test suite: flat (Wishart, the digits MLP at initialization), power law, outliers,
indefinite, trained MLP.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import frobenius_sq
from hessrank.linalg.deflated import MIN_PROBES

pytestmark = pytest.mark.slow  # every test here takes seconds (make check skips them)

SEEDS = range(100)


def median_errors(A: torch.Tensor, truth: np.ndarray, budget: int) -> dict[str, np.ndarray]:
    """Median |estimate/truth − 1| over SEEDS per slice, for the three estimators."""
    fixed = max(MIN_PROBES, round(budget / 4))
    calls = {
        "adaptive": lambda s: frobenius_sq(A, num_matvecs=budget, seed=s),
        "fixed 3:1": lambda s: frobenius_sq(A, num_matvecs=budget, seed=s, num_probes=fixed),
        "hutchinson": lambda s: frobenius_sq(A, num_matvecs=budget, seed=s, method="hutchinson"),
    }
    return {name: np.median([np.abs(fn(s).value / truth - 1) for s in SEEDS], axis=0)
            for name, fn in calls.items()}


@pytest.mark.parametrize("budget", [20, 40])
def test_adaptive_split_within_ten_percent_of_the_better(spectra, mlp_hessians, budget):
    bad = []
    for group in (list(spectra.values()), list(mlp_hessians.values())):
        A = torch.stack([s.A for s in group])
        truth = np.array([s.fro_sq for s in group])
        err = median_errors(A, truth, budget)
        best = np.minimum(err["fixed 3:1"], err["hutchinson"])
        for i, s in enumerate(group):
            if err["adaptive"][i] > 1.1 * best[i]:
                bad.append(f"{s.name}: adaptive {err['adaptive'][i]:.3g}, fixed "
                           f"{err['fixed 3:1'][i]:.3g}, hutchinson {err['hutchinson'][i]:.3g}")
    assert not bad, f"{budget} matvecs: " + "; ".join(bad)
