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

The server is FedAvg's strategy over the factorized model (:class:`FedLoRA`); the client is
FedAvg's local SGD in a factorized copy (:class:`LoRALocalSGD`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import FedAvg, LocalSGD, load_strict
from hessrank.fl.layers import densify, factorize, factorized_layers
from hessrank.fl.protocol import ClientReply, ClientTask

__all__ = ["FedLoRA", "LoRALocalSGD", "from_scratch", "init_generator", "lora_factorize"]


def init_generator(config: TrainConfig, stream: int) -> torch.Generator:
    """A generator for setup draws (factor inits), seeded by (config.seed, stream)."""
    return torch.Generator().manual_seed(int(config.seed) * 1000 + 17 + int(stream))


def from_scratch(config: TrainConfig) -> bool:
    """W0 = 0 with both factors random unless ``--no-from-scratch`` (default: the papers'
    pure rank-r model). The scales of the two factors are ``config.lora_init``: the default
    ``dense-variance`` is hessrank's choice, not the authors' code (which is ``kaiming``; see
    :mod:`hessrank.fl.layers` and docs/deviations.md)."""
    return True if config.from_scratch is None else bool(config.from_scratch)


def lora_factorize(model: nn.Module, config: TrainConfig) -> list[str]:
    """Factorize ``model`` in place as the config says (``factorize``, ``factorize_rule``,
    ``rank``, ``lora_alpha``, ``from_scratch``, ``lora_init``, ``lowrank_dropout``; draws from
    :func:`init_generator` stream 0, so server and clients build the same layers); returns the
    factorized layer names."""
    factorize(
        model, config.factorize, rank=config.rank, alpha=config.lora_alpha,
        from_scratch=from_scratch(config), generator=init_generator(config, 0),
        rule=config.factorize_rule, init=config.lora_init, dropout=config.lowrank_dropout,
    )  # fmt: skip
    names = list(factorized_layers(model))
    if not names:
        raise ValueError(
            f"no layer is factorized: factorize_rule {config.factorize_rule!r} finds none in "
            f"model {config.model!r} (inner: fewer than three Linear/Conv2d layers; conv: "
            "fewer than two Conv2d); name layers with config.factorize or use algo='fedavg'"
        )
    return names


def _init_note(config: TrainConfig) -> str:
    """The factor initialization of ``config`` in words (for config.notes)."""
    if not from_scratch(config):
        return "A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, W0 = dense init"
    if config.lora_init == "kaiming":
        return ("W0 = 0, bias 0, A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B ~ U(-1/sqrt(r), "
                "1/sqrt(r)) (kaiming-uniform a=sqrt(5), the authors' code)")  # fmt: skip
    return ("W0 = 0, A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B ~ U(-b, b), b = sqrt(3r)/alpha "
            "(hessrank's dense-variance scale)")  # fmt: skip


class FedLoRA(FedAvg):
    """FedLoRA's server; the model passed in is dense and gets factorized here (in place).

    ``config.factorize`` names the layers (None: every Linear/Conv2d except the first and the
    last), ``config.rank`` / ``config.lora_alpha`` give r and α. By default the factorized
    layers are pure rank-r (W0 = 0, A and B random: ``from_scratch``, the non-merging
    baseline of Park et al., 2024); ``from_scratch=False`` starts from W0 = dense init, B = 0.
    """

    name = "fedlora"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.template = copy.deepcopy(model)
        self.layer_names = lora_factorize(model, config)
        super().__init__(model, config)

    def notes(self) -> dict[str, str]:
        return {
            **super().notes(),
            "factorized_layers": ",".join(self.layer_names),
            "lora_init": _init_note(self.config),
            "lora_aggregation": "A and B averaged separately, weights n_c",
        }  # fmt: skip

    def client_effective(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        """W0 + (α/r)·B_c·A_c (and the client's other tensors) as a dense state_dict; for
        pFedLoRU the global part only (the personal pair never travels)."""
        scratch = copy.deepcopy(self.model)
        scratch.load_state_dict({**task.held, **self.full_reply(task, reply)})
        return densify(scratch, self.template).state_dict()

    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in factorized_layers(self.model).items()}

    def effective_model(self) -> nn.Module:
        return densify(self.model, self.template)

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        load_strict(self.model, tensors, "factorized model")


class LoRALocalSGD(LocalSGD):
    """FedAvg's client in a factorized copy of the model (trains A, B and the dense rest)."""

    def build_worker(self, model: nn.Module) -> nn.Module:
        lora_factorize(model, self.config)
        return model

    def stochastic(self) -> bool:
        return self.config.lowrank_dropout > 0.0
