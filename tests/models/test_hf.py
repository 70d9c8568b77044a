"""Tests of hessrank.models.hf: the hf-gpt2 / hf-llama families (shapes, options, lazy import,
local weights, attention kernels, padding, dropout) and their Hessians against dense float64
references."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hessrank.curvature import HessianOperator, dense_hessian
from hessrank.data.task import NextTokenTask
from hessrank.models import MODELS, build_model
from hessrank.models.hf import CausalLM, RMSNorm, check_attention

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers not installed")

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["hf-gpt2", "hf-llama"]
TINY = {"layers": 1, "width": 8, "heads": 2}
TASK = NextTokenTask()


def _tiny(family: str, seq: int = 6, vocab: int = 11, seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    return build_model(family, (seq,), vocab, **{**TINY, **kw})


def _batch(n: int = 3, seq: int = 6, vocab: int = 11, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (n, seq), generator=gen),
            torch.randint(0, vocab, (n, seq), generator=gen))  # fmt: skip


def test_import_of_the_registry_does_not_load_transformers():
    code = ("import sys; from hessrank.models import build_model; build_model('mlp', (4,), 2); "
            "print('transformers' in sys.modules, 'peft' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_shape_defaults_and_determinism(family):
    assert family in MODELS
    model = _tiny(family)
    assert isinstance(model, CausalLM) and model.training and model.family == family
    x, _ = _batch()
    out = model(x)
    assert out.shape == (3, 6, 11) and out.dtype == torch.float32
    assert torch.equal(out, _tiny(family)(x))  # same seed, same weights
    assert not torch.equal(out, _tiny(family, seed=1)(x))
    assert model.config.use_cache is False
    assert all(m.padding_idx is None for m in model.modules() if isinstance(m, nn.Embedding))
    default = build_model(family, (80,), 97)  # the tiny LM of the benchmarks
    assert default.config.num_hidden_layers == 2 and default.config.hidden_size == 128
    assert model.attention == "sdpa"


def test_llama_rmsnorm_is_replaced_by_the_dtype_following_one():
    model = _tiny("hf-llama")
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 3 and all(isinstance(m, RMSNorm) for m in norms)
    names = {n for n, _ in model.named_parameters()}
    assert "lm.model.layers.0.input_layernorm.weight" in names  # checkpoint keys unchanged
    x = torch.randn(2, 8, dtype=torch.float64)
    norm = RMSNorm(nn.Parameter(torch.rand(8, dtype=torch.float64)), 1e-6)
    ref = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref, rtol=1e-15, atol=0)


def test_options_and_forced_kernels_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="takes no option.*valid options: layers"):
        build_model("hf-gpt2", (6,), 11, n_layer=2)
    with pytest.raises(ValueError, match=r"attention 'flash_attention_2' has no second "
                                         r"derivatives.*use attention='sdpa'"):
        build_model("hf-llama", (6,), 11, attention="flash_attention_2")
    with pytest.raises(ValueError, match=r"needs token-id inputs of shape \(T,\)"):
        build_model("hf-gpt2", (1, 8, 8), 10)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_model("hf-gpt2", (6,), 11, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="drop option.*layers"):
        build_model("hf-gpt2", (6,), 11, model_path=str(tmp_path), layers=2)


def test_check_attention_refuses_bare_models_without_second_derivatives():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=11, n_positions=6, n_embd=8, n_layer=1, n_head=2)
    for impl, ok in (("eager", True), ("sdpa", False)):
        cfg._attn_implementation = impl
        bare = transformers.GPT2LMHeadModel(cfg)
        if ok:
            check_attention(bare)
        else:
            with pytest.raises(ValueError, match="uses attention 'sdpa'.*sdpa_kernel"):
                check_attention(bare)
    check_attention(_tiny("hf-gpt2"))  # the toolkit's own model is always fine


@pytest.mark.parametrize("family", FAMILIES)
def test_model_path_loads_local_weights(family, tmp_path):
    model = _tiny(family).eval()
    model.lm.save_pretrained(tmp_path)
    torch.manual_seed(5)  # a local load draws nothing that matters
    loaded = build_model(family, (6,), 11, model_path=str(tmp_path)).eval()
    x, _ = _batch()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    other = "hf-llama" if family == "hf-gpt2" else "hf-gpt2"
    with pytest.raises(ValueError, match="use the matching family"):
        build_model(other, (6,), 11, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="vocabulary of 11 tokens but the data has 12"):
        build_model(family, (6,), 12, model_path=str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_follows_the_mode(family):
    model = _tiny(family, dropout=0.5)
    x, _ = _batch()
    torch.manual_seed(0)
    a = model.train()(x)
    assert not torch.equal(a, model(x))  # train mode drops
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_gives_the_unpadded_logits_and_finite_derivatives(family, attention):
    model = _tiny(family, seq=8, attention=attention, layers=2).double().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 11, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # sequence 0: three padding tokens on the left
    out = model(ids, attention_mask=mask)
    # LLaMA's eager attention takes softmax in float32 (transformers' choice): ~1e-9 there
    tol = 1e-8 if (family, attention) == ("hf-llama", "eager") else 1e-12
    torch.testing.assert_close(out[0, 3:], model(ids[:1, 3:])[0], rtol=0, atol=tol)
    torch.testing.assert_close(out[1], model(ids[1:])[0], rtol=0, atol=tol)
    targets = torch.randint(0, 11, (2, 8), generator=gen)
    targets[0, :3] = TASK.ignore_index
    grads = torch.autograd.grad(TASK(out, targets), list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


# ---- Hessians vs dense float64 ----------------------------------------------------------------
def _relative_error(op, H: torch.Tensor, seed: int = 0) -> float:
    V = torch.randn(1, H.shape[0], 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    ref = H @ V[0]
    return float((op.matmat(V)[0] - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_hessian_matches_dense_float64(family):
    """Float64 is exact for both families with the default attention (SDPA, math backend).

    The reference is classic autograd (``dense_hessian(mode="train")``; the models have no
    dropout, so train = eval): torch 2.13's ``torch.func.hessian`` — dense_hessian's eval
    route — is wrong for a LayerNorm weight together with any parameter before it
    (jvp over jacrev of layer_norm: ~1e-2 off, asymmetric), which GPT-2 has.
    """
    model = _tiny(family).double()
    x, y = _batch()
    H = dense_hessian(model, TASK, (x, y), mode="train")
    assert H.shape[0] == sum(p.numel() for p in model.parameters())
    assert _relative_error(HessianOperator(model, TASK, (x, y)), H) < 1e-10
    assert _relative_error(HessianOperator(model, TASK, (x, y), hvp="rev-rev"), H) < 1e-10


def test_llama_eager_attention_is_inexact_in_float64():
    """LLaMA's eager attention computes softmax in float32 (transformers' code): products are
    then ~1e-11..1e-10 from the dense Hessian, which is why SDPA (math) is the default."""
    model = _tiny("hf-llama", attention="eager").double()
    x, y = _batch()
    H = dense_hessian(model, TASK, (x, y), mode="train")
    assert 1e-13 < _relative_error(HessianOperator(model, TASK, (x, y)), H) < 1e-8
