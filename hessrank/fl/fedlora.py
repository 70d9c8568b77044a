"""FedLoRA: federated training of LoRA factors with W0 frozen (Hu et al., 2021; Park et al., 2024).

Each factorized layer is W = W0 + (α/r)·B·A (see :mod:`hessrank.fl.layers`). One round with
sampled clients S and N_S = Σ_{c∈S} n_c:
    server → client c: A, B of every factorized layer, biases, every non-factorized parameter,
                       float buffers
    client c:          local SGD on all of these (W0 frozen)
    client → server:   the same tensors
    server:            A ← Σ (n_c/N_S) A_c and B ← Σ (n_c/N_S) B_c *separately* (so the new
                       product B·A is not the average of the clients' products), every other
                       shared tensor averaged like FedAvg.
Floats each way per client: Σ_layers r·(fan_in + out) + |non-factorized trainables| + |float
buffers|. W0 never travels (all parties derive it from the run's seed). No merging: see
:mod:`hessrank.fl.fedloru` for that.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import FedAvg, _load_strict
from hessrank.fl.layers import densify, factorize, factorized_layers

__all__ = ["FedLoRA", "init_generator"]


def init_generator(config: TrainConfig, stream: int) -> torch.Generator:
    """A generator for setup draws (factor inits), seeded by (config.seed, stream)."""
    return torch.Generator().manual_seed(int(config.seed) * 1000 + 17 + int(stream))


class FedLoRA(FedAvg):
    """FedLoRA; the model passed in is dense and gets factorized here (in place).

    ``config.factorize`` names the layers (None: every Linear/Conv2d except the first and the
    last), ``config.rank`` / ``config.lora_alpha`` give r and α. By default the factorized
    layers are pure rank-r (W0 = 0, A and B random: ``from_scratch``, the non-merging
    baseline of Park et al., 2024); ``from_scratch=False`` starts from W0 = dense init, B = 0.
    """

    name = "fedlora"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.template = copy.deepcopy(model)
        factorize(
            model, config.factorize, rank=config.rank, alpha=config.lora_alpha,
            from_scratch=self._from_scratch(config), generator=init_generator(config, 0),
        )  # fmt: skip
        super().__init__(model, config)
        self.layer_names = list(factorized_layers(model))
        if not self.layer_names:
            raise ValueError(
                "no layer is factorized: the model has fewer than three Linear/Conv2d layers; "
                "name layers with config.factorize or use algo='fedavg'"
            )
        notes = config.notes
        notes.setdefault("factorized_layers", ",".join(self.layer_names))
        notes.setdefault(
            "lora_init", "A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, W0 = dense init"
            if not self._from_scratch(config)
            else "W0 = 0, A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B ~ U(-b, b), b = sqrt(3r)/alpha"
        )
        notes.setdefault("lora_aggregation", "A and B averaged separately, weights n_c")

    def _from_scratch(self, config: TrainConfig) -> bool:
        """W0 = 0 with both factors random unless ``--no-from-scratch`` (default: the papers'
        pure rank-r model, as the authors' code initializes it)."""
        return True if config.from_scratch is None else bool(config.from_scratch)

    def _client_effective(self, reply: dict[str, Tensor], client_id: int) -> dict[str, Tensor]:
        """W0 + (α/r)·B_c·A_c (and the client's other tensors) as a dense state_dict; for
        pFedLoRU the global part only (the personal pair never travels)."""
        scratch = copy.deepcopy(self.model)
        scratch.load_state_dict({**self._client_held(client_id), **reply})
        return densify(scratch, self.template).state_dict()

    def _ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in factorized_layers(self.model).items()}

    def effective_model(self) -> nn.Module:
        return densify(self.model, self.template)

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        _load_strict(self.model, tensors, "factorized model")
