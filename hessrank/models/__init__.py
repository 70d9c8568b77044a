"""Model families: the networks a run builds from ``(name, input_shape, num_outputs)``.

Module names are part of the checkpoint format (state_dict keys), so each family fixes them
in its own module (:mod:`hessrank.models.builtin`: MLP, CNN, ResNet-8/18, linear map;
:mod:`hessrank.models.hf`: GPT-2 and LLaMA from ``transformers``); :mod:`hessrank.models.registry`
holds the table of names; :mod:`hessrank.models.adapters` puts PEFT LoRA adapters on the
language models. The names below are imported on first use (PEP 562), so that
:mod:`hessrank.models.catalog` (what ``hessrank train --help`` lists) can be read without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessrank.models.builtin import BasicBlock, ResNet
    from hessrank.models.registry import MODELS, build_model, model_options

__all__ = ["MODELS", "BasicBlock", "ResNet", "build_model", "model_options"]

_HOME = {"MODELS": "registry", "build_model": "registry", "model_options": "registry",
         "BasicBlock": "builtin", "ResNet": "builtin"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"hessrank.models.{_HOME[name]}"), name)
    raise AttributeError(f"module 'hessrank.models' has no attribute {name!r}")
