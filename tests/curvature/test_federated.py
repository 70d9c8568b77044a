"""FederatedOperator: each stacked slice equals its own HessianOperator; server = pooled data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessrank.curvature import FederatedOperator, HessianOperator, dense_hessian

TOL = 1e-10  # float64 throughout: the slices are the same sums in a different order


@pytest.fixture
def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    sizes = (7, 12, 20)  # unequal clients: the server weights n_c / N matter
    data = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in sizes]
    return model, nn.functional.cross_entropy, data


def _pooled(data):
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def test_shape_and_names(setting):
    model, loss, data = setting
    F = FederatedOperator(model, loss, data)
    p = sum(t.numel() for t in model.parameters())
    assert F.shape == (4, p, p)
    assert F.subject_names == ["client0", "client1", "client2", "server"]


@pytest.mark.parametrize("k", [1, 3])
def test_client_slices_equal_separate_operators(setting, k):
    model, loss, data = setting
    F = FederatedOperator(model, loss, data)
    J, p, _ = F.shape
    V = torch.randn(J, p, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = F.matmat(V)
    for c, d in enumerate(data):
        ref = HessianOperator(model, loss, d).matmat(V[c : c + 1])[0]
        torch.testing.assert_close(out[c], ref, rtol=0, atol=TOL)


def test_server_slice_equals_pooled_operator_and_dense(setting):
    model, loss, data = setting
    F = FederatedOperator(model, loss, data, batch_size=5)  # batching must not change H
    J, p, _ = F.shape
    V = torch.randn(J, p, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    server = F.matmat(V)[-1]
    pooled = HessianOperator(model, loss, _pooled(data)).matmat(V[-1:])[0]
    torch.testing.assert_close(server, pooled, rtol=0, atol=TOL)
    H = dense_hessian(model, loss, _pooled(data))
    torch.testing.assert_close(server, H @ V[-1], rtol=0, atol=TOL)


def test_custom_weights_give_weighted_sum(setting):
    model, loss, data = setting
    w = [0.5, 0.25, 0.25]
    F = FederatedOperator(model, loss, data, weights=w)
    J, p, _ = F.shape
    V = torch.randn(J, p, 1, dtype=torch.float64)
    Hs = [dense_hessian(model, loss, d) for d in data]
    expected = sum(wc * Hc for wc, Hc in zip(w, Hs)) @ V[-1]
    torch.testing.assert_close(F.matmat(V)[-1], expected, rtol=0, atol=TOL)


def test_bad_weights_are_rejected(setting):
    model, loss, data = setting
    with pytest.raises(ValueError, match="sum to 1"):
        FederatedOperator(model, loss, data, weights=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="3 clients"):
        FederatedOperator(model, loss, data, weights=[0.5, 0.5])
