"""K-FAC against references computed independently from its definition: the exact GGN where
K-FAC is exact (one sample; the bias blocks, whose GGN is G itself), brute-force per-location
factors for a convolution, the exact spectrum against a dense eigendecomposition, the
federated composition (server = combined factors = pooled data)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev
from torch.nn.functional import cross_entropy

import hessrank as hr
from hessrank.data.task import NextTokenTask

from .conftest import build_case
from .test_family import dense_ggn

TOL = 1e-10


def dense(op) -> torch.Tensor:
    p = op.shape[1]
    return op.matmat(torch.eye(p, dtype=torch.float64))


def block_mask(op) -> torch.Tensor:
    s, p = op.space, op.shape[1]
    mask = torch.zeros(p, p, dtype=torch.bool)
    for bl in op.blocks:
        idx = [s.names.index(n) for n in (bl.weight, bl.bias) if n]
        a, b = s.offsets[min(idx)], s.offsets[max(idx) + 1]
        mask[a:b, a:b] = True
    return mask


@pytest.fixture(scope="module")
def mlp():
    return build_case("mlp-tanh", n=40)


def test_one_sample_kfac_is_the_block_diagonal_ggn(mlp):
    """With one sample and no weight sharing every GGN block is a Kronecker product."""
    model, x, y = mlp
    op = hr.KFACOperator(model, cross_entropy, (x[:1], y[:1]))
    G = dense_ggn(model, cross_entropy, x[:1], y[:1])
    torch.testing.assert_close(dense(op), G * block_mask(op), rtol=0, atol=TOL)


def test_factors_match_their_definition(mlp):
    """G_l is the GGN block of the layer's bias (∂s/∂b = I); A_l the mean of (a, 1)(a, 1)ᵀ
    over the layer's inputs; unequal batches give the factors of one batch."""
    model, x, y = mlp
    op = hr.KFACOperator(model, cross_entropy, [(x[:7], y[:7]), (x[7:], y[7:])])
    assert op.route == {"curvature": "kfac", "kind": "ggn", "mode": "eval", "layers": 3}
    G = dense_ggn(model, cross_entropy, x, y)
    s = op.space
    acts = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=n: acts.__setitem__(name, i[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model(x)
    for h in hooks:
        h.remove()
    for bl in op.blocks:
        i = s.names.index(bl.bias)
        a, b = s.offsets[i], s.offsets[i + 1]
        torch.testing.assert_close(bl.G, G[a:b, a:b], rtol=0, atol=TOL)
        ext = torch.cat([acts[bl.module], torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        torch.testing.assert_close(bl.A, ext.T @ ext / len(x), rtol=0, atol=TOL)


def test_conv_factors_expand_over_locations():
    """Conv2d: A = mean over (sample, location) of patch rows, G = Σ over (sample, location)
    of the output-gradient outer products of every column of the loss Hessian's root —
    computed here by brute force from the Jacobian of the logits in the conv output."""
    model, x, y = build_case("cnn", n=12)
    conv = model[0]
    op = hr.KFACOperator(model, cross_entropy, (x, y), params=["0.weight", "0.bias"])
    (bl,) = op.blocks
    s_out = conv(x).detach()
    rest = model[1:]
    J = jacrev(lambda s: rest(s))(s_out)  # (n, C, n, o, H, W)
    n, C = len(y), J.shape[1]
    p = torch.softmax(model(x), -1).detach()
    G_ref = torch.zeros(conv.out_channels, conv.out_channels, dtype=torch.float64)
    for i in range(n):
        H = (torch.diag(p[i]) - torch.outer(p[i], p[i])) / n
        Ji = J[i, :, i]  # (C, o, H, W): logits of sample i in its own conv output
        for r in range(Ji.shape[2] * Ji.shape[3]):
            Jr = Ji.reshape(C, conv.out_channels, -1)[:, :, r]  # (C, o)
            G_ref += Jr.T @ H @ Jr
    torch.testing.assert_close(bl.G, G_ref, rtol=1e-9, atol=TOL)
    patches = nn.functional.unfold(x, conv.kernel_size, padding=conv.padding)
    rows = torch.cat([patches.transpose(1, 2).reshape(-1, patches.shape[1]),
                      torch.ones(patches.shape[0] * patches.shape[2], 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(bl.A, rows.T @ rows / rows.shape[0], rtol=0, atol=TOL)


def test_exact_spectrum_trace_and_stable_rank(mlp):
    model, x, y = mlp
    op = hr.KFACOperator(model, cross_entropy, (x, y))
    D = dense(op)
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-14)
    lam = torch.linalg.eigvalsh(D).flip(0)
    torch.testing.assert_close(op.spectrum(), lam, rtol=0, atol=1e-12)
    assert op.trace() == pytest.approx(float(D.trace()), rel=1e-12)
    assert op.frobenius_sq() == pytest.approx(float(D.pow(2).sum()), rel=1e-12)
    assert op.stable_rank() == pytest.approx(hr.exact_stable_rank(D), rel=1e-10)
    est = hr.stable_rank(op, num_matvecs=op.shape[1], seed=0)  # the estimators run on it
    assert float(est.value[0]) == pytest.approx(op.stable_rank(), rel=1e-8)


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_sampled_kinds(mlp, kind):
    """"empirical": the GGN of one column, the gradient at the data's labels: the bias block
    is the empirical Fisher's; "mc" is seeded and averages towards the ggn kind."""
    model, x, y = mlp
    op = hr.KFACOperator(model, cross_entropy, (x, y), kind=kind, seed=3)
    again = hr.KFACOperator(model, cross_entropy, (x, y), kind=kind, seed=3)
    assert all(torch.equal(a.G, b.G) for a, b in zip(op.blocks, again.blocks))
    if kind == "empirical":
        F = hr.FisherOperator(model, cross_entropy, (x, y))
        s = op.space
        for bl in op.blocks:
            i = s.names.index(bl.bias)
            a, b = s.offsets[i], s.offsets[i + 1]
            torch.testing.assert_close(bl.G, dense(F)[a:b, a:b], rtol=0, atol=TOL)
    else:
        ggn = [float(bl.G.trace()) for bl in hr.KFACOperator(model, cross_entropy, (x, y)).blocks]
        draws = torch.tensor([[float(bl.G.trace()) for bl in hr.KFACOperator(
            model, cross_entropy, (x, y), kind="mc", seed=s).blocks] for s in range(100)])
        se = draws.std(0) / 10  # E G_mc = G_ggn: each layer within 4 standard errors
        assert ((draws.mean(0) - torch.tensor(ggn)).abs() < 4 * se).all()


def test_next_token_logits_and_dict_inputs():
    """(n, T, V) logits: rows are (sequence, position), each weighted 1/(n |T_i|); the head's
    bias block of a one-sequence K-FAC equals the GGN's (no cross-position terms there)."""
    from .test_tasks import dense_ggn as lm_ggn
    from .test_tasks import lm_case

    model, x, y = lm_case()
    task = NextTokenTask()
    params = ["qkv.weight", "qkv.bias", "head.weight", "head.bias"]
    op = hr.KFACOperator(model, task, (x, y), params=params)
    G = lm_ggn(model, task, x, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = [q.numel() for _, q in model.named_parameters()]
    off = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    a = off["head.bias"]
    head = next(bl for bl in op.blocks if bl.module == "head")
    torch.testing.assert_close(head.G, G[a:a + 7, a:a + 7], rtol=0, atol=TOL)
    assert op.shape[1] == sum(q.numel() for n, q in model.named_parameters() if n in params)


def test_unsupported_parameters_are_named(mlp):
    from .test_tasks import lm_case

    model, x, y = lm_case()
    with pytest.raises(ValueError, match="'embed.weight'.*select the parameters") as err:
        hr.KFACOperator(model, NextTokenTask(), (x, y))
    assert "\n" not in str(err.value)
    m, xm, ym = mlp
    with pytest.raises(ValueError, match="kind='ggn' needs the output Hessian"):
        hr.KFACOperator(m, lambda out, t: cross_entropy(out, t), (xm, ym))


@pytest.mark.parametrize("weights", [None, [0.5, 0.2, 0.3]])
def test_federated_composition_with_kfac(mlp, weights):
    """Clients' K-FACs are the slices; the server's is the combined one — with the default
    weights the K-FAC of the pooled data — and the strategy is per-client by rule."""
    model, x, y = mlp
    data = [(x[a:b], y[a:b]) for a, b in ((0, 7), (7, 19), (19, 40))]
    F = hr.FederatedOperator(model, cross_entropy, data, "kfac", weights=weights)
    assert F.route["strategy"] == "per-client" and "not additive" in F.route["reason"]
    J, p, _ = F.shape
    V = torch.randn(J, p, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = F.matmat(V)
    ops = [hr.KFACOperator(model, cross_entropy, d) for d in data]
    for c, op in enumerate(ops):
        torch.testing.assert_close(out[c], op.matmat(V[c]), rtol=0, atol=TOL)
    w = weights or [7 / 40, 12 / 40, 21 / 40]
    server = hr.KFACOperator.combine(ops, w)
    torch.testing.assert_close(out[-1], server.matmat(V[-1]), rtol=0, atol=TOL)
    if weights is None:
        pooled = hr.KFACOperator(model, cross_entropy, (x, y))
        torch.testing.assert_close(out[-1], pooled.matmat(V[-1]), rtol=1e-12, atol=TOL)
    with pytest.raises(ValueError, match="not additive"):
        hr.FederatedOperator(model, cross_entropy, data, "kfac", strategy="stacked")


def test_analyze_cli_with_kfac(tmp_path):
    """``hessrank analyze --curvature kfac`` on a real run: the estimators on K-FAC, rows
    labelled with the curvature and the per-client route."""
    import pandas as pd

    import hessrank.fl as fl
    from hessrank.cli import main

    run = tmp_path / "run"
    fl.train({"algo": "fedavg", "dataset": "digits", "model": "mlp",
              "model_kwargs": {"hidden": [8]}, "clients": 3, "partition": "iid", "rounds": 1,
              "save_every": 1, "local_steps": 2, "seed": 0}, run, progress=False)
    out = tmp_path / "an"
    assert main(["analyze", str(run), "--rounds", "1", "--curvature", "kfac", "--matvecs", "20",
                 "--out", str(out), "--quiet"]) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["curvature"]) == {"kfac"} and len(set(table["subject"])) == 4
    assert all('"strategy": "per-client"' in r for r in table["route"])
