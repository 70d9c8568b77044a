"""Models and data shared by the route, KFAC and before/after benchmarks.

``setting(key, dtype)`` returns (label, model in eval mode, inputs, targets, task) for:

- ``mlp``: digits MLP 64-256-256-10, batch 512 (as ``bench_hvp.py``);
- ``cnn``: digits CNN conv16-conv32-fc, batch 256 (as ``bench_hvp.py``);
- ``resnet``: CIFAR-shaped ResNet-18 of width 8, random inputs, batch 32;
- ``transformer``: a two-layer character-level decoder written out by hand (attention with an
  explicit softmax and a causal mask), d = 64, 4 heads, vocabulary 65, sequences of 32
  tokens, batch 32, next-token targets (n, T) and (n, T, V) logits;
- ``transformer-sdpa``: the same decoder with ``F.scaled_dot_product_attention`` (torch's
  fused kernel, which the operators run under the math backend).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hessrank.data.task import ClassificationTask, NextTokenTask
from hessrank.models import build_model

SETTINGS = ("mlp", "cnn", "resnet", "transformer")
LABELS = {"mlp": "MLP 64-256-256-10 (batch 512)", "cnn": "CNN conv16-conv32-fc (batch 256)",
          "resnet": "ResNet-18 width 8 (batch 32)",
          "transformer": "tiny transformer 2×d64, T=32 (batch 32)",
          "transformer-sdpa": "tiny transformer with SDPA (batch 32)"}


def digits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data / 16.0, dtype=dtype), torch.as_tensor(d.target)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        n, T, d = h.shape
        q, k, v = (t.reshape(n, T, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            a = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        return self.proj(a.transpose(1, 2).reshape(n, T, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyDecoder(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and a vocabulary head:
    (n, T) token ids → (n, T, V) logits."""

    def __init__(self, vocab: int = 65, d: int = 64, heads: int = 4, layers: int = 2,
                 seq: int = 32, sdpa: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, sdpa) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


def setting(key: str, dtype: torch.dtype = torch.float32):
    """(label, model in eval mode, inputs, targets, task), seeded, in ``dtype``."""
    torch.manual_seed(0)
    ce = ClassificationTask()
    if key in ("mlp", "cnn"):
        x, y = digits(dtype)
        if key == "mlp":
            model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                  nn.Linear(256, 10))
            n = 512
        else:
            model = nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)),
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 2 * 2, 10))
            n = 256
        return LABELS[key], model.to(dtype).eval(), x[:n], y[:n], ce
    if key == "resnet":
        model = build_model("resnet18", (3, 32, 32), 10, width=8)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(32, 3, 32, 32, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (32,), generator=gen)
        return LABELS[key], model.to(dtype).eval(), x, y, ce
    if key in ("transformer", "transformer-sdpa"):
        model = TinyDecoder(sdpa=key.endswith("sdpa"))
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 65, (32, 33), generator=gen)
        return LABELS[key], model.to(dtype).eval(), ids[:, :-1], ids[:, 1:], NextTokenTask()
    raise ValueError(f"unknown setting {key!r}; choose from {', '.join(LABELS)}")
