"""LoRA-style factor layers W = W0 + (α/r)·B·A for Linear and Conv2d (Hu et al., 2021).

FedLoRA/FedLoRU (Park et al., 2024) train only the factors A, B (plus biases and the layers
left dense); W0 is frozen and is changed only by :meth:`merge_` (FedLoRU's accumulation).

Matrix views. For a Linear layer with weight (out, in): A is (r, in), B is (out, r). For a
Conv2d layer with kernel (out, in, kh, kw): A is a kh×kw convolution in → r channels (weight
(r, in, kh, kw), with the base layer's stride, padding and dilation) followed by B, a 1×1
convolution r → out (weight (out, r, 1, 1)); the matrix view of the kernel is out × (in·kh·kw),
A.view(r, -1) and B.view(out, r), and the two convolutions compose to exactly one convolution
with kernel (α/r)·B·A.

Initialization (documented choices; all draws use an explicit ``torch.Generator``):
  * fine-tuning style (default): W0 = the dense layer's weight, A ~ U(−1/√fan_in, 1/√fan_in)
    (what ``nn.Linear``'s Kaiming-uniform with a = √5 gives, fan_in = in or in·kh·kw), B = 0,
    so the factorized network computes exactly the dense one;
  * from scratch, ``init="dense-variance"`` (default): W0 = 0, A as above and B ~ U(−b, b)
    with b = √(3r)/α, chosen so that each entry of (α/r)·B·A has the variance 1/(3·fan_in) of
    the dense default initialization;
  * from scratch, ``init="kaiming"`` (the FedLoRU authors' code, haemPark/fedloru_official):
    W0 = 0, the layer's bias 0, A and B both Kaiming-uniform with a = √5, i.e. A as above and
    B ~ U(−1/√r, 1/√r) (B's fan-in is r). Entry variance of (α/r)·B·A: α²/(9·r²·fan_in), i.e.
    1/(3·fan_in)·α²/(3r²) — with α = r the dense-variance entries are √3× larger;
  * after a merge: A redrawn as above, B = 0 (``merge_(reinit=False)``: A and B kept).

Low-rank dropout (``dropout`` p > 0; the authors' code): in train mode the path is
x ↦ B(dropout_p(A x)), dropout between the two factors as in the authors' LoWRank2DConv;
in eval mode, and with p = 0, no dropout.

An optional *personal* pair (pFedLoRU) adds (α_p/r_p)·U·L with L (r_p, fan_in), U (out, r_p),
initialized like A and B; it is named ``PA`` (= L) and ``PB`` (= U) in the state dict.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INITS",
    "RULES",
    "LoRAConv2d",
    "LoRALinear",
    "default_factorizable",
    "densify",
    "factorizable_names",
    "factorize",
    "factorized_layers",
    "is_factorized",
]


INITS = ("dense-variance", "kaiming")
"""The from-scratch factor initializations (module docstring)."""
RULES = ("inner", "conv")
"""The rules of :func:`default_factorizable`."""


def _uniform(shape: tuple[int, ...], bound: float, like: Tensor, generator: torch.Generator | None):
    """U(−bound, bound) samples of ``shape`` with ``like``'s dtype/device, from ``generator``."""
    u = torch.rand(shape, generator=generator, dtype=like.dtype)
    return ((2.0 * u - 1.0) * bound).to(like.device)


class _LoRABase(nn.Module):
    """Shared machinery of :class:`LoRALinear` and :class:`LoRAConv2d`.

    Subclasses set ``out_dim``, ``fan_in``, ``kernel_tail`` (the trailing shape of A's and W0's
    weight beyond (rows, in)) and implement ``_base(x, weight)`` (the dense op with the layer's
    own hyper-parameters) and ``_factor_path(x, A, B)``.
    """

    weight0: nn.Parameter
    A: nn.Parameter
    B: nn.Parameter
    bias: nn.Parameter | None
    PA: nn.Parameter | None
    PB: nn.Parameter | None

    def _init_factors(
        self,
        base_weight: Tensor,
        bias: Tensor | None,
        rank: int,
        alpha: float,
        from_scratch: bool,
        generator: torch.Generator | None,
        init: str = "dense-variance",
        dropout: float = 0.0,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"unknown factor init {init!r}; choose one of {', '.join(INITS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"low-rank dropout must be in [0, 1), got {dropout}")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        w0 = torch.zeros_like(base_weight) if from_scratch else base_weight.detach().clone()
        self.weight0 = nn.Parameter(w0, requires_grad=False)
        self.A = nn.Parameter(torch.empty(self._a_shape(rank), dtype=w0.dtype, device=w0.device))
        self.B = nn.Parameter(torch.empty(self._b_shape(rank), dtype=w0.dtype, device=w0.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.PA = None
        self.PB = None
        self.personal_rank = 0
        self.personal_alpha = 0.0
        self.reinit_(generator)
        if from_scratch:
            with torch.no_grad():
                if init == "kaiming":
                    b = 1.0 / math.sqrt(rank)
                    if self.bias is not None:
                        self.bias.zero_()
                else:
                    b = math.sqrt(3.0 * rank) / self.alpha
                self.B.copy_(_uniform(self.B.shape, b, self.B, generator))

    # shapes of the factors as module weights
    def _a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, *self.in_tail)

    def _b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_dim, rank, *self.b_tail)

    @property
    def scale(self) -> float:
        """α / r, the factor in front of B·A."""
        return self.alpha / self.rank

    @property
    def personal_scale(self) -> float:
        """α_p / r_p, the factor in front of the personal pair (0 without one)."""
        return self.personal_alpha / self.personal_rank if self.personal_rank else 0.0

    @staticmethod
    def _product(B: Tensor, A: Tensor, shape: torch.Size) -> Tensor:
        """B·A in the matrix view (out, r) @ (r, fan_in), reshaped to the dense weight shape."""
        return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(shape)

    def dense_weight(self) -> Tensor:
        """W0 + (α/r)·B·A (+ (α_p/r_p)·PB·PA with a personal pair), shape of the dense weight."""
        w = self.weight0 + self.scale * self._product(self.B, self.A, self.weight0.shape)
        if self.PA is not None:
            w = w + self.personal_scale * self._product(self.PB, self.PA, self.weight0.shape)
        return w

    def forward_with(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """The layer's output with factors ``A``, ``B`` in place of its own (same shapes):
        x ↦ base(x; W0, bias) + (α/r)·path(x; A, B). Used for nested updates (mFedLoRU)."""
        return self._base(x, self.weight0, self.bias) + self.scale * self._factor_path(x, A, B)

    def forward(self, x: Tensor) -> Tensor:
        y = self._base(x, self.weight0, self.bias)
        y = y + self.scale * self._factor_path(x, self.A, self.B)
        if self.PA is not None:
            y = y + self.personal_scale * self._factor_path(x, self.PA, self.PB)
        return y

    @torch.no_grad()
    def reinit_(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(−1/√fan_in, 1/√fan_in), B = 0 (the layer then computes W0 only)."""
        self.A.copy_(_uniform(self.A.shape, 1.0 / math.sqrt(self.fan_in), self.A, generator))
        self.B.zero_()

    @torch.no_grad()
    def merge_(self, generator: torch.Generator | None = None, *, reinit: bool = True) -> None:
        """W0 ← W0 + (α/r)·B·A, then :meth:`reinit_` — the layer's function is unchanged.

        ``reinit=False`` (the authors' ``merge()``): A and B are kept, so the layer then
        computes W0 + 2·(α/r)·B·A (the pair's contribution counted twice); no draw."""
        self.weight0.add_(self.scale * self._product(self.B, self.A, self.weight0.shape))
        if reinit:
            self.reinit_(generator)

    def _between(self, h: Tensor) -> Tensor:
        """The low-rank path's dropout on A's output (train mode, p > 0; else ``h``)."""
        if self.dropout > 0.0 and self.training:
            return F.dropout(h, self.dropout, training=True)
        return h

    @torch.no_grad()
    def add_personal_(
        self, rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        """Attach a personal pair (α_p/r_p)·PB·PA, PA like A (random), PB = 0 (pFedLoRU)."""
        if rank < 1:
            raise ValueError(f"personal rank must be >= 1, got {rank}")
        w = self.weight0
        self.personal_rank = int(rank)
        self.personal_alpha = float(alpha)
        pa = _uniform(self._a_shape(rank), 1.0 / math.sqrt(self.fan_in), w, generator)
        self.PA = nn.Parameter(pa)
        self.PB = nn.Parameter(torch.zeros(self._b_shape(rank), dtype=w.dtype, device=w.device))

    def extra_repr(self) -> str:
        s = f"rank={self.rank}, alpha={self.alpha}, out={self.out_dim}, fan_in={self.fan_in}"
        if self.personal_rank:
            s += f", personal_rank={self.personal_rank}"
        return s


class LoRALinear(_LoRABase):
    """y = x·(W0 + (α/r)·B·A)ᵀ + b with W0 (out, in) frozen, A (r, in), B (out, r), b trainable.

    Example:
        >>> layer = LoRALinear(nn.Linear(4, 3), rank=2, alpha=2.0)
        >>> torch.equal(layer.dense_weight(), layer.weight0)   # B = 0 at init
        True
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        from_scratch: bool = False,
        generator: torch.Generator | None = None,
        init: str = "dense-variance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_dim, self.fan_in = base.out_features, base.in_features
        self.in_features, self.out_features = base.in_features, base.out_features
        self.in_tail: tuple[int, ...] = (base.in_features,)
        self.b_tail: tuple[int, ...] = ()
        self._init_factors(
            base.weight, base.bias, rank, alpha, from_scratch, generator, init, dropout
        )

    def _base(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _factor_path(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return F.linear(self._between(F.linear(x, A)), B)


class LoRAConv2d(_LoRABase):
    """Conv2d with kernel W0 + (α/r)·B·A: a kh×kw conv in → r (A), then a 1×1 conv r → out (B).

    A has weight (r, in, kh, kw) and the base layer's stride, padding and dilation; B has
    weight (out, r, 1, 1). Only ``groups == 1`` and ``padding_mode == 'zeros'`` are supported.
    """

    def __init__(
        self,
        base: nn.Conv2d,
        rank: int,
        alpha: float,
        *,
        from_scratch: bool = False,
        generator: torch.Generator | None = None,
        init: str = "dense-variance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(
                f"LoRAConv2d supports groups=1 and padding_mode='zeros' only, got groups="
                f"{base.groups}, padding_mode={base.padding_mode!r}; leave this layer dense"
            )
        kh, kw = base.kernel_size
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation
        self.out_dim, self.fan_in = base.out_channels, base.in_channels * kh * kw
        self.in_tail = (base.in_channels, kh, kw)
        self.b_tail = (1, 1)
        self._init_factors(
            base.weight, base.bias, rank, alpha, from_scratch, generator, init, dropout
        )

    def _base(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _factor_path(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        h = F.conv2d(x, A, None, self.stride, self.padding, self.dilation)
        return F.conv2d(self._between(h), B)


LoRALayer = _LoRABase


def is_factorized(module: nn.Module) -> bool:
    """True for :class:`LoRALinear` / :class:`LoRAConv2d` modules."""
    return isinstance(module, _LoRABase)


def factorizable_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` and ``nn.Conv2d`` submodule, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def default_factorizable(model: nn.Module, rule: str = "inner") -> list[str]:
    """The layers factorized when none are named.

    ``rule="inner"``: every Linear/Conv2d except the first and the last in module order
    (hessrank's default: the input stem and the classifier head stay dense; empty for fewer
    than three layers). ``rule="conv"``: every Conv2d except the first (the stem), every
    Linear dense — what the FedLoRU authors' code factorizes (its ResNets' convolutions in the
    residual blocks); empty for a model without two Conv2d layers.
    """
    names = factorizable_names(model)
    if rule == "inner":
        return names[1:-1]
    if rule == "conv":
        return [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)][1:]
    raise ValueError(f"unknown factorize rule {rule!r}; choose one of {', '.join(RULES)}")


def check_factorizable(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` checked against the model's Linear/Conv2d layers: unknown or repeated names
    raise a ValueError listing the valid ones. Returns the names as a list."""
    valid = factorizable_names(model)
    names = list(names)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"cannot factorize {unknown}: not Linear/Conv2d layers of this model; valid names: "
            f"{', '.join(valid)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"factorize lists a layer more than once: {names}; name each once")
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def factorize(
    model: nn.Module,
    names: list[str] | None = None,
    rank: int = 8,
    alpha: float = 8.0,
    from_scratch: bool = False,
    generator: torch.Generator | None = None,
    *,
    rule: str = "inner",
    init: str = "dense-variance",
    dropout: float = 0.0,
) -> nn.Module:
    """Replace the named Linear/Conv2d submodules of ``model`` (in place) by LoRA layers.

    Args:
        model: dense network; modified in place and returned.
        names: module names to factorize; None means :func:`default_factorizable`.
        rank: r, the rank of B·A in every factorized layer.
        alpha: α; the update is (α/r)·B·A.
        from_scratch: W0 = 0 and both factors random (see module docstring) instead of
            W0 = dense weight, B = 0.
        generator: source of every random draw (layers initialized in ``names`` order).
        rule: which layers when ``names`` is None (:func:`default_factorizable`).
        init: the from-scratch scales, ``"dense-variance"`` or ``"kaiming"`` (module docstring).
        dropout: low-rank dropout p between A and B in train mode (module docstring).
    Returns:
        ``model``, whose listed layers are :class:`LoRALinear` / :class:`LoRAConv2d`.
    """
    default = default_factorizable(model, rule) if names is None else names
    names = check_factorizable(model, default)
    for name in names:
        base = model.get_submodule(name)
        cls = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        layer = cls(base, rank, alpha, from_scratch=from_scratch, generator=generator,
                    init=init, dropout=dropout)  # fmt: skip
        set_submodule(model, name, layer)
    return model


def factorized_layers(model: nn.Module) -> dict[str, _LoRABase]:
    """Name → LoRA layer for every factorized submodule of ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if is_factorized(m)}


@torch.no_grad()
def densify(factorized_model: nn.Module, template: nn.Module) -> nn.Module:
    """A plain dense copy of ``template`` whose weights are the effective ones of
    ``factorized_model``: W0 + (α/r)·B·A (+ personal pair) for factorized layers, every other
    parameter and buffer copied. The result has exactly ``template``'s state_dict keys.
    """
    layers = factorized_layers(factorized_model)
    source = factorized_model.state_dict()
    out = copy.deepcopy(template)
    new_state = {}
    for key in template.state_dict():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "weight":
            new_state[key] = layers[owner].dense_weight().detach().clone()
        elif key in source:
            new_state[key] = source[key].detach().clone()
        else:
            raise ValueError(
                f"template key {key!r} has no counterpart in the factorized model; the template "
                "must be the dense model the factorized one was built from"
            )
    out.load_state_dict(new_state)
    return out
