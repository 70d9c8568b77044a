"""Small reference networks for the experiments: MLP, CNN, CIFAR-style ResNet-8/18, linear map.

Module names are part of the checkpoint format (state_dict keys) and of per-layer parameter
selection, so they are fixed here: ``fc1, fc2, ..., out`` for the MLP, ``conv1, conv2, fc1,
out`` for the CNN, ``stem.conv, stem.bn, stage1.0.conv1, ..., fc`` for the ResNets and ``fc``
for the linear model. Construction draws from torch's global RNG only, so
``torch.manual_seed(s)`` before building fixes the initial weights.

Example:
    >>> _ = torch.manual_seed(0)
    >>> model = FAMILIES["cnn"]((1, 8, 8), 10)
    >>> model(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FAMILIES", "BasicBlock", "ResNet"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; valid activations: {', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]()


def _image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {model!r} needs image inputs of shape (C, H, W), got {tuple(input_shape)}; "
            "use 'mlp' or 'linear' for vector data"
        )
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def _mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
) -> nn.Sequential:
    """flatten → [Linear(→h) → act] for h in ``hidden`` → Linear(→ num_outputs).

    Names: ``flatten, fc1, act1, fc2, act2, ..., out``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = math.prod(input_shape)
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, int(h))
        layers[f"act{i}"] = _activation(activation)
        width = int(h)
    layers["out"] = nn.Linear(width, num_outputs)
    return nn.Sequential(layers)


def _cnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    activation: str = "relu",
) -> nn.Sequential:
    """[conv3×3(pad 1) → act → maxpool2×2] per entry of ``channels`` → flatten → Linear(→hidden)
    → act → Linear(→ num_outputs).

    A pooling layer whose input is smaller than 2×2 is an ``nn.Identity`` (same name), so 8×8
    inputs work with any number of conv blocks. Names: ``conv1, act1, pool1, ..., flatten,
    fc1, act_fc, out``.
    """
    c, h, w = _image_shape("cnn", input_shape)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, ch in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, int(ch), kernel_size=3, padding=1)
        layers[f"act{i}"] = _activation(activation)
        layers[f"pool{i}"] = nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity()
        c = int(ch)
        h, w = (h // 2, w // 2) if min(h, w) >= 2 else (h, w)
    layers["flatten"] = nn.Flatten()
    features = nn.Sequential(layers)
    with torch.no_grad():
        flat = features(torch.zeros(1, *input_shape)).shape[1]
    layers["fc1"] = nn.Linear(flat, hidden)
    layers["act_fc"] = _activation(activation)
    layers["out"] = nn.Linear(hidden, num_outputs)
    return nn.Sequential(layers)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    conv1 is 3×3 with ``stride``, conv2 is 3×3; the shortcut is the identity, or a 1×1 conv with
    ``stride`` plus BatchNorm (``shortcut.0``, ``shortcut.1``) when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (n, in_channels, H, W) → (n, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem conv + BN + ReLU, stages of :class:`BasicBlock`, global
    average pool, Linear.

    Stage s (1-based) has width ``widths[s-1]`` and ``blocks[s-1]`` blocks; its first block has
    stride 1 for s = 1 and 2 after. Spatial sizes shrink as ⌈H/2⌉, so 8×8 inputs reach 1×1 and
    still work. Names: ``stem.conv, stem.bn, stage1.0.conv1, ..., fc``.
    """

    def __init__(
        self, in_channels: int, num_outputs: int, widths: Sequence[int], blocks: Sequence[int]
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"ResNet needs one block count per stage width, got widths={list(widths)} and "
                f"blocks={list(blocks)}; pass lists of the same non-zero length"
            )
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(widths[0]),
                relu=nn.ReLU(),
            )
        )
        self.num_stages = len(widths)
        c = widths[0]
        for s, (width, count) in enumerate(zip(widths, blocks), start=1):
            stage = [BasicBlock(c, width, stride=1 if s == 1 else 2)]
            stage += [BasicBlock(width, width) for _ in range(count - 1)]
            self.add_module(f"stage{s}", nn.Sequential(*stage))
            c = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """x: (n, C, H, W) → logits (n, num_outputs)."""
        out = self.stem(x)
        for s in range(1, self.num_stages + 1):
            out = getattr(self, f"stage{s}")(out)
        return self.fc(self.flatten(self.pool(out)))


def _resnet8(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 16) -> ResNet:
    """ResNet-8: 3 stages of 1 block, widths w, 2w, 4w."""
    c, _, _ = _image_shape("resnet8", input_shape)
    return ResNet(c, num_outputs, [width, 2 * width, 4 * width], [1, 1, 1])


def _resnet18(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 16) -> ResNet:
    """ResNet-18: 4 stages of 2 blocks, widths w, 2w, 4w, 8w."""
    c, _, _ = _image_shape("resnet18", input_shape)
    return ResNet(c, num_outputs, [width, 2 * width, 4 * width, 8 * width], [2, 2, 2, 2])


def _linear(input_shape: tuple[int, ...], num_outputs: int, *, bias: bool = False) -> nn.Sequential:
    """flatten → ``fc`` = Linear(d_in → num_outputs), no bias by default: f(x) = W x."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc=nn.Linear(math.prod(input_shape), num_outputs, bias=bias),
        )
    )


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet8": _resnet8,
    "resnet18": _resnet18,
    "linear": _linear,
}
"""The built-in families: name → builder(input_shape, num_outputs, **options); the registry
(:mod:`hessrank.models.registry`) reads them from here."""
