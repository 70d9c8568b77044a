"""A run's PEFT adapters: the config keys that put LoRA adapters on an hf-* model's base.

With ``adapters="peft"`` (FedLoRA, FedLoRU; :class:`~hessrank.fl.registry.AdapterOptions`)
the model a run trains is the network :func:`~hessrank.models.build_model` builds (random
init after ``torch.manual_seed(seed)``, or pretrained from ``model_kwargs["model_path"]``),
frozen as the base W0, with a PEFT pair A (r × in), B (out × r) on every projection of
``lora_targets`` (:func:`hessrank.models.adapters.add_lora`: A Kaiming-uniform from torch's
global RNG, B = 0). The trainer (:mod:`hessrank.fl.setup`) and the checkpoint reader
(:class:`hessrank.fl.rundir.RunDir`) both build it here, in the same order — build, adapters,
then the run's dtype — so a checkpoint's ``model.*`` keys (base and adapters, PEFT's names)
load into the model the reader builds, and the adapters are what the analysis differentiates.
Imports no algorithm (the reader stays free of the trainer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hessrank.models.adapters import add_lora

if TYPE_CHECKING:
    from hessrank.fl.config import TrainConfig

__all__ = ["DEFAULT_TARGETS", "add_run_adapters", "uses_adapters"]

DEFAULT_TARGETS = "attention"
"""The projections adapted when ``lora_targets`` is None."""


def uses_adapters(config: TrainConfig) -> bool:
    """Whether ``config``'s model carries PEFT adapters (``adapters="peft"``)."""
    return getattr(config, "adapters", None) == "peft"


def add_run_adapters(model: nn.Module, config: TrainConfig) -> tuple[str, ...]:
    """Put ``config``'s adapters on ``model`` in place (rank ``rank``, α ``lora_alpha``,
    ``lora_targets``); nothing without ``adapters="peft"``.

    Returns:
        The adapter parameter names (the only trainable ones), or () without adapters.
    Raises:
        ValueError: a target matches no projection of the model (one line).
    """
    if not uses_adapters(config):
        return ()
    return add_lora(model, rank=config.rank, alpha=config.lora_alpha,
                    targets=config.lora_targets or DEFAULT_TARGETS)  # fmt: skip
