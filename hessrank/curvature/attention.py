"""Scaled-dot-product attention under curvature products: which kernel, and a clear error.

torch 2.13 dispatches ``F.scaled_dot_product_attention`` on the CPU to a fused kernel
(``_scaled_dot_product_flash_attention_for_cpu``) whose backward has no derivative and which
has no forward-mode rule, so every Hessian, GGN and Fisher product through it fails deep in
torch. The reference ("math") kernel is plain differentiable tensor algebra. The operators
therefore watch the first forward pass (:class:`SeesAttention`), record ``"attention":
"math"`` in the route of a model that calls it, and compute under
:func:`attention_kernel` — the math backend unless the user forces another kernel
(``sdpa=``), in which case a kernel without second derivatives fails with one line.

Example:
    >>> with attention_kernel("math"):
    ...     pass
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


class SeesAttention(TorchFunctionMode):
    """Records whether ``F.scaled_dot_product_attention`` is called inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.called = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.called = True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def attention_kernel(kernel: str | None):
    """Compute with torch's ``kernel`` attention backend ("math", "flash", "efficient",
    "cudnn"; None: torch's own choice, nothing entered). A product that fails inside a kernel
    without second derivatives is re-raised as one ValueError naming the way out."""
    if kernel is None:
        yield
        return
    try:
        with sdpa_kernel(BACKENDS[kernel]):
            yield
    except RuntimeError as err:
        if "scaled_dot_product" not in str(err) and "No available kernel" not in str(err):
            raise
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"sdpa={kernel!r}: torch's {kernel} attention kernel cannot compute curvature "
            f"products ({first}); use sdpa='math' (the default)") from None
