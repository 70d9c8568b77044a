"""LoRA factor layers: exact function at init, merge invariance, conv factorization, densify."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hessrank.fl.layers import (
    LoRAConv2d,
    LoRALinear,
    default_factorizable,
    densify,
    factorize,
    factorized_layers,
)

TOL = 1e-12  # float64 throughout; the identities are exact up to summation order


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    ).double()


def _x() -> torch.Tensor:
    return torch.randn(5, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _randomize_B(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in factorized_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g, dtype=layer.B.dtype))


def test_default_factorizable_skips_first_and_last():
    assert default_factorizable(_net()) == ["2", "5"]


def test_fine_tuning_init_is_the_dense_function():
    dense = _net()
    model = factorize(copy.deepcopy(dense), rank=2, alpha=4.0, generator=torch.Generator())
    assert isinstance(model[2], LoRAConv2d) and isinstance(model[5], LoRALinear)
    assert torch.equal(model[5].B, torch.zeros_like(model[5].B))
    torch.testing.assert_close(model(_x()), dense(_x()), rtol=0, atol=TOL)


@pytest.mark.parametrize("index", [2, 5], ids=["conv2d", "linear"])
def test_forward_equals_dense_weight(index):
    model = factorize(_net(), rank=3, alpha=2.0, generator=torch.Generator().manual_seed(0))
    _randomize_B(model)
    layer = model[index]
    x = _x() if index == 2 else torch.randn(4, 54, dtype=torch.float64)
    if index == 2:
        x = model[1](model[0](x))
        ref = nn.functional.conv2d(x, layer.dense_weight(), layer.bias, 2, 2, 2)
    else:
        ref = nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("index", [2, 5], ids=["conv2d", "linear"])
def test_merge_leaves_the_function_unchanged(index):
    model = factorize(_net(), rank=2, alpha=3.0, generator=torch.Generator().manual_seed(0))
    _randomize_B(model)
    before = model(_x())
    layer = model[index]
    w_before, a_before = layer.dense_weight().clone(), layer.A.clone()
    layer.merge_(torch.Generator().manual_seed(5))
    torch.testing.assert_close(model(_x()), before, rtol=0, atol=TOL)
    torch.testing.assert_close(layer.weight0, w_before, rtol=0, atol=TOL)
    assert torch.count_nonzero(layer.B) == 0
    assert not torch.equal(layer.A, a_before)  # A redrawn


def test_from_scratch_init_scale():
    """W0 = 0 and Var[(α/r)·(BA)_ij] ≈ 1/(3·fan_in); 20% covers sampling error at 512²."""
    base = nn.Linear(512, 512).double()
    layer = LoRALinear(base, 8, 16.0, from_scratch=True, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.weight0) == 0
    var = float(layer.dense_weight().detach().var())
    assert abs(var * 3 * 512 - 1.0) < 0.2


def test_densify_has_template_keys_and_same_outputs():
    dense = _net()
    model = factorize(copy.deepcopy(dense), rank=2, alpha=2.0, generator=torch.Generator())
    _randomize_B(model)
    out = densify(model, dense)
    assert list(out.state_dict()) == list(dense.state_dict())
    assert type(out) is type(dense)
    torch.testing.assert_close(out(_x()), model(_x()), rtol=0, atol=TOL)


def test_personal_pair_is_part_of_the_dense_weight():
    layer = LoRALinear(nn.Linear(6, 4).double(), 2, 2.0, generator=torch.Generator())
    layer.add_personal_(1, 3.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.PB.fill_(0.5)
    expected = layer.weight0 + 3.0 * layer.PB @ layer.PA  # B = 0; α_p/r_p = 3
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=0, atol=TOL)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, rtol=0, atol=TOL)


def test_unknown_layer_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: 0, 2, 5, 7"):
        factorize(_net(), ["5", "fc"], rank=2)
    with pytest.raises(ValueError, match="more than once"):
        factorize(_net(), ["5", "5"], rank=2)


def test_grouped_conv_is_rejected():
    with pytest.raises(ValueError, match="groups=1"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 2.0)


def test_same_generator_same_factors():
    a = factorize(_net(), rank=2, generator=torch.Generator().manual_seed(3))
    b = factorize(_net(), rank=2, generator=torch.Generator().manual_seed(3))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
