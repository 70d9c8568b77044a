"""The model registry: one name per family, built from ``(name, input_shape, num_outputs)``.

The built-in networks (:mod:`hessrank.models.builtin`) and the Hugging Face language models
(:mod:`hessrank.models.hf`, whose ``transformers`` import waits until one is built) are
entries of one table, so a run, the checkpoint reader and the CLI rebuild any of them the same
way.

Example:
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("cnn", (1, 8, 8), 10)
    >>> model(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import inspect
from typing import Any

import torch  # noqa: F401  (the doctest's namespace)
from torch import nn

from hessrank.models.builtin import FAMILIES
from hessrank.models.hf import HF_FAMILIES, build_hf_model

__all__ = ["MODELS", "build_model", "model_options"]

MODELS: tuple[str, ...] = (*FAMILIES, *HF_FAMILIES)
"""Names accepted by :func:`build_model`."""


def model_options(name: str) -> list[str]:
    """The keyword options family ``name`` accepts."""
    builder = FAMILIES.get(name) or HF_FAMILIES[name]
    params = inspect.signature(builder).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_model(
    name: str, input_shape: tuple[int, ...], num_outputs: int, **kwargs: Any
) -> nn.Module:
    """Build a freshly initialized network (float32, training mode) from torch's global RNG.

    Args:
        name: one of :data:`MODELS`: "mlp", "cnn", "resnet8", "resnet18", "linear", "hf-gpt2",
            "hf-llama".
        input_shape: per-sample input shape, (C, H, W) for images, (d,) for vectors, (T,) token
            ids for the hf-* language models.
        num_outputs: number of classes, d_out for regression, the vocabulary size for hf-*.
        **kwargs: mlp: ``hidden=(64, 64), activation="relu"|"tanh"``; cnn: ``channels=(16, 32),
            hidden=64, activation``; resnet8/resnet18: ``width=16``; linear: ``bias=False``;
            hf-gpt2/hf-llama: ``layers, width, heads, ..., attention, model_path`` (see
            :func:`hessrank.models.hf.build_hf_model`).
    Returns:
        An ``nn.Module`` mapping (n, *input_shape) to (n, num_outputs); for hf-* a
        :class:`~hessrank.models.hf.CausalLM` mapping (n, T) token ids to (n, T, V) logits.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}; pass the output size")
    allowed = model_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(allowed)}"
        )
    shape = tuple(int(s) for s in input_shape)
    if name in HF_FAMILIES:
        return build_hf_model(name, shape, int(num_outputs), **kwargs)
    return FAMILIES[name](shape, int(num_outputs), **kwargs)
