"""Analysis of a run with PEFT adapters (issue 22, item 5): the curvature is restricted to the
adapters by default and by ``--params adapters``, matches the dense float64 Hessian of one
client's loss over the adapters, and covers every parameter with ``--params all``; name
patterns; one-line errors for selections that match nothing."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch

from hessrank.analysis.trajectory import analyze
from hessrank.cli import main
from hessrank.curvature import HessianOperator, dense_hessian
from hessrank.curvature.params import ParameterSpace
from hessrank.fl import RunDir, train
from hessrank.models.adapters import adapter_names

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("peft") is None
                       or importlib.util.find_spec("transformers") is None,
                       reason="peft / transformers not installed"),
]  # fmt: skip

# rank 1 on c_attn (16 -> 48) and c_proj (16 -> 16): p = (16 + 48) + (16 + 16) = 96 adapter
# parameters, fewer than the products below, so Lanczos is exact
P_ADAPTERS = 96


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    body = "\n\n".join(f"**{s}**  \n{s.lower()} speaks line {i:02d}, plainly and well."
                       for i in range(24) for s in ("KING", "FOOL", "PAGE"))  # fmt: skip
    play = root / "plays" / "tiny.md"
    play.parent.mkdir()
    play.write_text(f"# Tiny\n\n### SCENE I. Here.\n\n{body}\n", encoding="utf-8")
    cfg = {"algo": "fedloru", "adapters": "peft", "dataset": "shakespeare",
           "data_root": str(root / "plays"), "dataset_kwargs": {"min_lines": 5, "seq_len": 16},
           "partition": "natural", "clients": 3, "model": "hf-gpt2",
           "model_kwargs": {"layers": 1, "width": 16, "heads": 2}, "rank": 1,
           "lora_alpha": 2.0, "merge_every": 2, "rounds": 1, "local_steps": 3, "batch_size": 8,
           "lr": 1.0, "dtype": "float64"}  # fmt: skip
    return train(cfg, root / "run", progress=False)


def _client0(run: RunDir):
    model = run.load_model(1)
    x, y = run.client_data()[0]
    return model, run.task(), x, y


def _autograd_hessian(model, task, x, y, names):
    """An independent reference: classic double-backward autograd on the flat adapters."""
    space = ParameterSpace(model, names)

    def flat_loss(flat):
        return space.loss(task, space.tangents(flat), x, y)

    return torch.autograd.functional.hessian(flat_loss, space.vector())


def test_adapters_only_curvature_matches_dense_float64(adapter_run, tmp_path):
    """Round 1's client 0: the analysis (default selection, and ``--params adapters`` from the
    CLI) differentiates the 96 adapter parameters only; with 110 > p products its top
    eigenvalues are the dense float64 Hessian's (jacfwd(grad), itself checked against classic
    autograd to 1e-10)."""
    model, task, x, y = _client0(adapter_run)
    names = list(adapter_names(model))
    assert [n for n, q in model.named_parameters() if q.requires_grad] == names
    H = dense_hessian(model, task, (x, y), params=names)
    assert H.shape == (P_ADAPTERS, P_ADAPTERS)
    ref = _autograd_hessian(model, task, x, y, names)
    assert float((H - ref).abs().max() / ref.abs().max()) < 1e-10
    lam = torch.linalg.eigvalsh(H)
    top = lam[lam.abs().argsort(descending=True)][:3]
    assert float(top.abs()[0]) > 0  # a Hessian that is not trivially zero (B ≠ 0 after round 1)

    settings = dict(rounds=[1], subjects="clients:0", quantities="top-eig,stable-rank",
                    matvecs=110, progress=False, threads=1)  # fmt: skip
    default = analyze(adapter_run.path, out=tmp_path / "default", **settings)
    assert main(["analyze", str(adapter_run.path), "--out", str(tmp_path / "cli"), "--params",
                 "adapters", "--rounds", "1", "--subjects", "clients:0", "--quantities",
                 "top-eig,stable-rank", "--matvecs", "110", "--threads", "1", "--quiet"]) == 0
    cli = pd.read_parquet(tmp_path / "cli" / "results.parquet")
    for table in (default, cli):
        eig = table[table["quantity"] == "top-eig"].sort_values("k")["value"].to_numpy()
        torch.testing.assert_close(torch.as_tensor(eig[:3].copy()), top, rtol=1e-8, atol=0)
        sr = table.loc[table["quantity"] == "stable-rank", "value"].item()
        assert sr == pytest.approx(float((H**2).sum() / top[0] ** 2), rel=1e-6)


def test_params_all_covers_the_frozen_base_too(adapter_run):
    """``params=["all"]``: every parameter (base and adapters); one product equals the
    double-backward Hessian-vector product of the client's loss over all of them. A pattern
    selects by name; ``adapters`` on a model without adapters is one line."""
    model, task, x, y = _client0(adapter_run)
    total = sum(q.numel() for q in model.parameters())
    op = HessianOperator(model, task, (x, y), params=["all"])
    assert op.shape[-1] == total > P_ADAPTERS
    space = ParameterSpace(model, ["all"])
    theta = space.vector().requires_grad_(True)
    v = torch.randn(total, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.autograd.grad(space.loss(task, space.tangents(theta), x, y), theta,
                            create_graph=True)[0]  # fmt: skip
    hv = torch.autograd.grad(g @ v, theta)[0]
    got = op.matmat(v.reshape(1, -1, 1))[0, :, 0]
    assert float((got - hv).abs().max() / hv.abs().max()) < 1e-10
    one = ParameterSpace(model, ["*.c_attn.lora_A.*"])
    assert one.names == [n for n in adapter_names(model) if ".c_attn.lora_A." in n]
    both = ParameterSpace(model, ["adapters", "*.lora_A.*"])  # overlapping entries: once each
    assert both.names == list(adapter_names(model))
    with pytest.raises(ValueError, match="pattern '\\*.nothing' matches no parameter"):
        ParameterSpace(model, ["*.nothing"])
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="params 'adapters': the model has no LoRA adapters"):
        ParameterSpace(plain, ["adapters"])


def test_unknown_selection_is_refused_before_any_work(adapter_run, tmp_path, capsys):
    code = main(["analyze", str(adapter_run.path), "--out", str(tmp_path / "a"), "--params",
                 "*.lora_C.*", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "--params: params pattern '*.lora_C.*' matches no parameter" in err[0]
    assert not (tmp_path / "a" / "results.parquet").exists()

