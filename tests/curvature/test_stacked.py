"""The stacked federated strategy (clients as padded units) against per-client operators and
the dense Hessian, its layout helpers, and when "auto" must refuse it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hessrank.curvature import FederatedOperator, dense_hessian
from hessrank.curvature.data import as_batches
from hessrank.curvature.stacked import couples_samples, make_units, plan_unit_size

TOL = 1e-10  # float64: the same sums as the dense Hessian in another order
SIZES = (7, 12, 20, 3)  # unequal clients: padding, several units per client, a tiny client


def _split(x, y, sizes=SIZES):
    edges = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def _dense_stack(model, loss, data, weights, mode="eval"):
    Hs = [dense_hessian(model, loss, d, mode=mode) for d in data]
    return Hs, sum(w * H for w, H in zip(weights, Hs))


def _check_against_dense(F, model, loss, data, k, mode="eval"):
    J, p, _ = F.shape
    V = torch.randn(J, p, k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = F.matmat(V)
    Hs, Hserver = _dense_stack(model, loss, data, F.weights, mode)
    for c, H in enumerate(Hs):
        torch.testing.assert_close(out[c], H @ V[c], rtol=0, atol=TOL)
    torch.testing.assert_close(out[-1], Hserver @ V[-1], rtol=0, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("k", [1, 3])
def test_stacked_equals_dense_on_every_model(case, batch_size, k):
    """Each slice equals the dense Hessian of that client (float64), the server slice the
    size-weighted sum; batch_size=5 cuts clients into several padded units."""
    _, model, x, y = case
    data = _split(x[:42], y[:42])
    loss = nn.functional.cross_entropy
    F = FederatedOperator(model, loss, data, strategy="stacked", batch_size=batch_size)
    assert F.strategy == "stacked"
    if batch_size is not None:
        assert F.route["unit_size"] <= batch_size
        assert F.route["units"] > len(data)
    _check_against_dense(F, model, loss, data, k)


def test_stacked_equals_per_client(case):
    _, model, x, y = case
    data = _split(x[:42], y[:42])
    loss = nn.functional.cross_entropy
    V = torch.randn(5, sum(t.numel() for t in model.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    a = FederatedOperator(model, loss, data, strategy="stacked").matmat(V)
    b = FederatedOperator(model, loss, data, strategy="per-client").matmat(V)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_custom_weights_parameter_subset_and_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randn(30, 2, dtype=torch.float64)
    data = _split(x, y, (4, 9, 17))
    loss = nn.functional.mse_loss
    w = [0.2, 0.3, 0.5]
    F = FederatedOperator(model, loss, data, weights=w, params=["2.weight"], strategy="stacked",
                         batch_size=6)
    J, p, _ = F.shape
    assert p == 12
    V = torch.randn(J, p, 2, dtype=torch.float64)
    out = F.matmat(V)
    F_ref = FederatedOperator(model, loss, data, weights=w, params=["2.weight"],
                             strategy="per-client")
    torch.testing.assert_close(out, F_ref.matmat(V), rtol=0, atol=TOL)


def test_train_mode_without_batchnorm_is_stacked_and_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(42, 5, dtype=torch.float64), torch.randint(0, 3, (42,))
    data = _split(x, y)
    F = FederatedOperator(model, nn.functional.cross_entropy, data, mode="train", batch_size=8,
                         strategy="stacked")
    _check_against_dense(F, model, nn.functional.cross_entropy, data, 1, mode="train")


def test_groups_under_a_small_budget_give_the_same_products(case):
    """A budget below the whole stack splits the units into groups run one after another."""
    _, model, x, y = case
    data = _split(x[:42], y[:42])
    loss = nn.functional.cross_entropy
    whole = FederatedOperator(model, loss, data, strategy="stacked", batch_size=4)
    F = FederatedOperator(model, loss, data, strategy="stacked", batch_size=4,
                         cache_budget_mb=2.5 * whole.route["unit_mb"])
    assert F.route["groups"] > 1
    V = torch.randn(*F.shape[:2], 2, dtype=torch.float64)
    torch.testing.assert_close(F.matmat(V), whole.matmat(V), rtol=0, atol=TOL)


# ---- when "auto" must not stack --------------------------------------------------------------
def _small():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(42, 5, dtype=torch.float64), torch.randint(0, 3, (42,))
    return model, _split(x, y)


def test_batchnorm_in_train_mode_falls_back_to_per_client():
    model, data = _small()
    assert couples_samples(model, "train") and not couples_samples(model, "eval")
    F = FederatedOperator(model, nn.functional.cross_entropy, data, mode="train")
    assert F.strategy == "per-client"
    assert "BatchNorm" in F.strategy_reason
    with pytest.raises(ValueError, match="strategy='stacked' cannot be used: BatchNorm"):
        FederatedOperator(model, nn.functional.cross_entropy, data, mode="train",
                         strategy="stacked")
    F = FederatedOperator(model, nn.functional.cross_entropy, data)  # eval: running statistics
    assert F.strategy == "stacked" and F.strategy_reason.startswith("auto: rule")


def test_auto_follows_a_rule_and_is_bit_identical(case):
    """"auto" decides by rule (no timing): stacked where it applies, recorded on the operator;
    two fresh operators give bit-identical products (same inputs, same bits)."""
    _, model, x, y = case
    data = _split(x[:42], y[:42])
    loss = nn.functional.cross_entropy
    F = FederatedOperator(model, loss, data)
    assert F.strategy == "stacked" and F.route["strategy"] == "stacked"
    assert F.strategy_reason == "auto: rule (stacked applies)"
    assert len(F.clients) == len(data)
    _check_against_dense(F, model, loss, data, 2)
    G = FederatedOperator(model, loss, data)
    assert G.route == F.route
    V = torch.randn(*F.shape[:2], 2, dtype=torch.float64)
    assert torch.equal(F.matmat(V), G.matmat(V))


def test_loss_that_is_not_a_per_sample_mean_falls_back():
    model, data = _small()

    def batch_level(out, y):  # the square of a batch mean couples the samples
        return nn.functional.cross_entropy(out, y) ** 2

    F = FederatedOperator(model, batch_level, data)
    assert F.strategy == "per-client"
    assert "per-sample" in F.strategy_reason
    # and the fallback is still the right operator
    V = torch.randn(*F.shape[:2], 1, dtype=torch.float64)
    H0 = dense_hessian(model, batch_level, data[0])
    torch.testing.assert_close(F.matmat(V)[0], H0 @ V[0], rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="not a mean of per-sample losses"):
        FederatedOperator(model, batch_level, data, strategy="stacked")


def test_uncached_settings_use_per_client():
    model, data = _small()
    for kw in ({"cache": False}, {"hvp": "fwd-rev"}):
        F = FederatedOperator(model, nn.functional.cross_entropy, data, **kw)
        assert F.strategy == "per-client" and "uncached" in F.strategy_reason


def test_bad_client_data_is_named():
    model, data = _small()
    bad = [data[0], data[1], (data[2][0][:0], data[2][1][:0])]
    with pytest.raises(ValueError, match="client 2: data is empty"):
        FederatedOperator(model, nn.functional.cross_entropy, bad)
    x = data[1][0].clone()
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="client 1: the loss is not finite"):
        FederatedOperator(model, nn.functional.cross_entropy, [data[0], (x, data[1][1])])
    with pytest.raises(ValueError, match="strategy must be one of"):
        FederatedOperator(model, nn.functional.cross_entropy, data, strategy="fast")


# ---- layout helpers ----------------------------------------------------------------------------
def _cost(sizes, m, a, b):
    return sum(math.ceil(n / m) for n in sizes) * (m * a + b)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8),
       a=st.floats(1, 500), b=st.floats(0, 50_000), cap=st.one_of(st.none(), st.integers(1, 80)))
def test_plan_unit_size_minimizes_the_cost(sizes, a, b, cap):
    m = plan_unit_size(sizes, a, b, cap)
    top = max(sizes) if cap is None else min(max(sizes), cap)
    assert 1 <= m <= top
    best = min(_cost(sizes, q, a, b) for q in range(1, top + 1))
    assert _cost(sizes, m, a, b) <= best * (1 + 1e-9)


def test_plan_unit_size_rejects_empty_clients():
    with pytest.raises(ValueError, match="at least one sample"):
        plan_unit_size([4, 0], 1.0, 1.0)


def test_make_units_layout():
    xs = [torch.arange(n * 2, dtype=torch.float64).reshape(n, 2) + 100 * c
          for c, n in enumerate((5, 2))]
    ys = [torch.full((n,), c) for c, n in enumerate((5, 2))]
    batches = [as_batches((x, y), dtype=torch.float64, device=torch.device("cpu"))
               for x, y in zip(xs, ys)]
    u = make_units(batches, 3)
    assert u.num_units == 3 and u.unit_size == 3
    assert u.owner.tolist() == [0, 0, 1]
    assert u.keep.sum(1).tolist() == [3, 2, 2]
    torch.testing.assert_close(u.scale, torch.tensor([3 / 5, 3 / 5, 3 / 2], dtype=torch.float64))
    torch.testing.assert_close(u.inputs[1, 2], u.inputs[1, 0])  # padding copies a real row
    torch.testing.assert_close(u.inputs[0], xs[0][:3])
    assert u.targets[2].tolist() == [1, 1, 1]
