"""Issue 23's ordinary options: gradient clipping (every algorithm), low-rank dropout, the
factor initialization, FedLoRU's merge mode and the conv-only factorization rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hessrank.data.task import ClassificationTask
from hessrank.fl import train
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedlora import lora_factorize
from hessrank.fl.fedlrt import _clipped
from hessrank.fl.layers import LoRAConv2d, LoRALinear, default_factorizable, factorized_layers
from hessrank.fl.local import batch_indices, local_sgd
from hessrank.fl.loop import Federation
from hessrank.fl.protocol import ClientData
from hessrank.fl.rundir import read_checkpoint

from .test_runner import tiny

DT = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(),
                         nn.Linear(9, 3)).to(DT)  # fmt: skip


def _data(n: int = 40, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(0, torch.randn(n, 6, generator=g, dtype=DT) * 3,
                      torch.randint(0, 3, (n,), generator=g))  # fmt: skip


# ---- clipping -----------------------------------------------------------------------------------
def test_clipped_local_sgd_is_torch_sgd_after_clip_grad_norm():
    """g <- clip(grad) + wd theta, momentum: torch.optim.SGD after clip_grad_norm_ (float64)."""
    model, data, task = _mlp(), _data(), ClassificationTask()
    ref = copy.deepcopy(model)
    kw = dict(lr=0.3, batch_size=8, epochs=2, momentum=0.9, weight_decay=1e-4)
    result = local_sgd(model, list(model.parameters()), data, task, max_grad_norm=0.1,
                       generator=torch.Generator().manual_seed(5), **kw)  # fmt: skip
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
    clipped = 0
    for idx in batch_indices(data.size, 8, epochs=2, steps=0,
                             generator=torch.Generator().manual_seed(5)):  # fmt: skip
        opt.zero_grad()
        task(ref(data.inputs[idx]), data.targets[idx]).backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)) > 0.1
        opt.step()
    assert clipped == result.num_steps  # the bound binds on every step here
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fedlrt_clipping_is_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    grads = (torch.randn(3, 4, generator=g, dtype=DT), None, torch.randn(5, generator=g, dtype=DT))
    params = [nn.Parameter(torch.zeros_like(t)) for t in grads if t is not None]
    for p, t in zip(params, [t for t in grads if t is not None]):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    out = [t for t in _clipped(grads, 0.5) if t is not None]
    assert _clipped(grads, 0.5)[1] is None
    for p, t in zip(params, out):
        torch.testing.assert_close(t, p.grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize("algo", ["fedavg", "fedprox", "fedloru", "fedlrt", "scaffold",
                                  "mfedloru", "pfedloru"])  # fmt: skip
def test_every_algorithm_clips(tmp_path, algo):
    """A clipping bound changes the weights of every algorithm (it is read), off changes none."""
    base = train(tiny(algo=algo, rounds=1, lr=0.5), tmp_path / "a", progress=False)
    clip = train(tiny(algo=algo, rounds=1, lr=0.5, max_grad_norm=0.01), tmp_path / "b",
                 progress=False)  # fmt: skip
    a, b = read_checkpoint(base.checkpoint_path(1))[0], read_checkpoint(clip.checkpoint_path(1))[0]
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    a0, b0 = base.metrics()["train_loss"].iloc[0], clip.metrics()["train_loss"].iloc[0]
    assert a0 == b0  # same start


# ---- low-rank dropout ---------------------------------------------------------------------------
def _fedloru(**kw) -> Federation:
    cfg = TrainConfig(algo="fedloru", clients=1, rank=3, lora_alpha=3.0, batch_size=8, lr=0.2,
                      **kw)  # fmt: skip
    return Federation.build(_mlp(), cfg, ClassificationTask())


def _round(fed: Federation) -> dict[str, torch.Tensor]:
    fed.round(1, [_data()], lr=0.2, rng=torch.Generator().manual_seed(3))
    return {k: v.clone() for k, v in fed.strategy.state_tensors().items()}


def test_lowrank_dropout_is_seeded_by_the_round_and_leaves_the_global_rng():
    feds = [_fedloru(lowrank_dropout=0.3), _fedloru(lowrank_dropout=0.3)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = _round(feds[0]), _round(feds[1])
    assert torch.equal(torch.get_rng_state(), before)  # masks came from a forked RNG
    assert all(torch.equal(a[k], b[k]) for k in a)  # same round generator, same masks
    off = _round(_fedloru())
    assert any(not torch.equal(a[k], off[k]) for k in a)


@pytest.mark.parametrize("cls,base,x", [
    (LoRALinear, nn.Linear(5, 4), torch.randn(7, 5)),
    (LoRAConv2d, nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 6, 6)),
])  # fmt: skip
def test_dropout_sits_between_the_factors_in_train_mode_only(cls, base, x):
    g = torch.Generator().manual_seed(0)
    layer = cls(base, 2, 2.0, from_scratch=True, generator=g, dropout=0.5)
    no_drop = copy.deepcopy(layer)
    no_drop.dropout = 0.0
    layer.eval()
    assert torch.equal(layer(x), no_drop(x))  # eval mode: no dropout
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same mask by hand: x -> A -> dropout -> B
    a_out = (nn.functional.linear(x, layer.A) if cls is LoRALinear else
             nn.functional.conv2d(x, layer.A, None, layer.stride, layer.padding))
    mask = nn.functional.dropout(torch.ones_like(a_out), 0.5, training=True)
    path = a_out * mask
    path = (nn.functional.linear(path, layer.B) if cls is LoRALinear
            else nn.functional.conv2d(path, layer.B))  # fmt: skip
    expected = layer._base(x, layer.weight0, layer.bias) + layer.scale * path
    torch.testing.assert_close(y, expected)


# ---- factor initialization ----------------------------------------------------------------------
@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (8, 2.0)])
def test_kaiming_init_is_the_authors_scale(rank, alpha):
    base = nn.Conv2d(6, 5, 3, padding=1)
    k = LoRAConv2d(base, rank, alpha, from_scratch=True, generator=torch.Generator().manual_seed(1),
                   init="kaiming")  # fmt: skip
    d = LoRAConv2d(base, rank, alpha, from_scratch=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(k.weight0, torch.zeros_like(k.weight0)) and not k.bias.any()
    assert torch.equal(d.bias, base.bias)  # hessrank's init keeps the dense bias
    assert torch.equal(k.A, d.A)  # A: kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)) in both
    assert float(k.A.detach().abs().max()) <= 1 / math.sqrt(6 * 9)
    assert float(k.B.detach().abs().max()) <= 1 / math.sqrt(rank)  # B's fan-in is r
    # the same uniform draws, scaled: B_dense-variance / B_kaiming = sqrt(3r)/alpha * sqrt(r)
    torch.testing.assert_close(d.B, k.B * math.sqrt(3 * rank) / alpha * math.sqrt(rank))
    # torch's own kaiming_uniform_(a=sqrt 5) bound for B's shape
    fan_in = nn.init._calculate_fan_in_and_fan_out(k.B)[0]
    assert fan_in == rank


def test_lora_init_reaches_the_layers_through_the_config():
    cfg = TrainConfig(algo="fedlora", rank=3, lora_alpha=3.0, lora_init="kaiming")
    model = _mlp()
    lora_factorize(model, cfg)
    layer = factorized_layers(model)["2"]
    assert float(layer.B.detach().abs().max()) <= 1 / math.sqrt(3) and not layer.bias.any()


# ---- merge mode ---------------------------------------------------------------------------------
def test_accumulate_merge_keeps_the_factors_and_draws_nothing():
    layer = LoRALinear(nn.Linear(5, 4), 2, 2.0, from_scratch=True,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    w0, a, b = layer.weight0.clone(), layer.A.clone(), layer.B.clone()
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    layer.merge_(g, reinit=False)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(layer.A, a) and torch.equal(layer.B, b)
    torch.testing.assert_close(layer.weight0, w0 + layer.scale * b @ a)
    torch.testing.assert_close(layer.dense_weight(), w0 + 2 * layer.scale * b @ a)


def test_fedloru_merge_mode_accumulate():
    fed = _fedloru(merge_every=1, merge_mode="accumulate")
    layer = factorized_layers(fed.strategy.model)["2"]
    fed.round(1, [_data()], lr=0.2, rng=torch.Generator().manual_seed(3))
    assert layer.B.abs().sum() > 0  # kept (reinit sets B = 0)
    ref = _fedloru(merge_every=1)
    ref.round(1, [_data()], lr=0.2, rng=torch.Generator().manual_seed(3))
    ref_layer = factorized_layers(ref.strategy.model)["2"]
    assert not ref_layer.B.any()
    torch.testing.assert_close(layer.weight0, ref_layer.weight0)  # the same W0 after the merge
    assert "A and B kept" in fed.strategy.notes()["merge"]


# ---- conv-only factorization --------------------------------------------------------------------
def test_conv_rule_factorizes_every_conv_but_the_stem():
    from hessrank.models import build_model

    cnn = build_model("cnn", (1, 8, 8), 10, channels=[4, 6, 8])
    assert default_factorizable(cnn, "conv") == ["conv2", "conv3"]
    assert default_factorizable(cnn, "inner") == ["conv2", "conv3", "fc1"]
    resnet = build_model("resnet8", (3, 8, 8), 10)
    convs = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert default_factorizable(resnet, "conv") == convs[1:]
    with pytest.raises(ValueError, match="factorize_rule 'conv' finds none in model 'mlp'"):
        lora_factorize(_mlp(), TrainConfig(algo="fedloru", factorize_rule="conv"))
