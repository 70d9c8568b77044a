"""SCAFFOLD (option II): one client is centralized gradient descent; control variates are
client state kept by the runtime; the correction pulls heterogeneous clients together."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hessrank.data.task import RegressionTask
from hessrank.fl.config import TrainConfig
from hessrank.fl.loop import Federation
from hessrank.fl.protocol import ClientData
from hessrank.fl.scaffold import Scaffold

DT = torch.float64
FULL_BATCH = 10**9


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def _clients(k: int, n: int, seed: int, hetero: bool = False) -> list[ClientData]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(2, 6, generator=g, dtype=DT)
    out = []
    for c in range(k):
        w = torch.randn(2, 6, generator=g, dtype=DT) if hetero else shared
        x = torch.randn(n, 6, generator=g, dtype=DT)
        out.append(ClientData(c, x, torch.tanh(x @ w.T)))
    return out


def _fed(**kw) -> Federation:
    base = dict(algo="scaffold", clients=1, local_steps=4, batch_size=FULL_BATCH)
    return Federation.build(_net(), TrainConfig(**{**base, **kw}), RegressionTask())


def test_one_client_equals_centralized_gradient_descent():
    """N = |S| = 1, η_g = 1, full batches: c and c_i stay equal (up to rounding), so R rounds
    of K local steps are R·K steps of gradient descent on the client's loss."""
    (client,) = _clients(1, 40, seed=1)
    fed = _fed()
    ref = _net()
    task, lr, gen = RegressionTask(), 0.3, torch.Generator().manual_seed(0)
    for t in range(1, 6):
        fed.round(t, [client], lr=lr, rng=gen)
        for _ in range(4):
            ref.zero_grad()
            task(ref(client.inputs), client.targets).backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p.sub_(lr * p.grad)
    for (name, p), q in zip(fed.strategy.model.named_parameters(), ref.parameters()):
        # x + (y − x) and c − c_i differ from y and 0 by rounding only: ~1e-16 per round
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    c, c_i = fed.strategy.c, fed.states.get(0)
    for key in c:
        torch.testing.assert_close(c[key], c_i[key], rtol=0, atol=1e-14, msg=key)


def test_option_two_control_variates_and_communication():
    clients = _clients(3, 20, seed=2, hetero=True)
    fed = _fed(clients=3, local_steps=3)
    x0 = {k: v.clone() for k, v in fed.strategy.model.state_dict().items()}
    stats = fed.round(1, clients[:2], lr=0.1, rng=torch.Generator().manual_seed(0))
    n_theta = sum(p.numel() for p in _net().parameters())
    assert stats.floats_up == {0: 2 * n_theta, 1: 2 * n_theta} == stats.floats_down
    assert sorted(fed.states) == [0, 1]  # client 2 was not sampled: c_2 = 0 implicitly
    # c_i⁺ = (x − y_i)/(K η) in the first round (c = c_i = 0); c = Σ_S Δc_i / N
    x_new = fed.strategy.model.state_dict()
    mean_step = {k: sum(fed.states.get(i)[k] for i in (0, 1)) * (3 * 0.1) / 2 for k in x0}
    for key in x0:  # x ← x + mean(y_i − x) = x − K η mean(c_i⁺)
        torch.testing.assert_close(x_new[key], x0[key] - mean_step[key], rtol=0, atol=1e-14)
        expected_c = (fed.states.get(0)[key] + fed.states.get(1)[key]) / 3
        torch.testing.assert_close(fed.strategy.c[key], expected_c, rtol=0, atol=1e-15)


def test_correction_reduces_client_drift():
    """Heterogeneous clients, many local steps: SCAFFOLD's fixed point is closer to the
    global optimum than FedAvg's (its drift is corrected). Measured (seed 3, 40 rounds):
    FedAvg 0.378, SCAFFOLD 0.295; the global minimum found by 5,000 GD steps is 0.231."""
    clients = _clients(3, 30, seed=3, hetero=True)

    def global_loss(model: nn.Module) -> float:
        task = RegressionTask()
        with torch.no_grad():
            return sum(float(task(model(c.inputs), c.targets)) for c in clients) / 3

    finals = {}
    for algo in ("fedavg", "scaffold"):
        fed = Federation.build(
            _net(), TrainConfig(algo=algo, clients=3, local_steps=20, batch_size=FULL_BATCH),
            RegressionTask(),
        )  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        for t in range(1, 41):
            fed.round(t, clients, lr=0.2, rng=gen)
        finals[algo] = global_loss(fed.strategy.effective_model())
    assert all(math.isfinite(v) for v in finals.values())
    assert finals["scaffold"] < finals["fedavg"], finals


def test_momentum_is_refused_and_state_round_trips():
    with pytest.raises(ValueError, match="set momentum=0"):
        Scaffold(_net(), TrainConfig(algo="scaffold", momentum=0.9))
    fed = _fed(clients=2)
    fed.round(1, _clients(2, 10, seed=4), lr=0.1, rng=torch.Generator().manual_seed(0))
    state = fed.strategy.state_tensors()
    assert any(k.startswith("scaffold.c.") for k in state)
    fresh = _fed(clients=2)
    fresh.strategy.load_state_tensors(state)
    assert all(torch.equal(fresh.strategy.c[k], v) for k, v in fed.strategy.c.items())
