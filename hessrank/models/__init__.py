"""Model families: the networks a run builds from ``(name, input_shape, num_outputs)``.

Module names are part of the checkpoint format (state_dict keys), so each family fixes them
in its own module (:mod:`hessrank.models.builtin`: MLP, CNN, ResNet-8/18, linear map).
"""

from hessrank.models.builtin import MODELS, BasicBlock, ResNet, build_model

__all__ = ["MODELS", "BasicBlock", "ResNet", "build_model"]
