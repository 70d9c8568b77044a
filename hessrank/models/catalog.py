"""What the command line says about each model family, without importing torch.

:data:`MODEL_CATALOG` describes every name of :data:`hessrank.models.MODELS`: a one-line
summary and a help line per keyword option of its builder. The builders live in
:mod:`hessrank.models.builtin` (torch); this module imports nothing, so ``hessrank train
--help`` lists the models fast. ``tests/fl/test_cli_train.py`` checks the names and options
against the builders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MODEL_CATALOG", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """summary: one line; options: ``model_kwargs`` key → help line."""

    summary: str
    options: dict[str, str] = field(default_factory=dict)


_ACT = "relu or tanh"
_WIDTH = "channels of the first stage"
_HF = {"layers": "transformer blocks", "width": "hidden size", "heads": "attention heads",
       "ffn_width": "MLP width (default 4 x width)", "max_positions": "longest sequence",
       "dropout": "dropout probability (default 0)", "tie_embeddings": "tie input and output "
       "embeddings", "attention": "sdpa (math kernel) or eager",
       "model_path": "a local folder with config.json and weights (no download)",
       "config": "further transformers config fields"}  # fmt: skip
MODEL_CATALOG: dict[str, ModelInfo] = {
    "mlp": ModelInfo("flatten, Linear+activation per hidden width, Linear",
                     {"hidden": "list of hidden widths", "activation": _ACT}),
    "cnn": ModelInfo("3x3 conv blocks with max-pooling, then two Linear layers",
                     {"channels": "list of conv channels", "hidden": "width of fc1",
                      "activation": _ACT}),
    "resnet8": ModelInfo("ResNet-8 (three stages of one basic block)", {"width": _WIDTH}),
    "resnet18": ModelInfo("ResNet-18 (four stages of two basic blocks)", {"width": _WIDTH}),
    "linear": ModelInfo("one linear map (least squares)", {"bias": "with a bias"}),
    "hf-gpt2": ModelInfo("GPT-2 causal LM from transformers (random weights or model_path)",
                         _HF),
    "hf-llama": ModelInfo("LLaMA causal LM from transformers (random weights or model_path)",
                          {**_HF, "kv_heads": "key/value heads (grouped-query attention)"}),
}  # fmt: skip
"""Model name → :class:`ModelInfo`, in the order of the builders' registry."""
