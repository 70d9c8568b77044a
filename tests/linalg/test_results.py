"""Result records: frozen, one row per stacked operator, plain-Python dicts for tables."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from hessrank.linalg import frobenius_sq, lanczos, stable_rank

from .conftest import outliers


@pytest.fixture(scope="module")
def stacked():
    s = outliers(p=30)
    return torch.stack([s.A, 2 * s.A])


def test_results_are_frozen(stacked):
    r = frobenius_sq(stacked, num_matvecs=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = np.zeros(2)


def test_rows_one_per_stacked_operator(stacked):
    r = stable_rank(stacked, num_matvecs=20, seed=3)
    rows = r.rows()
    assert len(rows) == 2
    # The second slice is 2A: twice the spectral norm, to rounding, because the outlier 100 is
    # separated from 50 and the [0, 1] bulk and converges within the Lanczos steps taken.
    assert rows[1]["spectral_norm"] == pytest.approx(2 * rows[0]["spectral_norm"], rel=1e-10)
    assert rows[0]["seed"] == 3 and rows[0]["num_matvecs"] == 20
    e = lanczos(stacked, k=2, num_matvecs=20).rows()
    assert len(e) == 2 and e[0]["converged"] in (True, False)


def test_to_dict_is_json_ready(stacked):
    for r in (frobenius_sq(stacked, num_matvecs=10), stable_rank(stacked, num_matvecs=12),
              lanczos(stacked, k=2, num_matvecs=20)):
        d = r.to_dict()
        json.dumps(d)  # plain Python only
        assert "eigenvectors" not in d  # tensors are dropped
        first = dataclasses.fields(r)[0].name
        np.testing.assert_array_equal(np.asarray(d[first]), getattr(r, first))
