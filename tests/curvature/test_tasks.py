"""Tasks in the curvature operators: dict inputs, (n, T, V) next-token logits, Hugging Face
style outputs, scaled-dot-product attention, models that compute their own loss — against
dense float64 references on a small hand-written attention model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import hessrank as hr
from hessrank.curvature.kinks import FirstOrderKinks
from hessrank.data.task import NextTokenTask

from .conftest import build_case

RTOL, TOL = 1e-8, 1e-10
VOCAB, D, T, N = 7, 6, 5, 6


class Logits(dict):
    """A dict output with attribute access, like transformers' ModelOutput."""

    def __init__(self, logits):
        super().__init__(logits=logits)

    @property
    def logits(self):
        return self["logits"]


torch.utils._pytree.register_pytree_node(
    Logits, lambda o: ([o["logits"]], None), lambda xs, _: Logits(xs[0]))


class TinyLM(nn.Module):
    """Embedding, one causal self-attention layer with a key padding mask (written out with an
    explicit softmax, or torch's SDPA), a norm and a vocabulary head; Hugging Face's calling
    convention: ``model(input_ids=..., attention_mask=...)`` → output with ``.logits``."""

    def __init__(self, sdpa: bool = False, own_loss: bool = False):
        super().__init__()
        self.sdpa, self.own_loss = sdpa, own_loss
        self.embed, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(T, D)
        self.qkv, self.norm, self.head = nn.Linear(D, 3 * D), nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        keep = torch.ones(T, T, dtype=torch.bool).tril() & (attention_mask[:, None, :] > 0)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            scores = (q @ k.transpose(1, 2) / math.sqrt(D)).masked_fill(~keep, float("-inf"))
            a = torch.softmax(scores, -1) @ v
        logits = self.head(self.norm(h + a))
        if self.own_loss:  # a model that computes its own loss from labels in its inputs
            return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return Logits(logits)


def lm_case(sdpa: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM(sdpa).double().eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N, T), generator=gen)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 4:] = 0  # padded sequences: their padded positions are not targets
    y = torch.randint(0, VOCAB, (N, T), generator=gen)
    y[mask == 0] = -100
    return model, {"input_ids": ids, "attention_mask": mask}, y


def flat_logits(model, x):
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def logits(flat):
        p = {n: t.reshape(named[n].shape) for n, t in zip(names, torch.split(flat, sizes))}
        return functional_call(model, p, (), x).logits

    return theta, logits


def dense_ggn(model, task, x, y):
    theta, f = flat_logits(model, x)
    out = f(theta).detach()
    J = jacrev(f)(theta).reshape(out.numel(), -1)
    H_out = hessian(lambda o: task(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H_out @ J


def dense_fisher(model, task, x, y):
    theta, f = flat_logits(model, x)
    G = jacrev(lambda t: task.sample_losses(f(t), y))(theta)
    return G.T @ G / y.shape[0]


def probes(p, k=3, seed=0):
    return torch.randn(p, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def lm():
    return lm_case()


def test_ggn_with_dict_inputs_and_sequence_logits(lm):
    model, x, y = lm
    task = NextTokenTask()
    op = hr.GGNOperator(model, task, (x, y), batch_size=4)
    V = probes(op.shape[1])
    G = dense_ggn(model, task, x, y)
    torch.testing.assert_close(op.matmat(V), G @ V, rtol=RTOL, atol=TOL)
    assert torch.linalg.eigvalsh(G).min() > -1e-10


def test_empirical_and_mc_fisher_on_sequence_logits(lm):
    model, x, y = lm
    task = NextTokenTask()
    op = hr.FisherOperator(model, task, (x, y))
    V = probes(op.shape[1])
    torch.testing.assert_close(op.matmat(V), dense_fisher(model, task, x, y) @ V,
                               rtol=RTOL, atol=TOL)
    mc = hr.FisherOperator(model, task, (x, y), kind="mc", seed=2)
    drawn = mc.batches.targets[0]
    assert drawn.shape == y.shape and torch.equal(drawn == -100, y == -100)
    assert not torch.equal(drawn, y)
    torch.testing.assert_close(mc.matmat(V), dense_fisher(model, task, x, drawn) @ V,
                               rtol=RTOL, atol=TOL)


def test_mc_fisher_needs_a_task_not_a_plain_loss(lm):
    model, x, y = lm
    with pytest.raises(ValueError, match="Monte-Carlo Fisher needs a task"):
        hr.FisherOperator(model, lambda out, t: NextTokenTask()(out, t), (x, y), kind="mc")


def test_hessian_micro_batches_of_sequences(lm):
    model, x, y = lm
    task = NextTokenTask()
    H = hr.dense_hessian(model, task, (x, y))
    op = hr.HessianOperator(model, task, (x, y), micro_batch_size=4)
    assert op.route["micro_batch"] == 4
    V = probes(op.shape[1])
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=RTOL, atol=TOL)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_stacked_federated_with_next_token_targets(lm, curvature):
    """Clients of 2 and 4 sequences cut into padded units (integer inputs: the unit scales
    follow the model's float64, not torch's default float32)."""
    model, x, y = lm
    task = NextTokenTask()
    data = [({k: t[a:b] for k, t in x.items()}, y[a:b]) for a, b in ((0, 2), (2, 6))]
    Fed = hr.FederatedOperator(model, task, data, curvature, strategy="stacked", batch_size=3)
    assert Fed.route["strategy"] == "stacked"
    J, p, _ = Fed.shape
    V = torch.randn(J, p, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = Fed.matmat(V)
    cls = hr.curvature.curvature_class(curvature)
    for c, d in enumerate(data):
        torch.testing.assert_close(out[c], cls(model, task, d).matmat(V[c]), rtol=RTOL, atol=TOL)
    torch.testing.assert_close(out[-1], cls(model, task, (x, y)).matmat(V[-1]),
                               rtol=RTOL, atol=TOL)


def test_sdpa_model_hessian_equals_dense_on_the_math_kernel():
    model, x, y = lm_case(sdpa=True)
    task = NextTokenTask()
    op = hr.HessianOperator(model, task, (x, y))
    assert op.route["attention"] == "math"
    V = probes(op.shape[1])
    H = hr.dense_hessian(model, task, (x, y))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=RTOL, atol=TOL)
    ggn = hr.GGNOperator(model, task, (x, y))  # forward-mode products: the math kernel too
    torch.testing.assert_close(ggn.matmat(V), dense_ggn(model, task, x, y) @ V,
                               rtol=RTOL, atol=TOL)
    explicit, *_ = lm_case(sdpa=False)
    assert "attention" not in hr.HessianOperator(explicit, task, (x, y)).route


def test_a_forced_attention_kernel_without_second_derivatives_is_one_line():
    model, x, y = lm_case(sdpa=True)
    op = hr.HessianOperator(model, NextTokenTask(), (x, y), sdpa="flash",
                            check_determinism=False)
    with pytest.raises(ValueError, match="sdpa='flash'.*use sdpa='math'") as err:
        op.matmat(probes(op.shape[1], 1))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="sdpa must be one of"):
        hr.HessianOperator(model, NextTokenTask(), (x, y), sdpa="fast")


@pytest.mark.parametrize("cls", [hr.HessianOperator, hr.GGNOperator, hr.FisherOperator])
def test_a_model_that_computes_its_own_loss_is_refused(cls):
    """Never a silent zero GGN: labels in the inputs, or a scalar output, is one line."""
    model, x, y = lm_case()
    with pytest.raises(ValueError, match="inputs carry 'labels'"):
        cls(model, NextTokenTask(), ({**x, "labels": y}, y))
    own = TinyLM(own_loss=True).double()
    own.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="computed its own loss") as err:
        cls(own, NextTokenTask(), ((x["input_ids"], x["attention_mask"], y), y))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["mlp-relu", "cnn"])
def test_first_order_kinks_keep_the_bits(name):
    """The kept graph built with ReLU (and pooling) whose backward reads detached
    activations gives bit-identical products (the zero terms it drops add exactly 0)."""
    model, x, y = build_case(name, n=40)
    if name == "cnn":  # add max pooling to the conv net
        model = nn.Sequential(model[0], nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 4)).double().eval()
    params = list(model.parameters())
    V = [torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
         for q in params]

    def product(kinks: bool):
        leaves = [q.detach().requires_grad_(True) for q in params]
        names = [n for n, _ in model.named_parameters()]
        with torch.enable_grad():
            if kinks:
                with FirstOrderKinks():
                    loss = F.cross_entropy(functional_call(model, dict(zip(names, leaves)), x), y)
            else:
                loss = F.cross_entropy(functional_call(model, dict(zip(names, leaves)), x), y)
            g = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(g, leaves, V)

    for a, b in zip(product(False), product(True)):
        assert torch.equal(a, b)
    op = hr.HessianOperator(model, F.cross_entropy, (x, y))
    assert op.route["hvp"] == "graph"
    flat = torch.cat([t.reshape(-1) for t in V])
    assert torch.equal(op.matmat(flat), torch.cat([t.reshape(-1) for t in product(False)]))
