"""Kept double-backward graphs without the zero terms of piecewise-linear layers.

ReLU and max pooling are piecewise linear: their second derivative is zero almost everywhere.
torch's derivative formulas still differentiate their backward (``threshold_backward``,
``max_pool2d_with_indices_backward``) in the saved activation, and the result is a zero
tensor that every Hessian-vector product on a kept graph allocates, fills and adds (on the
digits MLP and CNN 3 and 4 such tensors of a batch's activations per product: the ``fill_``
and ``add`` that make PyHessian's kept-graph product and ours a few percent slower than their
matrix products, ``docs/performance.md``). While a kept graph is built, :class:`FirstOrderKinks`
routes ``F.relu``/``torch.relu``/``Tensor.relu`` and ``F.max_pool2d`` through autograd
functions whose backward reads the saved activation *detached*: the same values bit for bit
(the same kernels on the same tensors), and a double backward with no zero terms. In-place
ReLU and pooling that returns indices are left alone.

Example:
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> with FirstOrderKinks():
    ...     y = torch.relu(x)
    >>> torch.equal(y, torch.relu(x))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _ReLU(torch.autograd.Function):
    """relu(x), backward ``threshold_backward(g, out.detach(), 0)`` (as torch's, without the
    derivative in ``out``)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g, out.detach(), 0)


class _MaxPool2d(torch.autograd.Function):
    """max_pool2d(x), backward ``max_pool2d_with_indices_backward`` on the detached input."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation,
                                                          ceil_mode)
        ctx.save_for_backward(x, idx)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, g):
        x, idx = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(g, x.detach(), *ctx.args, idx)
        return gx, None, None, None, None, None


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    if return_indices:
        return None
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
        else _pair(stride)
    return _MaxPool2d.apply(x, kernel, stride, _pair(padding), _pair(dilation), bool(ceil_mode))


class FirstOrderKinks(TorchFunctionMode):
    """Inside the context, out-of-place ReLU and max pooling (without indices) record a
    backward whose own derivative has no zero terms (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.relu, torch.relu, torch.Tensor.relu) and not kwargs.get("inplace") \
                and isinstance(args[0], torch.Tensor) and len(args) == 1:
            return _ReLU.apply(args[0])
        if func is F.max_pool2d and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            out = _max_pool2d(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
