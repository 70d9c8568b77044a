"""Small float64 models with their data, trained briefly so their Hessians look like real ones
(a few class-driven outliers above a bulk), for exactness tests against torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

NUM_CLASSES = 4


def clustered_data(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, one mean per class, float64 inputs of ``shape`` per sample."""
    gen = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    means = 2.0 * torch.randn(NUM_CLASSES, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = means[y] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x.reshape(n, *shape), y


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def mlp(activation: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(10, 16), activation(), nn.Linear(16, 16), activation(),
        nn.Linear(16, NUM_CLASSES),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, NUM_CLASSES),
    )


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES)
    )


MODELS = {
    "mlp-tanh": (lambda: mlp(nn.Tanh), (10,)),
    "mlp-relu": (lambda: mlp(nn.ReLU), (10,)),
    "cnn": (cnn, (1, 6, 6)),
    "bn-eval": (bn_net, (10,)),
}


def build_case(name: str, n: int = 96, seed: int = 0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().double()
    x, y = clustered_data(n, shape, seed)
    train_briefly(model, x, y)
    return model, x, y


@pytest.fixture(scope="session", params=sorted(MODELS))
def case(request):
    """(name, model, x, y) for each small model, trained briefly, in eval mode."""
    model, x, y = build_case(request.param)
    return request.param, model, x, y
