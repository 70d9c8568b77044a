"""Normalizing the ``data`` argument: an iterable of (inputs, targets) batches or one pair."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batches:
    """Materialized batches with their sizes; N = Σ n_b and weights n_b / N (mean reduction)."""

    inputs: tuple[Tensor, ...]
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


def _is_pair(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    )


def as_batches(
    data: Iterable | tuple[Tensor, Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int | None = None,
) -> Batches:
    """Read ``data`` once into a tuple of batches on ``device``.

    Floating-point inputs are cast to ``dtype`` (the model's) and given row-major strides
    (:func:`standard_strides`), integer targets are kept.
    A (inputs, targets) pair becomes one batch, or chunks of ``batch_size`` if given. Empty
    batches are dropped; no data at all is an error.
    """
    if _is_pair(data):
        x, y = data
        if batch_size is None or batch_size >= len(y):
            pairs: list = [(x, y)]
        else:
            starts = range(0, len(y), batch_size)
            pairs = [(x[i : i + batch_size], y[i : i + batch_size]) for i in starts]
    else:
        try:
            pairs = list(data)
        except TypeError:
            raise TypeError(
                "data must be an (inputs, targets) pair of tensors or an iterable of such batches "
                f"(a DataLoader works), got {type(data).__name__}"
            ) from None
    xs, ys = [], []
    for i, batch in enumerate(pairs):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            got = type(batch).__name__
            raise TypeError(f"batch {i} is not an (inputs, targets) pair: got {got}")
        x, y = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"batch {i} has {x.shape[0]} inputs but {y.shape[0]} targets; they must match"
            )
        if y.shape[0] == 0:
            continue
        if torch.is_floating_point(x):
            x = x.to(dtype)
        x = standard_strides(x)
        if torch.is_floating_point(y):
            y = y.to(dtype)
        xs.append(x.to(device))
        ys.append(y.to(device))
    if not ys:
        raise ValueError("data is empty: the Hessian of a loss over no samples is undefined")
    return Batches(tuple(xs), tuple(ys))
