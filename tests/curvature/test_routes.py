"""The route rule as a pure function (no model), the operators executing what it plans, and
the protocols the federated composition consumes."""

from __future__ import annotations

import dataclasses
import json

import pytest
from torch.nn.functional import cross_entropy

import hessrank as hr
from hessrank.curvature.protocol import ClientOperator, CombinableOperator, UnitOperator
from hessrank.curvature.registry import CURVATURES, curvature_class
from hessrank.curvature.routes import VMAP_MAX_ENTRIES, RouteRequest, Workload, plan_route

from .conftest import build_case

MLP = Workload(curvature="hessian", dim=85_002, element_size=4, batch_sizes=(512,),
               activations_per_sample=778.0, has_conv=False, couples_samples=False, mode="eval")


def test_plan_route_without_a_model():
    r = plan_route(MLP, RouteRequest(hvp="auto"))
    assert r == {"curvature": "hessian", "cache": True, "block": "loop", "mode": "eval",
                 "micro_batch": None, "hvp": "graph"}
    small = dataclasses.replace(MLP, batch_sizes=(143,), activations_per_sample=138.0)
    assert plan_route(small, RouteRequest(hvp="auto"))["block"] == "vmap"
    assert 143 * 138 <= VMAP_MAX_ENTRIES
    conv = dataclasses.replace(small, has_conv=True)
    assert plan_route(conv, RouteRequest(hvp="auto"))["block"] == "loop"
    ggn = dataclasses.replace(MLP, curvature="ggn")
    assert "hvp" not in plan_route(ggn, RouteRequest())
    # output-space curvatures push blocks by vmap whenever 8 activation copies fit
    for name in ("ggn", "fisher"):
        for w in (dataclasses.replace(MLP, curvature=name),
                  dataclasses.replace(conv, curvature=name)):
            assert plan_route(w, RouteRequest())["block"] == "vmap"
            tight = 8 * w.activations_per_sample * max(w.batch_sizes) * w.element_size / 2**20
            assert plan_route(w, RouteRequest(cache_budget_mb=0.99 * tight))["block"] == "loop"
    assert plan_route(MLP, RouteRequest(hvp="fwd-rev"))["cache"] is False


def test_plan_route_memory_rule():
    need = MLP.cache_mb()
    over = plan_route(MLP, RouteRequest(hvp="auto", cache_budget_mb=0.9 * need))
    assert over["cache"] is False and over["hvp"] == "rev-rev" and over["micro_batch"] == 256
    tight = plan_route(MLP, RouteRequest(hvp="auto", cache_budget_mb=MLP.cache_mb(64, 1)))
    assert tight["micro_batch"] == 64
    bn = dataclasses.replace(MLP, couples_samples=True, mode="train")
    assert plan_route(bn, RouteRequest(hvp="auto", cache_budget_mb=1e-6))["micro_batch"] is None
    with pytest.raises(ValueError, match="BatchNorm"):
        plan_route(bn, RouteRequest(micro_batch_size=8))


def test_attention_is_recorded_only_when_used():
    att = dataclasses.replace(MLP, attention=True)
    assert plan_route(att, RouteRequest(hvp="auto"))["attention"] == "math"
    assert plan_route(att, RouteRequest(sdpa="flash"))["attention"] == "flash"
    assert "attention" not in plan_route(MLP, RouteRequest(hvp="auto"))


@pytest.mark.parametrize("bad", [{"cache": "yes"}, {"block": "batched"}, {"hvp": "fast"},
                                 {"micro_batch_size": 0}, {"sdpa": "fused"},
                                 {"hvp": "fwd-rev", "cache": True},
                                 {"micro_batch_size": 4, "cache": True}])
def test_requests_are_checked(bad):
    with pytest.raises(ValueError):
        RouteRequest(**bad)


@pytest.mark.parametrize("name", ["mlp-tanh", "cnn", "bn-eval"])
def test_operators_execute_the_planned_route(name):
    model, x, y = build_case(name, n=40)
    for cls in (hr.HessianOperator, hr.GGNOperator, hr.FisherOperator):
        op = cls(model, cross_entropy, (x, y), batch_size=16)
        planned = plan_route(op.workload, op.request)
        assert {k: op.route[k] for k in planned} == planned
        json.dumps(op.route)


def test_protocols_and_registry():
    model, x, y = build_case("mlp-tanh", n=20)
    h = hr.HessianOperator(model, cross_entropy, (x, y))
    k = hr.KFACOperator(model, cross_entropy, (x, y))
    assert isinstance(h, UnitOperator) and h.additive
    assert isinstance(k, ClientOperator) and isinstance(k, CombinableOperator)
    assert not isinstance(k, UnitOperator) and not k.additive
    for name, entry in CURVATURES.items():
        assert curvature_class(name).curvature == name and entry.help
    assert not CURVATURES["kfac"].exact
    with pytest.raises(ValueError, match="unknown curvature 'hesian'; choose from hessian"):
        curvature_class("hesian")
