"""Gradient alignment: hand examples, truncated SVD, identical clients, the model path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hessrank.analysis.alignment import (
    alignment_from_gradients,
    gradient_alignment,
    low_rank,
    matrix_view,
    pairwise_cosines,
)


def test_hand_example_rank_one_vs_full():
    # G1 = diag(3, 1), G2 = diag(3, -1): full cosine (9 - 1) / 10 = 0.8; the rank-1 parts are
    # both diag(3, 0), cosine 1.
    g = {"w": [torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([3.0, -1.0]))]}
    t = alignment_from_gradients(g, ranks=(1, 2, None))
    assert t["rank"].tolist() == [1, 2, 0]
    np.testing.assert_allclose(t["value"], [1.0, 0.8, 0.8], atol=1e-12)
    assert t["shape"].iloc[0] == "2x2" and t["stderr"].isna().all()  # K = 2: no jackknife


def test_hand_example_three_clients_with_jackknife():
    # Rank-1 parts: e1e1ᵀ·3, e1e1ᵀ·3, e2e2ᵀ·3 → cosines (1, 0, 0): mean 1/3.
    mats = [torch.diag(torch.tensor(v)) for v in ([3.0, 1.0], [3.0, 2.0], [1.0, 3.0])]
    t = alignment_from_gradients({"w": mats}, ranks=(1,))
    assert t["value"].iloc[0] == pytest.approx(1 / 3)
    loo = np.array([0.0, 0.0, 1.0])  # leave-one-client-out means
    se = math.sqrt(2 / 3 * np.sum((loo - loo.mean()) ** 2))
    assert t["stderr"].iloc[0] == pytest.approx(se)
    assert (t["min"].iloc[0], t["max"].iloc[0]) == (0.0, 1.0)


def test_low_rank_is_truncated_svd():
    G = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(low_rank(G, 2), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2])
    assert torch.linalg.matrix_rank(low_rank(G, 2)) == 2
    assert low_rank(G, 10) is G and low_rank(G, None) is G
    with pytest.raises(ValueError, match=">= 1"):
        low_rank(G, 0)


def test_conv_kernel_view_and_zero_gradient():
    assert matrix_view(torch.zeros(8, 3, 5, 5)).shape == (8, 75)
    C = pairwise_cosines([torch.ones(2, 2), torch.zeros(2, 2)])
    assert np.isnan(C[0, 1])


def test_identical_client_data_gives_cosine_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    t = gradient_alignment(model, nn.functional.cross_entropy, [(x, y)] * 3, ranks=(1, 2, None))
    assert set(t["layer"]) == {"0.weight", "3.weight"}
    assert t.loc[t["layer"] == "0.weight", "shape"].iloc[0] == "3x9"
    np.testing.assert_allclose(t["value"], 1.0, atol=1e-10)
    np.testing.assert_allclose(t["stderr"], 0.0, atol=1e-10)


def test_different_clients_and_layer_selection():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    data = [(torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,)))
            for _ in range(3)]
    t = gradient_alignment(model, nn.functional.cross_entropy, data, ranks=(1, None),
                           layers=["2.weight"])
    assert t["layer"].tolist() == ["2.weight", "2.weight"]
    assert (t["value"] < 1 - 1e-6).all() and (t["value"] >= -1).all()
    with pytest.raises(ValueError, match="valid names: 0.weight, 2.weight"):
        gradient_alignment(model, nn.functional.cross_entropy, data, layers=["0.bias"])
    with pytest.raises(ValueError, match=">= 2 clients"):
        gradient_alignment(model, nn.functional.cross_entropy, data[:1])
