"""Tests of hessrank.models.adapters: PEFT LoRA on every intended projection, base frozen,
adapter state in PEFT's layout (saved, loaded, read by PEFT itself), the FedLoRU merge, and the
adapters-only Hessian against dense float64."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hessrank.curvature import HessianOperator, dense_hessian
from hessrank.data.task import NextTokenTask
from hessrank.models import build_model
from hessrank.models.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    adapter_names,
    adapter_state_dict,
    add_lora,
    has_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    save_adapters,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
    reason="peft / transformers not installed")

FAMILIES = ["hf-gpt2", "hf-llama"]
PROJECTIONS = {  # module-name suffixes per family and target group (2 layers)
    ("hf-gpt2", "attention"): ["attn.c_attn", "attn.c_proj"],
    ("hf-gpt2", "mlp"): ["mlp.c_fc", "mlp.c_proj"],
    ("hf-llama", "attention"): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj"],
    ("hf-llama", "mlp"): ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}  # fmt: skip
TASK = NextTokenTask()


def _model(family: str, seed: int = 0, **lora):
    torch.manual_seed(seed)
    model = build_model(family, (6,), 11, layers=2, width=8, heads=2)
    names = add_lora(model, rank=2, alpha=4.0, **lora) if lora is not None else ()
    return model, names


def _ids(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, 6), generator=gen), torch.randint(0, 11, (n, 6), generator=gen)


def _randomize_adapters(model, seed: int = 1) -> None:
    """Adapters of scale 0.3, as after training (with N(0, 1) entries the GPT-2 update
    (α/r)·B·A saturates attention and every product route differs from every other, and from
    the dense Hessian, by ~1e-10 relative: conditioning, not a wrong derivative)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapter_names(model):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("targets", ["attention", "attention+mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_intended_projection_gets_an_adapter_and_only_adapters_train(family, targets):
    model, names = _model(family, targets=targets)
    assert has_adapters(model)
    prefix = "lm.base_model.model." + ("transformer.h" if family == "hf-gpt2" else "model.layers")
    expected = [f"{prefix}.{layer}.{proj}.lora_{ab}.default.weight"
                for layer in range(2) for group in targets.split("+")
                for proj in PROJECTIONS[(family, group)] for ab in "AB"]  # fmt: skip
    assert sorted(names) == sorted(expected)  # layer 0's q_proj included
    assert tuple(n for n, p in model.named_parameters() if p.requires_grad) == names
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)
    for name, p in model.named_parameters():  # B = 0: the adapted model is the base model
        if ".lora_B." in name:
            assert torch.count_nonzero(p) == 0


def test_adapters_leave_the_function_unchanged_at_start():
    torch.manual_seed(0)
    base = build_model("hf-llama", (6,), 11, layers=2, width=8, heads=2).eval()
    x, _ = _ids()
    before = base(x)
    add_lora(base, rank=2)
    torch.testing.assert_close(base.eval()(x), before, rtol=0, atol=0)


def test_bad_targets_and_twice_are_one_line_errors():
    model, _ = _model("hf-gpt2")
    with pytest.raises(ValueError, match="already has adapters"):
        add_lora(model)
    torch.manual_seed(0)
    fresh = build_model("hf-gpt2", (6,), 11, layers=1, width=8, heads=2)
    with pytest.raises(ValueError, match="unknown LoRA target group 'ffn'"):
        add_lora(fresh, targets="attention+ffn")
    with pytest.raises(ValueError, match="'q_proj' matches no module of the hf-gpt2 model"):
        add_lora(fresh, targets=["q_proj"])
    with pytest.raises(TypeError, match="hf-gpt2 / hf-llama model"):
        add_lora(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has no adapters"):
        adapter_state_dict(fresh)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_state_round_trips_in_pefts_layout(family, tmp_path):
    model, names = _model(family)
    _randomize_adapters(model)
    state = adapter_state_dict(model)
    assert len(state) == len(names)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in state)
    save_adapters(model, tmp_path / "round_3")
    files = sorted(p.name for p in (tmp_path / "round_3").iterdir())
    assert files == sorted([ADAPTER_FILE, ADAPTER_CONFIG])  # no base weights, no temp files
    config = json.loads((tmp_path / "round_3" / ADAPTER_CONFIG).read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"
    other, _ = _model(family, seed=0)
    load_adapters(other, tmp_path / "round_3")
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    x, _ = _ids()
    torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_itself_reads_what_save_adapters_writes(family, tmp_path):
    import peft

    model, _ = _model(family)
    _randomize_adapters(model)
    save_adapters(model, tmp_path)
    torch.manual_seed(0)  # the same base W0
    base = build_model(family, (6,), 11, layers=2, width=8, heads=2).double()
    theirs = peft.PeftModel.from_pretrained(base.lm, tmp_path).eval()
    x, _ = _ids()
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        logits = theirs(input_ids=x).logits
    torch.testing.assert_close(model.double().eval()(x), logits, rtol=1e-10, atol=1e-12)


def test_loading_checks_keys_and_config(tmp_path):
    model, _ = _model("hf-llama")
    state = adapter_state_dict(model)
    with pytest.raises(ValueError, match=r"unknown key 'nope'"):
        load_adapter_state_dict(model, {**state, "nope": torch.zeros(1)})
    first = next(iter(state))
    with pytest.raises(ValueError, match=r"no key .*1 missing"):
        load_adapter_state_dict(model, {k: v for k, v in state.items() if k != first})
    save_adapters(model, tmp_path)
    wider, _ = _model("hf-llama", targets="attention+mlp")
    with pytest.raises(ValueError, match="target_modules=.*build the model with the adapters"):
        load_adapters(wider, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapters(model, tmp_path / "missing")


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_function_and_restarts_the_adapters(family):
    model, names = _model(family)
    model.double()
    _randomize_adapters(model)
    x, _ = _ids()
    before = model.eval()(x)
    merge_adapters(model, torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n]) == 0 for n in names if ".lora_B." in n)
    a_after = {n: params[n].clone() for n in names if ".lora_A." in n}
    again, _ = _model(family)
    again.double()
    _randomize_adapters(again)
    merge_adapters(again, torch.Generator().manual_seed(3))  # same generator, same new A
    assert all(torch.equal(dict(again.named_parameters())[n], a) for n, a in a_after.items())
    assert tuple(n for n, p in model.named_parameters() if p.requires_grad) == names


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_only_hessian_matches_dense_float64(family):
    model, names = _model(family)
    model.double()
    _randomize_adapters(model)  # B ≠ 0: the A–B blocks are not trivially zero
    x, y = _ids()
    H = dense_hessian(model, TASK, (x, y), params=list(names))
    assert H.shape[0] == sum(p.numel() for n, p in model.named_parameters() if n in names)
    op = HessianOperator(model, TASK, (x, y), params=list(names))
    V = torch.randn(1, H.shape[0], 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    ref = H @ V[0]
    assert float((op.matmat(V)[0] - ref).abs().max() / ref.abs().max()) < 1e-10
    default = HessianOperator(model, TASK, (x, y))  # the default selection: the trainable ones
    assert default.shape == op.shape
