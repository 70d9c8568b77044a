"""The round protocol: every client computation of a round is a ClientTask through ``execute``."""

from __future__ import annotations

import torch

from hessrank.fl.base import ClientData, ClientReply, ClientTask
from hessrank.fl.config import ALGORITHM_REGISTRY, TrainConfig
from hessrank.fl.runner import algorithm_class


def _setup(algo: str, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                              torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()  # fmt: skip
    cfg = TrainConfig(algo=algo, rank=2, lora_alpha=2.0, local_steps=2, batch_size=5,
                      clients=3, merge_every=1, **kw)  # fmt: skip
    x = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    clients = [ClientData(c, x[10 * c : 10 * c + 10], y[10 * c : 10 * c + 10]) for c in range(3)]
    return algorithm_class(algo)(net, cfg), clients


def _recorder(algo, log):
    def execute(task: ClientTask, data: ClientData, gen: torch.Generator) -> ClientReply:
        log.append((task.phase, task.client_id))
        return algo.client_work(task, data, gen)

    return execute


def test_fedlrt_round_is_three_message_phases():
    algo, clients = _setup("fedlrt", correction="full")
    log: list = []
    algo.run_round(1, clients, 0.1, torch.Generator().manual_seed(0), _recorder(algo, log))
    assert algo.phases == ("basis", "correction", "train")
    assert log == [(p, c) for p in algo.phases for c in range(3)]
    log.clear()
    algo.config.correction = "simplified"  # the r x r correction travels with the basis phase
    algo.run_round(2, clients, 0.1, torch.Generator().manual_seed(0), _recorder(algo, log))
    assert [p for p, _ in log] == ["basis"] * 3 + ["train"] * 3


def test_execute_hook_gives_the_same_round_as_in_process():
    for name in ("fedavg", "fedprox", "fedloru", "fedlrt"):
        a, clients = _setup(name)
        b, _ = _setup(name)
        log: list = []
        a.run_round(1, clients, 0.1, torch.Generator().manual_seed(1))
        b.run_round(1, clients, 0.1, torch.Generator().manual_seed(1), _recorder(b, log))
        assert [p for p, _ in log] == [p for p in b.phases for _ in range(3)], name
        sa, sb = a.state_tensors(), b.state_tensors()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_every_registered_algorithm_declares_its_phases():
    for name in ALGORITHM_REGISTRY:
        cls = algorithm_class(name)
        assert cls.phases and all(isinstance(p, str) for p in cls.phases), name
        assert isinstance(cls.stateless_clients, bool), name
    assert not algorithm_class("pfedloru").stateless_clients
    assert algorithm_class("fedprox").stateless_clients
