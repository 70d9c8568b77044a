"""FedProx: FedAvg with a proximal term in the local objective (Li et al., 2020).

Client c minimizes L_c(θ) + (μ/2)‖θ − θ_g‖² from the broadcast θ_g by the same local SGD as
FedAvg (the proximal gradient μ(θ − θ_g) is added to every mini-batch gradient of the
trainable parameters); aggregation, communication and everything else are FedAvg's. μ = 0 is
FedAvg bit for bit. μ = ``config.prox_mu``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hessrank.fl.base import ClientData
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import FedAvg
from hessrank.fl.local import LocalResult, local_sgd

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg whose clients add (μ/2)‖θ − θ_g‖² to their batch loss."""

    name = "fedprox"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        config.notes.setdefault(
            "fedprox", "local loss + (prox_mu/2) ||theta - theta_global||^2 over the trainables"
        )

    def _local(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        client: ClientData,
        lr: float,
        generator: torch.Generator,
        steps: int | None = None,
    ) -> LocalResult:
        mu, cfg = float(self.config.prox_mu), self.config
        anchors = [p.detach().clone() for p in params]

        def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
            loss = self.loss_fn(outputs, targets)
            if mu == 0.0:
                return loss
            prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
            return loss + 0.5 * mu * prox

        return local_sgd(
            model, params, client, loss_fn, lr=lr, batch_size=cfg.batch_size,
            epochs=cfg.local_epochs, steps=cfg.local_steps if steps is None else steps,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, generator=generator,
        )  # fmt: skip
