"""HessianOperator against torch.func.hessian (float64) on small briefly-trained models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

import hessrank as hr
from hessrank.curvature.data import as_batches

from .conftest import build_case

_DENSE: dict[str, torch.Tensor] = {}


def dense_truth(name, model, x, y) -> torch.Tensor:
    if name not in _DENSE:
        _DENSE[name] = hr.dense_hessian(model, cross_entropy, (x, y))
    return _DENSE[name]


def probe_block(p: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(p, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("hvp,block,cache", [
    ("rev-rev", "vmap", True), ("rev-rev", "loop", False), ("fwd-rev", "vmap", False),
    ("fwd-rev", "loop", False), ("auto", "auto", "auto"),
])
@pytest.mark.slow
def test_products_match_dense_hessian(case, hvp, block, cache):
    name, model, x, y = case
    H = dense_truth(name, model, x, y)
    op = hr.HessianOperator(model, cross_entropy, (x, y), hvp=hvp, block=block, cache=cache)
    V = probe_block(op.shape[1], 5)
    # float64 products; 1e-6 relative is the bar, observed ~1e-15
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-6, atol=1e-10)
    assert op.num_matvecs == 5


def test_unequal_batches_equal_one_batch(case):
    name, model, x, y = case
    one = hr.HessianOperator(model, cross_entropy, (x, y), cache=False)
    cuts = [0, 7, 40, 41, len(y)]  # sizes 7, 33, 1, 55
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    many = hr.HessianOperator(model, cross_entropy, batches, cache=False)
    V = probe_block(one.shape[1], 3)
    torch.testing.assert_close(many.matmat(V), one.matmat(V), rtol=1e-10, atol=1e-12)
    loader = DataLoader(TensorDataset(x, y), batch_size=25, shuffle=False)
    torch.testing.assert_close(
        hr.HessianOperator(model, cross_entropy, loader).matmat(V), one.matmat(V),
        rtol=1e-10, atol=1e-12,
    )


def test_client_hessians_average_to_pooled_hessian():
    model, x, y = build_case("mlp-tanh")
    cuts = [0, 10, 50, 96]  # clients of sizes 10, 40, 46
    H = hr.dense_hessian(model, cross_entropy, (x, y))
    weighted = sum(
        (b - a) / len(y) * hr.dense_hessian(model, cross_entropy, (x[a:b], y[a:b]))
        for a, b in zip(cuts[:-1], cuts[1:])
    )
    torch.testing.assert_close(weighted, H, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_parameter_subset_is_the_sub_block():
    model, x, y = build_case("cnn")
    names = [n for n, _ in model.named_parameters()]
    full = dense_truth("cnn", model, x, y)
    subset = ["2.weight", "0.bias"]  # order of `params` decides the flat order
    offsets, start = {}, 0
    for n, t in model.named_parameters():
        offsets[n] = (start, start + t.numel())
        start += t.numel()
    idx = torch.cat([torch.arange(*offsets[n]) for n in subset])
    H_sub = hr.dense_hessian(model, cross_entropy, (x, y), params=subset)
    torch.testing.assert_close(H_sub, full[idx][:, idx], rtol=1e-10, atol=1e-12)
    op = hr.HessianOperator(model, cross_entropy, (x, y), params=subset)
    assert op.shape == (1, idx.numel(), idx.numel()) and op.param_names == subset
    V = probe_block(idx.numel(), 4)
    torch.testing.assert_close(op.matmat(V), H_sub @ V, rtol=1e-6, atol=1e-10)
    assert names  # the model is untouched
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_stable_rank_within_one_percent_at_50_matvecs(case):
    name, model, x, y = case
    true = hr.exact_stable_rank(dense_truth(name, model, x, y))
    op = hr.HessianOperator(model, cross_entropy, (x, y))
    errs = [abs(hr.stable_rank(op, num_matvecs=50, seed=s).value[0] / true - 1) for s in range(5)]
    # the bar: within 1% at <= 50 matvecs (median over seeds; measured 0.01-0.45%)
    assert np.median(errs) < 0.01, errs


def test_eigenvalues_and_trace_match_dense(case):
    name, model, x, y = case
    H = dense_truth(name, model, x, y)
    lam = torch.linalg.eigvalsh(H)
    op = hr.HessianOperator(model, cross_entropy, (x, y))
    top = hr.lanczos(op, k=3, which="LA", num_matvecs=60, seed=0)
    np.testing.assert_allclose(top.eigenvalues[0], lam.flip(0)[:3].numpy(), rtol=1e-6)
    bottom = hr.lanczos(op, k=1, which="SA", num_matvecs=60, seed=0, return_eigenvectors=False)
    # the bottom edge is crowded by the bulk: looser, and judged against ‖H‖
    assert abs(bottom.eigenvalues[0, 0] - lam[0].item()) < 1e-3 * lam.abs().max().item()
    tr = hr.hutchpp(op, num_matvecs=60, seed=0)
    assert abs(tr.value[0] - lam.sum().item()) < 4 * tr.stderr[0] + 1e-9


def test_eval_mode_uses_running_statistics_and_leaves_model_untouched():
    model, x, y = build_case("bn-eval")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the operator's mode, not the module's flag, decides
    H_eval = hr.dense_hessian(model, cross_entropy, (x, y), mode="eval")
    op = hr.HessianOperator(model, cross_entropy, (x, y), mode="eval")
    V = probe_block(op.shape[1], 2)
    torch.testing.assert_close(op.matmat(V), H_eval @ V, rtol=1e-6, atol=1e-10)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    H_train = hr.dense_hessian(model, cross_entropy, (x, y), mode="train")
    assert (H_train - H_eval).abs().max() > 1e-6  # batch statistics give another Hessian
    op_train = hr.HessianOperator(model, cross_entropy, (x, y), mode="train")
    torch.testing.assert_close(op_train.matmat(V), H_train @ V, rtol=1e-6, atol=1e-10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by train mode"


def test_vector_shapes_and_scipy():
    model, x, y = build_case("mlp-relu")
    op = hr.HessianOperator(model, cross_entropy, (x, y))
    p = op.shape[1]
    v = probe_block(p, 1)[:, 0]
    Hv = op.matmat(v)
    assert Hv.shape == (p,)
    torch.testing.assert_close(op.matmat(v[:, None])[:, 0], Hv)
    torch.testing.assert_close(op.matmat(v[None, :, None])[0, :, 0], Hv)
    np.testing.assert_allclose(op.to_scipy().matvec(v.numpy()), Hv.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="expected V of shape"):
        op.matmat(torch.zeros(p + 1, 2, dtype=torch.float64))


def test_float32_model_works():
    model, x, y = build_case("mlp-tanh")
    H = hr.dense_hessian(model, cross_entropy, (x, y))
    m32 = build_case("mlp-tanh")[0].float()
    op = hr.HessianOperator(m32, cross_entropy, (x.float(), y))
    assert op.dtype == torch.float32
    V = probe_block(op.shape[1], 3)
    # float32 products agree with the float64 truth to single precision
    torch.testing.assert_close(op.matmat(V.float()).double(), H @ V, rtol=1e-3, atol=1e-4)


# ---- bad input: one clear error ---------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def small_data(n=8):
    return torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))


def test_unknown_parameter_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown parameter '0\.weigth'; valid names: 0\.weight"):
        hr.HessianOperator(small_model(), cross_entropy, small_data(), params=["0.weigth"])


def test_params_take_patterns_and_groups():
    """Patterns select in model order, 'all' includes frozen parameters, overlapping entries
    count once; the product over a pattern's selection is the dense Hessian's block."""
    model = small_model()
    model[0].bias.requires_grad_(False)
    x, y = small_data()
    op = hr.HessianOperator(model, cross_entropy, (x, y), params=["*.weight"])
    assert op.space.names == ["0.weight", "2.weight"]
    assert hr.HessianOperator(model, cross_entropy, (x, y), params=["all"]).space.names == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    both = hr.HessianOperator(model, cross_entropy, (x, y), params=["2.*", "*.bias"])
    assert both.space.names == ["2.weight", "2.bias", "0.bias"]
    H = hr.dense_hessian(model, cross_entropy, (x, y), params=["0.weight", "2.weight"])
    V = torch.eye(H.shape[0], dtype=torch.float64)[None]
    assert float((op.matmat(V)[0] - H).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="pattern '3.\\*' matches no parameter"):
        hr.HessianOperator(model, cross_entropy, (x, y), params=["3.*"])
    with pytest.raises(ValueError, match="params 'adapters': the model has no LoRA adapters"):
        hr.HessianOperator(model, cross_entropy, (x, y), params=["adapters"])


def test_no_trainable_parameters():
    model = small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hr.HessianOperator(model, cross_entropy, small_data())


def test_empty_data():
    x, y = small_data(0)
    with pytest.raises(ValueError, match="data is empty"):
        hr.HessianOperator(small_model(), cross_entropy, (x, y))
    with pytest.raises(ValueError, match="data is empty"):
        hr.HessianOperator(small_model(), cross_entropy, [])


def test_nan_weights_name_the_parameter():
    model = small_model()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter '2\.bias' has NaN or inf"):
        hr.HessianOperator(model, cross_entropy, small_data())


def test_nan_loss_names_the_batch():
    x, y = small_data()
    x[5, 0] = float("nan")
    with pytest.raises(ValueError, match="loss is nan on batch 1"):
        hr.HessianOperator(small_model(), cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])


def test_dropout_in_train_mode_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    op = hr.HessianOperator(model, cross_entropy, small_data(), mode="train")
    with pytest.raises(ValueError, match="not deterministic"):
        op.matmat(torch.ones(op.shape[1], dtype=torch.float64))
    # eval mode turns dropout off: fine
    op = hr.HessianOperator(model, cross_entropy, small_data(), mode="eval")
    assert torch.isfinite(op.matmat(torch.ones(op.shape[1], dtype=torch.float64))).all()


def test_budget_too_small_for_request():
    op = hr.HessianOperator(small_model(), cross_entropy, small_data())
    with pytest.raises(ValueError, match="cannot return k=5 eigenpairs from a budget of 3"):
        hr.lanczos(op, k=5, num_matvecs=3)
    with pytest.raises(ValueError, match="stable_rank needs num_matvecs >= 10"):
        hr.stable_rank(op, num_matvecs=3)


def test_bad_options():
    with pytest.raises(ValueError, match="mode must be 'eval' or 'train'"):
        hr.HessianOperator(small_model(), cross_entropy, small_data(), mode="test")
    with pytest.raises(ValueError, match="hvp must be one of"):
        hr.HessianOperator(small_model(), cross_entropy, small_data(), hvp="double-backward")
    with pytest.raises(ValueError, match="reverse-over-reverse linearization"):  # at construction
        hr.HessianOperator(small_model(), cross_entropy, small_data(), hvp="fwd-rev", cache=True)
    with pytest.raises(ValueError, match="scalar batch mean"):
        hr.HessianOperator(
            small_model(), lambda o, t: cross_entropy(o, t, reduction="none"), small_data()
        )


def test_auto_calibration_skips_a_block_strategy_that_cannot_run():
    """Single-channel images whose strides also read as channels_last (scikit-learn digits:
    (64, 1, 8, 1)) make torch 2.13's conv backward ask a question vmap cannot answer ("NYI:
    querying is_contiguous inside of vmap"): "auto" must drop the vmap candidate (it crashed
    the calibration on the digits CNN) and still give exact products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(20, 4, 4, 1, dtype=torch.float64).permute(0, 3, 1, 2)  # strides (16,1,4,1)
    y = torch.randint(0, 3, (20,))
    raw = type(as_batches((x, y), dtype=torch.float64, device=torch.device("cpu")))((x,), (y,))
    assert as_batches((x, y), dtype=torch.float64,
                      device=torch.device("cpu")).inputs[0].stride() == (16, 16, 4, 1)
    forced = hr.HessianOperator(model, nn.functional.cross_entropy, (x, y), cache=True,
                                block="vmap")
    forced.batches = raw  # bypass the stride fix of as_batches to reach the torch limitation
    with pytest.raises(RuntimeError, match="vmap"):
        forced.matmat(torch.randn(forced.shape[1], 2, dtype=torch.float64))
    op = hr.HessianOperator(model, nn.functional.cross_entropy, (x, y), cache=True)
    op.batches = raw
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    out = op.matmat(V)
    assert op.route["block"] == "loop"
    H = hr.dense_hessian(model, nn.functional.cross_entropy, (x, y))
    torch.testing.assert_close(out, H @ V, rtol=0, atol=1e-10)
