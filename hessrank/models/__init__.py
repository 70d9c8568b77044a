"""Model families: the networks a run builds from ``(name, input_shape, num_outputs)``.

Module names are part of the checkpoint format (state_dict keys), so each family fixes them
in its own module (:mod:`hessrank.models.builtin`: MLP, CNN, ResNet-8/18, linear map;
:mod:`hessrank.models.hf`: GPT-2 and LLaMA from ``transformers``); :mod:`hessrank.models.registry`
holds the table of names; :mod:`hessrank.models.adapters` puts PEFT LoRA adapters on the
language models.
"""

from hessrank.models.builtin import BasicBlock, ResNet
from hessrank.models.registry import MODELS, build_model, model_options

__all__ = ["MODELS", "BasicBlock", "ResNet", "build_model", "model_options"]
