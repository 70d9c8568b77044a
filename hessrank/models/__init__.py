"""Model families: the networks a run builds from ``(name, input_shape, num_outputs)``.

Module names are part of the checkpoint format (state_dict keys), so each family fixes them
in its own module (:mod:`hessrank.models.builtin`: MLP, CNN, ResNet-8/18, linear map).
The names below are imported on first use (PEP 562), so that :mod:`hessrank.models.catalog`
(what ``hessrank train --help`` lists) can be read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessrank.models.builtin import MODELS, BasicBlock, ResNet, build_model

__all__ = ["MODELS", "BasicBlock", "ResNet", "build_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("hessrank.models.builtin"), name)
    raise AttributeError(f"module 'hessrank.models' has no attribute {name!r}")
