"""Layers in dynamical low-rank form W = U S Vᵀ (Schotthöfer et al., 2022; used by FeDLRT, 2024).

A weight matrix W (m × n) is stored as an orthonormal column basis U (m × k), a coefficient
matrix S (k × l) and an orthonormal row basis V (n × l). After a FeDLRT round S is square
(k = l = r, the rank); during a round the bases are augmented and S̃ may be rectangular when one
side has no room to grow (k = m or l = n), so the layers accept any (k, l). The bias stays dense.

For a Conv2d the matrix view is m = out_channels, n = in_channels · kh · kw (the weight reshaped
row-major), and the forward pass is a kh×kw convolution to l channels with Vᵀ followed by a 1×1
convolution with U S.

Initialization (:meth:`USVLinear.from_dense`, :meth:`USVConv2d.from_dense`): the truncated SVD
of the dense layer's weight, W = P Σ Qᵀ, gives U = P[:, :r], S = diag(σ_1..σ_r), V = Q[:, :r]:
the factorized layer starts at the best rank-r approximation (Eckart-Young) of the dense layer's
initial weight, so the largest directions of the dense init keep their scale. The SVD is taken
in float64 and cast back to the layer's dtype. r is clamped to min(m, n).

Example:
    >>> import torch
    >>> dense = torch.nn.Linear(20, 10)
    >>> layer = USVLinear.from_dense(dense, rank=4)
    >>> layer.U.shape, layer.S.shape, layer.V.shape
    (torch.Size([10, 4]), torch.Size([4, 4]), torch.Size([20, 4]))
    >>> layer(torch.randn(3, 20)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def truncated_svd_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r factors of ``matrix`` (m × n) from its SVD, computed in float64.

    Returns U (m × r'), S = diag(σ_1..σ_r') (r' × r'), V (n × r') in the input's dtype with
    r' = min(rank, m, n); U and V have orthonormal columns and U S Vᵀ is the best rank-r'
    approximation of ``matrix`` in Frobenius and spectral norm.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    m, n = matrix.shape
    r = min(rank, m, n)
    P, sigma, Qh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    dtype = matrix.dtype
    return (
        P[:, :r].to(dtype).contiguous(),
        torch.diag(sigma[:r]).to(dtype),
        Qh[:r].T.to(dtype).contiguous(),
    )


def _own_copy(t: Tensor, like: Tensor) -> Tensor:
    """A contiguous (row-major) copy of ``t`` with ``like``'s dtype and device."""
    return t.detach().to(device=like.device, dtype=like.dtype).clone(
        memory_format=torch.contiguous_format
    )


class _USVBase(nn.Module):
    """Shared storage of U (m × k), S (k × l), V (n × l) and the optional dense bias (m,)."""

    U: nn.Parameter
    S: nn.Parameter
    V: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self._check(U, S, V)
        self.U = nn.Parameter(U.detach().clone(memory_format=torch.contiguous_format))
        self.S = nn.Parameter(S.detach().clone(memory_format=torch.contiguous_format))
        self.V = nn.Parameter(V.detach().clone(memory_format=torch.contiguous_format))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            if bias.shape != (U.shape[0],):
                raise ValueError(
                    f"bias has shape {tuple(bias.shape)}; it must be ({U.shape[0]},), one entry "
                    "per output of U"
                )
            self.bias = nn.Parameter(bias.detach().clone())

    @staticmethod
    def _check(U: Tensor, S: Tensor, V: Tensor) -> None:
        if U.ndim != 2 or S.ndim != 2 or V.ndim != 2:
            raise ValueError(
                f"U, S, V must be matrices; got shapes {tuple(U.shape)}, {tuple(S.shape)}, "
                f"{tuple(V.shape)}"
            )
        if S.shape != (U.shape[1], V.shape[1]):
            raise ValueError(
                f"S has shape {tuple(S.shape)} but U has {U.shape[1]} and V has {V.shape[1]} "
                f"columns; S must be ({U.shape[1]}, {V.shape[1]})"
            )

    @property
    def rank(self) -> int:
        """min(k, l): the rank of the factorization (k = l = r between rounds)."""
        return min(self.S.shape)

    def weight_matrix(self) -> Tensor:
        """The matrix view W = U S Vᵀ, shape (m, n)."""
        return self.U @ self.S @ self.V.T

    def set_factors(self, U: Tensor, S: Tensor, V: Tensor) -> None:
        """Replace U, S, V (shapes may change: augmentation, truncation); tensors are copied.

        The row counts must stay m = ``U.shape[0]`` and n = ``V.shape[0]``.
        """
        self._check(U, S, V)
        if U.shape[0] != self.U.shape[0] or V.shape[0] != self.V.shape[0]:
            raise ValueError(
                f"new bases have {U.shape[0]} and {V.shape[0]} rows; this layer needs "
                f"{self.U.shape[0]} (U) and {self.V.shape[0]} (V)"
            )
        # row-major copies whatever the source's strides (QR returns column-major bases): the
        # bits of later products must not depend on whether U came from a QR or a checkpoint
        ref = self.S
        self.U = nn.Parameter(_own_copy(U, ref))
        self.S = nn.Parameter(_own_copy(S, ref))
        self.V = nn.Parameter(_own_copy(V, ref))


class USVLinear(_USVBase):
    """y = x Wᵀ + b with W = U S Vᵀ; U (out × k), S (k × l), V (in × l) orthonormal U, V.

    The product is evaluated right to left, x ↦ x V ↦ (x V) Sᵀ ↦ (x V Sᵀ) Uᵀ + b, so a forward
    pass costs O((in + out) · l + k · l) per sample instead of O(in · out).
    """

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int) -> USVLinear:
        """Truncated-SVD initialization from a dense ``nn.Linear`` (see the module docstring)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(layer).__name__}")
        U, S, V = truncated_svd_factors(layer.weight, rank)
        return cls(U, S, V, None if layer.bias is None else layer.bias)

    @property
    def in_features(self) -> int:
        return int(self.V.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.U.shape[0])

    def dense_weight(self) -> Tensor:
        """W = U S Vᵀ with the shape of ``nn.Linear.weight``: (out, in)."""
        return self.weight_matrix()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(F.linear(x, self.V.T), self.S), self.U, self.bias)

    def extra_repr(self) -> str:
        k, l = self.S.shape
        return (
            f"in={self.in_features}, out={self.out_features}, S={k}x{l}, "
            f"bias={self.bias is not None}"
        )


class USVConv2d(_USVBase):
    """Conv2d whose weight in matrix view (out × in·kh·kw) is U S Vᵀ.

    Forward: a kh×kw convolution with the l filters Vᵀ reshaped to (l, in, kh, kw) (carrying
    the layer's stride, padding and dilation), then a 1×1 convolution with U S (out × l) plus the
    bias. Only ``groups=1`` and ``padding_mode='zeros'`` are supported.
    """

    def __init__(
        self,
        U: Tensor,
        S: Tensor,
        V: Tensor,
        bias: Tensor | None,
        *,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] | int = 1,
        padding: tuple[int, int] | int | str = 0,
        dilation: tuple[int, int] | int = 1,
    ) -> None:
        super().__init__(U, S, V, bias)
        kh, kw = kernel_size
        if V.shape[0] != in_channels * kh * kw:
            raise ValueError(
                f"V has {V.shape[0]} rows; a conv with {in_channels} input channels and a "
                f"{kh}x{kw} kernel needs in·kh·kw = {in_channels * kh * kw}"
            )
        self.in_channels = in_channels
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rank: int) -> USVConv2d:
        """Truncated-SVD initialization from a dense ``nn.Conv2d`` (see the module docstring)."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError(
                f"USVConv2d supports groups=1 and padding_mode='zeros' only; got groups="
                f"{layer.groups}, padding_mode={layer.padding_mode!r}: leave this layer dense"
            )
        out = layer.out_channels
        U, S, V = truncated_svd_factors(layer.weight.reshape(out, -1), rank)
        return cls(
            U,
            S,
            V,
            None if layer.bias is None else layer.bias,
            in_channels=layer.in_channels,
            kernel_size=tuple(layer.kernel_size),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
        )

    @property
    def out_channels(self) -> int:
        return int(self.U.shape[0])

    def dense_weight(self) -> Tensor:
        """U S Vᵀ reshaped to ``nn.Conv2d.weight``'s shape (out, in, kh, kw)."""
        kh, kw = self.kernel_size
        return self.weight_matrix().reshape(self.out_channels, self.in_channels, kh, kw)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        l = self.V.shape[1]
        h = F.conv2d(
            x,
            self.V.T.reshape(l, self.in_channels, kh, kw),
            None,
            self.stride,
            self.padding,
            self.dilation,
        )
        us = (self.U @ self.S).reshape(self.out_channels, l, 1, 1)
        return F.conv2d(h, us, self.bias)

    def extra_repr(self) -> str:
        k, l = self.S.shape
        return (
            f"in={self.in_channels}, out={self.out_channels}, kernel={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, S={k}x{l}, bias={self.bias is not None}"
        )


def usv_from_dense(
    layer: nn.Module, rank: int, *, keep_norm: bool = False
) -> USVLinear | USVConv2d:
    """Factorize an ``nn.Linear`` or ``nn.Conv2d`` into its U S Vᵀ counterpart (truncated SVD).

    With ``keep_norm`` the coefficients are rescaled, S ← S·‖W‖_F / ‖S‖_F, so the factorized
    layer keeps the Frobenius norm of the dense init (for isotropic inputs, its output
    variance): a rank-r truncation of a random m × n init keeps only about r/min(m, n) of
    ‖W‖_F², and several factorized layers in a row shrink the signal geometrically.
    """
    if isinstance(layer, nn.Linear):
        out = USVLinear.from_dense(layer, rank)
    elif isinstance(layer, nn.Conv2d):
        out = USVConv2d.from_dense(layer, rank)
    else:
        raise TypeError(
            f"only nn.Linear and nn.Conv2d layers can be factorized, got {type(layer).__name__}"
        )
    if keep_norm:
        with torch.no_grad():
            full = torch.linalg.matrix_norm(layer.weight.detach().reshape(out.U.shape[0], -1))
            kept = torch.linalg.matrix_norm(out.S.detach())
            if float(kept) > 0:
                out.S.mul_(full / kept)
    return out

