"""Tests of hessrank.models.builtin: shapes, parameter counts, determinism, float64, names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessrank.models import MODELS, build_model
from hessrank.models.builtin import FAMILIES
from hessrank.models.hf import HF_FAMILIES

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "linear"])
def test_output_shapes_on_images(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval()
    with torch.no_grad():
        assert model(torch.rand(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_resnet18_shapes(shape):
    torch.manual_seed(0)
    model = build_model("resnet18", shape, 10, width=8).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_vector_inputs(name):
    model = build_model(name, (20,), 7)
    assert model(torch.randn(5, 20)).shape == (5, 7)


def test_image_models_reject_vector_inputs():
    for name in ["cnn", "resnet8", "resnet18"]:
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            build_model(name, (20,), 3)


def test_param_counts():
    # mlp on 8x8: 64*64+64 + 64*64+64 + 64*10+10
    assert _num_params(build_model("mlp", (1, 8, 8), 10)) == 8970
    assert _num_params(build_model("mlp", (4,), 2, hidden=(3,))) == 4 * 3 + 3 + 3 * 2 + 2
    # cnn on 8x8: conv 1->16, conv 16->32, pooled to 2x2, fc 128->64, out 64->10
    expected_cnn = (9 * 16 + 16) + (9 * 16 * 32 + 32) + (128 * 64 + 64) + (64 * 10 + 10)
    assert _num_params(build_model("cnn", (1, 8, 8), 10)) == expected_cnn
    # cnn on 28x28 pools to 7x7, on 32x32 to 8x8: only fc1 grows
    delta = _num_params(build_model("cnn", (1, 28, 28), 10)) - expected_cnn
    assert delta == (32 * 49 - 128) * 64
    assert _num_params(build_model("linear", (20,), 20)) == 400
    assert _num_params(build_model("linear", (20,), 20, bias=True)) == 420
    r8 = _num_params(build_model("resnet8", (3, 32, 32), 10))
    r18 = _num_params(build_model("resnet18", (3, 32, 32), 10))
    assert 5e4 < r8 < 1.5e5 and 5e5 < r18 < 1e6 and r18 > 5 * r8
    assert _num_params(build_model("resnet18", (3, 32, 32), 10, width=64)) > 1e7


def test_the_registry_holds_the_builtin_and_hf_families():
    assert MODELS == (*FAMILIES, *HF_FAMILIES)


def test_deterministic_under_manual_seed():
    for name in FAMILIES:
        torch.manual_seed(4)
        a = build_model(name, (1, 8, 8), 10).state_dict()
        torch.manual_seed(4)
        b = build_model(name, (1, 8, 8), 10).state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stable_names():
    assert list(build_model("mlp", (1, 8, 8), 10).state_dict()) == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out.weight", "out.bias"
    ]
    assert list(build_model("cnn", (1, 28, 28), 10).state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "out.weight", "out.bias",
    ]
    assert list(build_model("linear", (20,), 5).state_dict()) == ["fc.weight"]
    keys = list(build_model("resnet8", (3, 32, 32), 10).state_dict())
    assert keys[0] == "stem.conv.weight" and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "stage2.0.shortcut.0.weight" in keys and "stage1.0.conv1.weight" in keys


def test_no_dropout_and_activation_choice():
    for name in FAMILIES:
        model = build_model(name, (1, 8, 8), 10)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    tanh = build_model("mlp", (4,), 2, activation="tanh")
    assert isinstance(tanh.act1, nn.Tanh)
    assert isinstance(build_model("cnn", (1, 8, 8), 2, activation="tanh").act_fc, nn.Tanh)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_float64(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10, **({"width": 4} if "resnet" in name else {}))
    model = model.double().eval()
    out = model(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())


def test_errors_name_the_way_out():
    with pytest.raises(ValueError, match="valid names: mlp, cnn"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="valid options: hidden, activation"):
        build_model("mlp", (1, 8, 8), 10, width=3)
    with pytest.raises(ValueError, match="valid activations: relu, tanh"):
        build_model("mlp", (1, 8, 8), 10, activation="gelu")
