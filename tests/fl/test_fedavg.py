"""FedAvg: one client is centralized SGD; size-weighted averaging of parameters and buffers."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hessrank.data.task import ClassificationTask
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import weighted_average
from hessrank.fl.local import batch_indices, local_sgd
from hessrank.fl.loop import Federation
from hessrank.fl.protocol import ClientData

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)


def _client(cid: int, n: int, seed: int) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData(cid, x, y)


def _config(**kw) -> TrainConfig:
    base = {"clients": 3, "batch_size": 4, "local_epochs": 2, "lr": 0.1, "momentum": 0.5}
    return TrainConfig(**{**base, **kw})


def test_one_client_equals_centralized_sgd():
    """Same batches, optimizer reset per round: FedAvg with K = 1 is plain SGD (float64)."""
    client = _client(0, 19, seed=1)  # 19: uneven last batch
    fed = Federation.build(_mlp(), _config(clients=1), ClassificationTask())
    ref = _mlp()
    g_fed, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in range(1, 4):
        fed.round(t, [client], lr=0.1, rng=g_fed)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
        for idx in batch_indices(19, 4, epochs=2, steps=0, generator=g_ref):
            opt.zero_grad()
            F.cross_entropy(ref(client.inputs[idx]), client.targets[idx]).backward()
            opt.step()
    for (name, p), q in zip(fed.strategy.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14, msg=name)


def test_local_steps_mode_takes_exactly_s_steps():
    batches = batch_indices(10, 4, epochs=1, steps=7, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)


def test_average_is_size_weighted_for_parameters_and_bn_buffers():
    clients = [_client(0, 12, seed=1), _client(1, 30, seed=2)]
    fed = Federation.build(_bn_net(), _config(clients=2), ClassificationTask())
    gen = torch.Generator().manual_seed(0)
    g_ref = torch.Generator().manual_seed(0)
    start = copy.deepcopy(fed.strategy.model)
    stats = fed.round(1, clients, lr=0.1, rng=gen)
    finals = []
    for c in clients:  # clients are visited in order, drawing from one generator
        m = copy.deepcopy(start)
        local_sgd(m, m.parameters(), c, ClassificationTask(), lr=0.1, batch_size=4, epochs=2,
                  momentum=0.5, generator=g_ref)  # fmt: skip
        finals.append(m.state_dict())
    expected = weighted_average(finals, [12, 30])
    got = fed.strategy.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-14, msg=key)
    assert "1.running_mean" in expected  # buffers are part of the average
    n_theta = sum(p.numel() for p in start.parameters()) + 16  # + running mean and var
    assert stats.floats_up == {0: n_theta, 1: n_theta} == stats.floats_down
    assert stats.train_loss > 0


def test_weighted_average_weights():
    a, b = {"w": torch.ones(2, dtype=DT)}, {"w": torch.full((2,), 4.0, dtype=DT)}
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.full((2,), 3.25, dtype=DT))
