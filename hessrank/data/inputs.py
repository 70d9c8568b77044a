"""Structured model inputs: a tensor (``model(x)``), a tuple or list of tensors
(``model(*x)``) or a dict (``model(**x)``, Hugging Face style), batch on dimension 0.

Every hessrank layer that feeds a model (the tasks, the curvature operators, the trainer)
reads, slices and concatenates inputs through these helpers, so all of them accept the same
structures.

Example:
    >>> x = {"input_ids": torch.zeros(4, 7, dtype=torch.long)}
    >>> batch_size_of(x), batch_size_of(slice_inputs(x, 1, 3))
    (4, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = [
    "Inputs",
    "batch_size_of",
    "call_model",
    "cat_inputs",
    "first_tensor",
    "index_inputs",
    "map_inputs",
    "slice_inputs",
]

Inputs = Tensor | tuple | list | dict


def map_inputs(fn: Callable[[Tensor], Tensor], x: Inputs) -> Inputs:
    """Apply ``fn`` to every tensor of a structured input, keeping the structure."""
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, x)


def first_tensor(x: Inputs) -> Tensor:
    """The first tensor of a structured input (its first dimension is the batch)."""
    for leaf in pytree.tree_leaves(x):
        if isinstance(leaf, Tensor):
            return leaf
    raise TypeError(f"inputs hold no tensor: got {type(x).__name__}")


def batch_size_of(x: Inputs) -> int:
    """Number of samples in ``x`` (the first dimension of its first tensor)."""
    t = first_tensor(x)
    if t.ndim == 0:
        raise ValueError("inputs must have a batch dimension; got a 0-d tensor")
    return int(t.shape[0])


def call_model(model: Callable, x: Inputs):
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the structure of ``x``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def cat_inputs(xs: Sequence[Inputs]) -> Inputs:
    """Concatenate structured inputs along the batch dimension."""
    leaves, spec = pytree.tree_flatten(xs[0])
    cols = [pytree.tree_flatten(x)[0] for x in xs]
    out = [torch.cat([c[i] for c in cols]) if isinstance(leaf, Tensor) else leaf
           for i, leaf in enumerate(leaves)]  # fmt: skip
    return pytree.tree_unflatten(out, spec)


def slice_inputs(x: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of every tensor of ``x``."""
    return map_inputs(lambda t: t[start:stop], x)


def index_inputs(x: Inputs, index: Tensor) -> Inputs:
    """Samples ``index`` (an integer tensor) of every tensor of ``x``, in that order."""
    return map_inputs(lambda t: t[index.to(t.device)], x)
