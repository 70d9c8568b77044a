"""The round protocol: strategies configure and aggregate, client procedures answer tasks,
client states are kept by the runtime, every algorithm comes from the one registry."""

from __future__ import annotations

import pytest
import torch

from hessrank.data.task import ClassificationTask
from hessrank.fl.config import TrainConfig
from hessrank.fl.loop import Federation, RoundObserver
from hessrank.fl.protocol import Client, ClientData, ClientStates, Strategy
from hessrank.fl.registry import ALGORITHMS, algorithm_entry


def _setup(algo: str, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                              torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()  # fmt: skip
    cfg = TrainConfig(algo=algo, rank=2, lora_alpha=2.0, local_steps=2, batch_size=5,
                      clients=3, merge_every=1, **kw)  # fmt: skip
    x = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    clients = [ClientData(c, x[10 * c : 10 * c + 10], y[10 * c : 10 * c + 10]) for c in range(3)]
    return Federation.build(net, cfg, ClassificationTask()), clients


def _recorder(fed: Federation, log: list):
    def execute(task, data, state, rng):
        log.append((task.phase, task.client_id))
        return fed.client(task, data, state, rng)

    return execute


def test_fedlrt_round_is_three_message_phases():
    fed, clients = _setup("fedlrt", correction="full")
    log: list = []
    fed.round(1, clients, 0.1, torch.Generator().manual_seed(0), _recorder(fed, log))
    assert fed.strategy.phases == ("basis", "correction", "train")
    assert log == [(p, c) for p in fed.strategy.phases for c in range(3)]
    fed, clients = _setup("fedlrt", correction="simplified")  # r x r travels with the basis
    log.clear()
    fed.round(1, clients, 0.1, torch.Generator().manual_seed(0), _recorder(fed, log))
    assert [p for p, _ in log] == ["basis"] * 3 + ["train"] * 3


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_execute_hook_gives_the_same_round_as_in_process(name):
    a, clients = _setup(name)
    b, _ = _setup(name)
    log: list = []
    a.round(1, clients, 0.1, torch.Generator().manual_seed(1))
    b.round(1, clients, 0.1, torch.Generator().manual_seed(1), _recorder(b, log))
    assert [p for p, _ in log] == [p for p in b.strategy.phases for _ in range(3)]
    sa, sb = a.strategy.state_tensors(), b.strategy.state_tensors()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ta, tb = a.states.tensors(), b.states.tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_every_registered_algorithm_has_a_strategy_and_a_client():
    for name, entry in ALGORITHMS.items():
        cfg = TrainConfig(algo=name)
        strategy, client = entry.classes(cfg)
        assert issubclass(strategy, Strategy) and issubclass(client, Client), name
        assert entry.phases(cfg) and all(isinstance(p, str) for p in entry.phases(cfg)), name
        assert entry.summary and name in cfg.to_dict()["algo"]
    width = TrainConfig(algo="mfedloru", mfedloru_scheme="width")
    assert algorithm_entry("mfedloru").classes(width)[0].__name__ == "WidthMFedLoRU"
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'"):
        algorithm_entry("fedsgd")


def test_client_states_round_trip_and_absent_means_empty():
    store = ClientStates({2: {"w": torch.ones(2)}, 0: {"a.b": torch.zeros(1)}})
    assert list(store) == [0, 2] and store.get(1) == {}
    back = ClientStates.from_tensors(store.tensors())
    assert list(back.tensors()) == ["0.a.b", "2.w"]
    snapshot = store.copy()
    store.put(2, {"w": torch.zeros(2)})
    assert torch.equal(snapshot.get(2)["w"], torch.ones(2))  # states are replaced, not mutated
    store.put(2, {})
    assert list(store) == [0]
    with pytest.raises(ValueError, match="not '<client id>.<name>'"):
        ClientStates.from_tensors({"x": torch.ones(1)})


def test_observers_see_every_reply_and_the_round_ends():
    fed, clients = _setup("fedloru")
    seen: list = []

    class Spy(RoundObserver):
        def round_started(self, round_idx, strategy):
            seen.append(("start", round_idx))

        def replied(self, task, reply, strategy):
            seen.append((task.phase, task.client_id))

        def round_ended(self, round_idx, stats):
            seen.append(("end", stats.extra["merged"]))

    fed.round(4, clients, 0.1, torch.Generator().manual_seed(0), observers=[Spy()])
    assert seen == [("start", 4), ("train", 0), ("train", 1), ("train", 2), ("end", 1.0)]
