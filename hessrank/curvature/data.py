"""Normalizing the ``data`` argument: one (inputs, targets) pair or an iterable of batches.

Inputs may be a tensor (``model(x)``), a tuple or list of tensors (``model(*x)``) or a dict
(``model(**x)``, Hugging Face style; :mod:`hessrank.data.inputs`); the batch size is read from
the first tensor. Targets are a tensor whose first dimension is the batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from hessrank.data.inputs import Inputs, batch_size_of, cat_inputs, map_inputs, slice_inputs


@dataclass(frozen=True)
class Batches:
    """Materialized batches with their sizes; N = Σ n_b and weights n_b / N (mean reduction)."""

    inputs: tuple
    targets: tuple[Tensor, ...]

    @property
    def sizes(self) -> list[int]:
        return [int(y.shape[0]) for y in self.targets]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def weights(self) -> list[float]:
        N = self.num_samples
        return [n / N for n in self.sizes]

    def __len__(self) -> int:
        return len(self.targets)

    def pooled(self) -> tuple[Inputs, Tensor]:
        """All batches as one (inputs, targets) pair."""
        return cat_inputs(list(self.inputs)), torch.cat(self.targets)


def standard_strides(x: Tensor) -> Tensor:
    """``x`` with row-major strides. A tensor with a size-1 dimension can be contiguous and
    channels_last at once (single-channel images: strides (64, 1, 8, 1)); torch 2.13's conv
    backward then asks vmap a memory-format question it cannot answer ("NYI: querying
    is_contiguous inside of vmap"), so inputs are given the plain layout once, here."""
    expected, acc = [], 1
    for size in reversed(x.shape):
        expected.append(acc)
        acc *= size
    if list(x.stride()) == expected[::-1]:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _is_inputs(x) -> bool:
    if isinstance(x, Tensor):
        return True
    if isinstance(x, dict):
        return any(isinstance(v, Tensor) for v in x.values())
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[1], Tensor) and _is_inputs(data[0]))


def as_batches(
    data: Iterable | tuple | Batches,
    *,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int | None = None,
) -> Batches:
    """Read ``data`` once into a tuple of batches on ``device`` (a ``Batches`` passes through).

    Floating-point inputs and targets are cast to ``dtype`` (the model's) and given row-major
    strides (:func:`standard_strides`); integer tensors (labels, token ids, masks) are kept.
    A (inputs, targets) pair becomes one batch, or chunks of ``batch_size`` if given. Empty
    batches are dropped; no data at all is an error.
    """
    if isinstance(data, Batches):
        return data
    if _is_pair(data):
        x, y = data
        n = len(y)
        if batch_size is None or batch_size >= n:
            pairs: list = [(x, y)]
        else:
            pairs = [(slice_inputs(x, i, i + batch_size), y[i:i + batch_size])
                     for i in range(0, n, batch_size)]
    else:
        try:
            pairs = list(data)
        except TypeError:
            raise TypeError(
                "data must be an (inputs, targets) pair or an iterable of such batches "
                f"(a DataLoader works), got {type(data).__name__}"
            ) from None

    def prepare(t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if torch.is_floating_point(t):
            t = t.to(dtype)
        return standard_strides(t).to(device)

    xs, ys = [], []
    for i, batch in enumerate(pairs):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            got = type(batch).__name__
            raise TypeError(f"batch {i} is not an (inputs, targets) pair: got {got}")
        x, y = batch[0], torch.as_tensor(batch[1])
        if not isinstance(x, (dict, tuple, list)):
            x = torch.as_tensor(x)
        n = batch_size_of(x)
        if n != y.shape[0]:
            raise ValueError(f"batch {i} has {n} inputs but {y.shape[0]} targets; they must match")
        if n == 0:
            continue
        xs.append(map_inputs(prepare, x))
        ys.append(prepare(y))
    if not ys:
        raise ValueError("data is empty: the curvature of a loss over no samples is undefined")
    return Batches(tuple(xs), tuple(ys))
