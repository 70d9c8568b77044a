"""hessrank.compat.pyhessian against PyHessian 0.1 on the same model and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hessrank as hr
from hessrank.compat.pyhessian import hessian

pyhessian = pytest.importorskip("pyhessian")


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # float32: PyHessian's
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    H = hr.dense_hessian(model.double(), nn.functional.cross_entropy, (x.double(), y))
    model.float()
    return model, x, y, torch.linalg.eigvalsh(H)


def test_shapes_and_values_match_pyhessian(setting):
    model, x, y, lam = setting
    ours = hessian(model, nn.functional.cross_entropy, data=(x, y), cuda=False)
    theirs = pyhessian.hessian(model, nn.functional.cross_entropy, data=(x, y), cuda=False)
    vals, vecs = ours.eigenvalues(top_n=2)
    torch.manual_seed(0)
    pvals, pvecs = theirs.eigenvalues(top_n=2, maxIter=300, tol=1e-6)
    assert len(vals) == len(pvals) == 2 and len(vecs) == len(pvecs) == 2
    for v, pv in zip(vecs, pvecs):
        assert [t.shape for t in v] == [t.shape for t in pv]
    top = lam.abs().sort(descending=True).values[:2].numpy()
    np.testing.assert_allclose(np.abs(vals), top, rtol=1e-4)  # Lanczos, near exact
    np.testing.assert_allclose(np.abs(vals[0]), np.abs(pvals[0]), rtol=1e-2)  # power iteration
    # trace: both Hutchinson means, within their sampling errors of the exact trace
    exact = float(lam.sum())
    for samples in (ours.trace(maxIter=200, tol=0.0), theirs.trace(maxIter=200, tol=0.0)):
        se = np.std(samples, ddof=1) / np.sqrt(len(samples))
        assert len(samples) == 200 and abs(np.mean(samples) - exact) < 4 * se


def test_density_works_where_pyhessian_raises(setting):
    model, x, y, lam = setting
    theirs = pyhessian.hessian(model, nn.functional.cross_entropy, data=(x, y), cuda=False)
    with pytest.raises(RuntimeError, match="torch.eig"):  # removed from torch (1.9 on)
        theirs.density(iter=10, n_v=1)
    loader = [(x[:40], y[:40]), (x[40:], y[40:])]  # the dataloader form: same Hessian
    nodes, weights = hessian(model, nn.functional.cross_entropy, dataloader=loader,
                             cuda=False).density(iter=10, n_v=3)
    assert len(nodes) == len(weights) == 3 and all(len(r) == 10 for r in nodes)
    np.testing.assert_allclose([sum(w) for w in weights], 1.0, rtol=1e-6)
    lo, hi = float(lam.min()), float(lam.max())
    assert all(lo - 1e-3 <= t <= hi + 1e-3 for r in nodes for t in r)
