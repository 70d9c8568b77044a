"""FedProx: FedAvg with a proximal term in the local objective (Li et al., 2020).

Client c minimizes L_c(θ) + (μ/2)‖θ − θ_g‖² from the broadcast θ_g by the same local SGD as
FedAvg (the proximal gradient μ(θ − θ_g) is added to every mini-batch gradient of the
trainable parameters); the server is FedAvg's strategy unchanged (as in Flower, FedProx is
FedAvg plus one config value the client reads). μ = 0 is FedAvg bit for bit.
μ = ``config.prox_mu``.
"""

from __future__ import annotations

import torch
from torch import nn

from hessrank.fl.fedavg import LocalSGD
from hessrank.fl.local import LocalResult, local_sgd
from hessrank.fl.protocol import ClientData

__all__ = ["ProxLocalSGD"]


class ProxLocalSGD(LocalSGD):
    """FedAvg's client with (μ/2)‖θ − θ_g‖² added to every batch loss."""

    def notes(self) -> dict[str, str]:
        return {"fedprox": "local loss + (prox_mu/2) ||theta - theta_global||^2 over the "
                "trainables"}  # fmt: skip

    def local(
        self, model: nn.Module, params: list[nn.Parameter], data: ClientData, lr: float,
        rng: torch.Generator, steps: int | None = None,
    ) -> LocalResult:  # fmt: skip
        mu, cfg = float(self.config.prox_mu), self.config
        anchors = [p.detach().clone() for p in params]

        def penalty() -> torch.Tensor:
            prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
            return 0.5 * mu * prox

        return local_sgd(
            model, params, data, self.task, lr=lr, batch_size=cfg.batch_size,
            epochs=cfg.local_epochs, steps=cfg.local_steps if steps is None else steps,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, generator=rng,
            penalty=None if mu == 0.0 else penalty, max_grad_norm=cfg.max_grad_norm,
        )  # fmt: skip
