"""FedLoRA and FedLoRU on PEFT adapters: the papers' LLM regime (Hu et al., 2021; Park et al.,
2024, "Communication-efficient federated low-rank update").

The model is an hf-* language model whose base W0 is frozen (random init or pretrained) and
whose attention (optionally MLP) projections carry PEFT pairs, W = W0 + (α/r)·B·A
(:mod:`hessrank.fl.adapters` puts them on at setup). One round with sampled clients S and
N_S = Σ_{c∈S} n_c:
    server → client c: A, B of every adapted projection (nothing else)
    client c:          local SGD on A and B only (W0, embeddings, norms frozen)
    client → server:   A_c, B_c
    server:            A ← Σ (n_c/N_S) A_c and B ← Σ (n_c/N_S) B_c separately
Floats each way per client: Σ_projections r·(in + out), the adapter parameters. W0 never
travels: every party builds it from the run's seed or the same ``model_path``.

FedLoRU adds, after the aggregation of rounds t with t % τ == 0 (τ = ``merge_every``), the
merge of :func:`hessrank.models.adapters.merge_adapters`: W0 ← W0 + (α/r)·B·A in every
adapted projection, A redrawn (Kaiming-uniform) from the round generator, B = 0. A sampled
client that missed m merges first downloads, per projection, min(m·r·(in + out), in·out)
floats (the missed pairs, or W0 itself when smaller) — :mod:`hessrank.fl.fedloru`'s
accounting.

The server is FedAvg's strategy with the message restricted to the adapters; the client is
FedAvg's :class:`~hessrank.fl.fedavg.LocalSGD` unchanged (it trains exactly the parameters
that require gradients: the adapters). Checkpoints hold the PEFT model's state (base and
adapters under PEFT's names), so a run's adapters can be analyzed as adapters; recorded
updates (``record_updates``) are in the same keys: A_c − A and B_c − B of each client, zero
for every base tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import FedAvg
from hessrank.fl.fedloru import MergeLedger
from hessrank.models.adapters import adapter_names, has_adapters, merge_adapters

__all__ = ["PeftFedLoRA", "PeftFedLoRU", "adapted_shapes"]


def adapted_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Per adapted projection (its module name), (r, in, out) from its A (r × in) and
    B (out × r)."""
    named = dict(model.named_parameters())
    out = {}
    for name in adapter_names(model):
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            b = named[name.replace(".lora_A.", ".lora_B.")]
            r, fan_in = named[name].shape
            out[module] = (int(r), int(fan_in), int(b.shape[0]))
    return out


class PeftFedLoRA(FedAvg):
    """FedLoRA's server on a model with PEFT adapters (module docstring); the model passed
    in already carries them (:func:`hessrank.fl.adapters.add_run_adapters`)."""

    name = "fedlora"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        if not has_adapters(model):
            raise ValueError("the model has no PEFT adapters; build the run with "
                             "hessrank.fl.setup.build_setup (adapters='peft' adds them)")
        super().__init__(model, config)
        self.adapter_keys = adapter_names(model)
        self.shapes = adapted_shapes(model)

    def notes(self) -> dict[str, str]:
        return {
            **super().notes(),
            "adapters": "PEFT LoRA, (alpha/r) B A on the frozen base W0 (random init or "
            "model_path); A Kaiming-uniform, B = 0; only A and B trained and sent",
            "adapted_modules": ",".join(self.shapes),
            "lora_aggregation": "A and B averaged separately, weights n_c",
        }

    def download(self, client_id: int) -> dict[str, Tensor]:
        """The adapters, nothing else."""
        state = self.model.state_dict()
        return {k: state[k] for k in self.adapter_keys}

    def held(self, client_id: int) -> dict[str, Tensor]:
        """Everything but the adapters: the frozen base, in sync on every client."""
        keys = set(self.adapter_keys)
        return {k: v for k, v in self.model.state_dict().items() if k not in keys}

    def ranks(self) -> dict[str, int]:
        return {name: r for name, (r, _, _) in self.shapes.items()}


class PeftFedLoRU(MergeLedger, PeftFedLoRA):
    """FedLoRU's server on PEFT adapters: :class:`PeftFedLoRA` plus a merge every
    ``merge_every`` rounds (0: never), with FedLoRU's bookkeeping
    (:class:`~hessrank.fl.fedloru.MergeLedger`)."""

    name = "fedloru"

    def notes(self) -> dict[str, str]:
        return {
            **super().notes(),
            "merge": "after aggregation of rounds t with t % merge_every == 0: W0 += (alpha/r) "
            "B A in every adapted projection, A redrawn from the round generator, B = 0",
            "merge_communication": "a sampled client that missed m merges downloads "
            "min(m r (in+out), in out) floats per projection before the round's message",
        }

    def merge_shapes(self) -> list[tuple[int, int, int]]:
        return list(self.shapes.values())

    def merge(self, rng: torch.Generator) -> None:
        merge_adapters(self.model, rng)
