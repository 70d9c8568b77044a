"""The curvature family against dense float64 references: Hessian, GGN, Fisher (empirical and
Monte-Carlo), the residual H − G, federated stacks of every curvature, any input structure,
bit-identical reruns."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.functional import cross_entropy

import hessrank as hr
from hessrank.data.task import RegressionTask
from hessrank.linalg.stack import LinearCombination

from .conftest import build_case

RTOL = 1e-8  # float64: the same sums in another order (observed ~1e-14)
TOL = 1e-10


def _flat_fns(model, x):
    """θ flat ↦ outputs, independent of hessrank's parameter space (plain functional_call)."""
    named = dict(model.named_parameters())
    names = list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    buffers = dict(model.named_buffers())
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def outputs(flat):
        parts = torch.split(flat, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, (p, buffers), (x,))

    return theta, outputs


def dense_ggn(model, loss_fn, x, y):
    """Jᵀ (∂²ℓ/∂f²) J from the Jacobian of the outputs and the loss Hessian in the outputs."""
    theta, f = _flat_fns(model.eval(), x)
    out = f(theta).detach()
    J = jacrev(f)(theta).reshape(out.numel(), -1)
    H_out = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H_out @ J


def dense_fisher(model, loss_fn, x, y):
    """(1/n) Σ_i g_i g_iᵀ from the Jacobian of the per-sample losses."""
    theta, f = _flat_fns(model.eval(), x)

    def per_sample(flat):
        out = f(flat)
        return torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(len(y))])

    G = jacrev(per_sample)(theta)
    return G.T @ G / len(y)


def _probes(p, k=3, seed=0):
    return torch.randn(p, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = ["mlp-tanh", "cnn", "bn-eval"]


@pytest.fixture(scope="module", params=CASES)
def small(request):
    model, x, y = build_case(request.param, n=40)
    return request.param, model, x, y


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"hvp": "rev-rev", "block": "vmap"},
                                {"hvp": "graph", "cache": False},
                                {"hvp": "graph", "block": "vmap"}])
def test_hessian_routes_match_dense(small, kw):
    _, model, x, y = small
    H = hr.dense_hessian(model, cross_entropy, (x, y))
    op = hr.HessianOperator(model, cross_entropy, (x, y), **kw)
    V = _probes(op.shape[1])
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=RTOL, atol=TOL)


@pytest.mark.parametrize("block", ["loop", "vmap"])
def test_ggn_matches_dense(small, block):
    _, model, x, y = small
    G = dense_ggn(model, cross_entropy, x, y)
    op = hr.GGNOperator(model, cross_entropy, [(x[:15], y[:15]), (x[15:], y[15:])], block=block)
    V = _probes(op.shape[1])
    torch.testing.assert_close(op.matmat(V), G @ V, rtol=RTOL, atol=TOL)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD for cross-entropy


def test_fisher_empirical_and_mc_match_dense(small):
    _, model, x, y = small
    op = hr.FisherOperator(model, cross_entropy, (x, y), batch_size=16)
    V = _probes(op.shape[1])
    torch.testing.assert_close(op.matmat(V), dense_fisher(model, cross_entropy, x, y) @ V,
                               rtol=RTOL, atol=TOL)
    mc = hr.FisherOperator(model, cross_entropy, (x, y), kind="mc", seed=3)
    labels = mc.batches.targets[0]
    assert labels.shape == y.shape and labels.dtype == y.dtype
    torch.testing.assert_close(mc.matmat(V), dense_fisher(model, cross_entropy, x, labels) @ V,
                               rtol=RTOL, atol=TOL)
    again = hr.FisherOperator(model, cross_entropy, (x, y), kind="mc", seed=3)
    assert torch.equal(again.batches.targets[0], labels)  # seeded draws


def test_mc_fisher_with_squared_error_averages_to_the_ggn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(300, 3, dtype=torch.float64), torch.randn(300, 2, dtype=torch.float64)
    task = RegressionTask()
    G = dense_ggn(model, task, x, y)
    V = _probes(G.shape[0], 2)
    ops = [hr.FisherOperator(model, task, (x, y), kind="mc", seed=s) for s in range(20)]
    assert not torch.equal(ops[0].batches.targets[0], ops[1].batches.targets[0])
    mean = sum(op.matmat(V) for op in ops) / 20
    # E F = G for a Gaussian likelihood; 20 draws of 300 samples: a few % of ‖G V‖
    assert (mean - G @ V).norm() < 0.1 * (G @ V).norm()


def test_residual_is_h_minus_ggn(small):
    _, model, x, y = small
    h = hr.HessianOperator(model, cross_entropy, (x, y))
    g = hr.GGNOperator(model, cross_entropy, (x, y))
    R = LinearCombination([h, g], [1.0, -1.0])
    H = hr.dense_hessian(model, cross_entropy, (x, y))
    V = _probes(h.shape[1])[None]
    torch.testing.assert_close(R.matmat(V)[0], (H - dense_ggn(model, cross_entropy, x, y)) @ V[0],
                               rtol=RTOL, atol=TOL)


@pytest.mark.parametrize("curvature,kw", [("hessian", {}), ("ggn", {}), ("fisher", {}),
                                          ("fisher", {"kind": "mc", "seed": 1})])
@pytest.mark.parametrize("strategy", ["stacked", "per-client"])
def test_federated_slices_equal_separate_operators(curvature, kw, strategy):
    model, x, y = build_case("mlp-tanh", n=42)
    data = [(x[a:b], y[a:b]) for a, b in ((0, 7), (7, 19), (19, 42))]
    F = hr.FederatedOperator(model, cross_entropy, data, curvature, strategy=strategy,
                             batch_size=8, **kw)
    assert F.route["strategy"] == strategy and F.route["curvature"] == curvature
    J, p, _ = F.shape
    V = torch.randn(J, p, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = F.matmat(V)
    cls = hr.curvature.curvature_class(curvature)
    ops = [cls(model, cross_entropy, d, **kw) for d in data]
    for c, op in enumerate(ops):
        torch.testing.assert_close(out[c], op.matmat(V[c]), rtol=0, atol=TOL)
    server = sum(len(d[1]) / 42 * op.matmat(V[-1]) for d, op in zip(data, ops))
    torch.testing.assert_close(out[-1], server, rtol=0, atol=TOL)


@pytest.mark.parametrize("cls", [hr.HessianOperator, hr.GGNOperator, hr.FisherOperator])
def test_two_fresh_operators_are_bit_identical(cls):
    model, x, y = build_case("cnn", n=40)
    a = cls(model, cross_entropy, (x, y), batch_size=16)
    b = cls(model, cross_entropy, (x, y), batch_size=16)
    assert a.route == b.route
    for k in (1, 4):
        V = _probes(a.shape[1], k)
        assert torch.equal(a.matmat(V), b.matmat(V))


def test_route_is_recorded_and_json_serializable():
    import json

    model, x, y = build_case("mlp-tanh", n=40)
    op = hr.HessianOperator(model, cross_entropy, (x, y))
    assert set(op.route) >= {"curvature", "hvp", "block", "cache", "mode"}
    json.dumps(op.route)
    F = hr.FederatedOperator(model, cross_entropy, [(x[:20], y[:20]), (x[20:], y[20:])], "ggn")
    json.dumps(F.route)


def test_tune_returns_settings_to_pass_back():
    model, x, y = build_case("mlp-tanh", n=40)
    op = hr.HessianOperator(model, cross_entropy, (x, y))
    best = hr.tune(op, k=2, repeats=2)
    tuned = hr.HessianOperator(model, cross_entropy, (x, y), **best)
    assert {k: tuned.route[k] for k in best} == best
    V = _probes(op.shape[1], 2)
    torch.testing.assert_close(tuned.matmat(V), op.matmat(V), rtol=1e-10, atol=1e-12)


# ---- inputs of any structure -------------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, u, v):
        return self.head(torch.tanh(self.a(u) + self.b(v)))


def test_tuple_inputs_call_model_with_several_arguments():
    torch.manual_seed(0)
    model = TwoInputs().double()
    u, v = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    op = hr.HessianOperator(model, cross_entropy, ((u, v), y), batch_size=5)
    params = list(model.parameters())
    g = torch.autograd.grad(cross_entropy(model(u, v), y), params, create_graph=True)
    V = _probes(op.shape[1], 1)[:, 0]
    parts = [t.reshape(q.shape) for t, q in zip(torch.split(V, [q.numel() for q in params]),
                                                params)]
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(g, params, parts)])
    torch.testing.assert_close(op.matmat(V), ref, rtol=RTOL, atol=TOL)


class TinyAttention(nn.Module):
    """Token embedding, one self-attention layer (written out: torch 2.13 has no double
    backward for the fused CPU attention kernel) with a key padding mask, mean pooling and a
    classifier: Hugging Face's calling convention (``model(input_ids=..., attention_mask=...)``,
    outputs with ``.logits``)."""

    def __init__(self, vocab=20, d=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        h = self.norm(h + torch.softmax(scores, -1) @ v)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return Logits(self.head((h * m).sum(1) / m.sum(1)))


class Logits(dict):
    """A dict output with attribute access, like transformers' ModelOutput."""

    def __init__(self, logits):
        super().__init__(logits=logits)

    @property
    def logits(self):
        return self["logits"]


torch.utils._pytree.register_pytree_node(
    Logits, lambda o: ([o["logits"]], None), lambda xs, _: Logits(xs[0]))


def tiny_bert():
    """A Hugging Face BertForSequenceClassification built from a config (no download) when
    transformers imports; otherwise the equivalent TinyAttention."""
    torch.manual_seed(0)
    try:
        import transformers

        # pad_token_id=None: BERT's default 0 builds Embedding(padding_idx=0), whose
        # reverse-mode gradient drops row 0 while forward mode (the GGN's jvp) keeps it
        config = transformers.BertConfig(
            vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=12, num_labels=3,
            attn_implementation="eager", pad_token_id=None)
        model = transformers.BertForSequenceClassification(config)
    except Exception:  # noqa: BLE001 - e.g. a torchvision that does not match the CPU torch
        model = TinyAttention()
    model = model.double().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (10, 6), generator=gen)
    mask = torch.ones(10, 6, dtype=torch.long)
    mask[::3, 4:] = 0  # some padded sequences
    y = torch.randint(0, 3, (10,), generator=gen)
    return model, {"input_ids": ids, "attention_mask": mask}, y


def _logit_ce(out, y):
    return cross_entropy(out.logits, y)


def test_dict_inputs_attention_model():
    """The task reads ``.logits`` of a Hugging Face style output (the reference takes them by
    hand)."""
    model, x, y = tiny_bert()
    op = hr.HessianOperator(model, cross_entropy, (x, y), batch_size=4)
    assert op.num_samples == 10 and len(op.batches) == 3
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.autograd.grad(_logit_ce(model(**x), y), params, create_graph=True)
    V = _probes(op.shape[1], 1)[:, 0]
    parts = [t.reshape(q.shape) for t, q in zip(torch.split(V, [q.numel() for q in params]),
                                                params)]
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(g, params, parts)])
    torch.testing.assert_close(op.matmat(V), ref, rtol=RTOL, atol=TOL)
    # streamed over micro-batches of dict inputs: the same operator
    micro = hr.HessianOperator(model, cross_entropy, (x, y), batch_size=4, micro_batch_size=3)
    assert micro.route["micro_batch"] == 3
    torch.testing.assert_close(micro.matmat(V), ref, rtol=RTOL, atol=TOL)
    # GGN on the logits: Jᵀ H_out J from the Jacobian of the logits
    ggn = hr.GGNOperator(model, cross_entropy, (x, y))
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]

    def logits(flat):
        p = {n: t.reshape(named[n].shape) for n, t in zip(names, torch.split(flat, sizes))}
        return functional_call(model, p, (), x).logits

    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    out = logits(theta).detach()
    J = jacrev(logits)(theta).reshape(out.numel(), -1)
    H_out = hessian(lambda o: cross_entropy(o, y))(out).reshape(out.numel(), out.numel())
    torch.testing.assert_close(ggn.matmat(V), J.T @ (H_out @ (J @ V)), rtol=RTOL, atol=TOL)


def test_dict_inputs_federated_equals_separate():
    model, x, y = tiny_bert()
    data = [({k: t[a:b] for k, t in x.items()}, y[a:b]) for a, b in ((0, 3), (3, 10))]
    F = hr.FederatedOperator(model, cross_entropy, data, "hessian")
    J, p, _ = F.shape
    V = torch.randn(J, p, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = F.matmat(V)
    for c, d in enumerate(data):
        torch.testing.assert_close(out[c], hr.HessianOperator(model, cross_entropy, d).matmat(V[c]),
                                   rtol=0, atol=TOL)


# ---- streaming uncached products over micro-batches ---------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_micro_batches_give_the_dense_operator(small, curvature):
    """Uneven micro-batches (40 samples in 3 batches of ≤ 16, streamed 7 at a time) are the
    same operator: C_b = Σ_c (n_c/n_b) C_c."""
    _, model, x, y = small
    dense = {"hessian": lambda: hr.dense_hessian(model, cross_entropy, (x, y)),
             "ggn": lambda: dense_ggn(model, cross_entropy, x, y),
             "fisher": lambda: dense_fisher(model, cross_entropy, x, y)}[curvature]()
    cls = {"hessian": hr.HessianOperator, "ggn": hr.GGNOperator,
           "fisher": hr.FisherOperator}[curvature]
    op = cls(model, cross_entropy, (x, y), batch_size=16, micro_batch_size=7)
    assert op.route["cache"] is False and op.route["micro_batch"] == 7
    V = _probes(op.shape[1])
    torch.testing.assert_close(op.matmat(V), dense @ V, rtol=RTOL, atol=TOL)


def test_micro_batches_follow_the_memory_rule():
    """"auto" streams only when the linearizations exceed the budget: half the largest batch,
    halved until one micro-batch's linearization fits; never with BatchNorm in train mode."""
    model, x, y = build_case("cnn", n=40)
    fits = hr.HessianOperator(model, cross_entropy, (x, y))
    assert fits.route["cache"] is True and fits.route["micro_batch"] is None
    scratch = hr.HessianOperator(model, cross_entropy, (x, y), cache=False)
    assert scratch.route["micro_batch"] is None  # uncached by request, within the budget
    est = fits.estimated_cache_mb()
    half = hr.HessianOperator(model, cross_entropy, (x, y), cache_budget_mb=0.9 * est)
    assert half.route["cache"] is False and half.route["micro_batch"] == 20
    tight = hr.HessianOperator(model, cross_entropy, (x, y),
                               cache_budget_mb=fits.estimated_cache_mb(10, batches=1))
    assert tight.route["micro_batch"] == 10
    V = _probes(fits.shape[1])
    torch.testing.assert_close(tight.matmat(V), fits.matmat(V), rtol=1e-10, atol=1e-12)
    # derived operators apply the rule to their own data
    assert half.with_data((torch.cat([x, x]), torch.cat([y, y]))).route["micro_batch"] == 20
    assert half.with_data((x[:8], y[:8])).route["micro_batch"] is None
    bn, xb, yb = build_case("bn-eval", n=40)
    train = hr.HessianOperator(bn, cross_entropy, (xb, yb), mode="train", cache_budget_mb=1e-6)
    assert train.route["cache"] is False and train.route["micro_batch"] is None
    with pytest.raises(ValueError, match="BatchNorm"):
        hr.HessianOperator(bn, cross_entropy, (xb, yb), mode="train", micro_batch_size=8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "half"])
def test_micro_batch_size_is_validated(bad):
    model, x, y = build_case("mlp-tanh", n=12)
    with pytest.raises(ValueError, match="micro_batch_size"):
        hr.HessianOperator(model, cross_entropy, (x, y), micro_batch_size=bad)


def test_micro_batches_with_cache_true_are_refused():
    model, x, y = build_case("mlp-tanh", n=12)
    with pytest.raises(ValueError, match="cache=True"):
        hr.HessianOperator(model, cross_entropy, (x, y), cache=True, micro_batch_size=4)
