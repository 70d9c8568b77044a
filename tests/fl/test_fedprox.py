"""FedProx: FedAvg's strategy with a client that adds the proximal term; mu = 0 is FedAvg."""

from __future__ import annotations

import torch

from hessrank.fl import train
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import FedAvg
from hessrank.fl.fedprox import ProxLocalSGD
from hessrank.fl.registry import ALGORITHMS
from hessrank.fl.rundir import read_checkpoint

from .test_runner import tiny


def _final(run):
    tensors, _ = read_checkpoint(run.checkpoint_path(run.rounds()[-1]))
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_fedprox_is_registered_and_mu_zero_is_fedavg(tmp_path):
    entry = ALGORITHMS["fedprox"]
    assert entry.classes(TrainConfig(algo="fedprox")) == (FedAvg, ProxLocalSGD)
    avg = _final(train(tiny(algo="fedavg", rounds=2), tmp_path / "a", progress=False))
    prox0 = _final(train(tiny(algo="fedprox", prox_mu=0.0, rounds=2), tmp_path / "p",
                         progress=False))  # fmt: skip
    assert all(torch.equal(avg[k], prox0[k]) for k in avg)


def test_proximal_term_pulls_clients_towards_the_global_model(tmp_path):
    cfg = dict(clients=1, partition="iid", rounds=1, local_steps=20, record_updates=True)
    free = train(tiny(algo="fedprox", prox_mu=0.0, **cfg), tmp_path / "a", progress=False)
    tied = train(tiny(algo="fedprox", prox_mu=5.0, **cfg), tmp_path / "b", progress=False)

    def norm(run):
        return sum(float(d.pow(2).sum()) for d in run.client_updates(1)[0].values()) ** 0.5

    assert norm(tied) < 0.8 * norm(free)
