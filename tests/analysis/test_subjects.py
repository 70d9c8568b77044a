"""Subject specs: parsing, realization into groups, and the stacked operators they build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hessrank.analysis.subjects import (
    OperatorStack,
    SubjectSpec,
    build_operator,
    draw_subset,
    parse_subjects,
    realize,
)
from hessrank.curvature import HessianOperator


def _data(sizes=(6, 9, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()


def test_parse_all_forms():
    specs = parse_subjects("server,clients:3,0,subset:50x5,test")
    assert specs == [
        SubjectSpec("server"), SubjectSpec("clients", clients=(0, 3)),
        SubjectSpec("subset", size=50, draws=5), SubjectSpec("test"),
    ]
    assert [s.label for s in specs] == ["server", "clients:0,3", "subset:50x5", "test"]


def test_parse_merges_clients_and_drops_duplicates():
    assert parse_subjects(["clients:1", "clients:0,1", "server", "server"]) == [
        SubjectSpec("clients", clients=(0, 1)), SubjectSpec("server")]
    assert parse_subjects("clients:2,clients") == [SubjectSpec("clients")]


@pytest.mark.parametrize("bad", ["serv", "clients:", "clients:a", "subset:5", "subset:0x3",
                                 "subset:5x0", ""])
def test_bad_specs_name_the_valid_forms(bad):
    with pytest.raises(ValueError, match="subset:NxD|N >= 1|no subjects"):
        parse_subjects(bad)


def test_realize_groups_and_sizes():
    data = _data()
    groups = realize(parse_subjects("clients:0,2,server,subset:4x3,test"), client_data=data,
                     test=data[0], seed=1)
    fed, sub, test = groups
    assert fed.label == "server+clients-0,2" and fed.federated
    assert [s.name for s in fed.subjects] == ["client0", "client2", "server"]
    assert fed.index == (0, 2, 3)  # server sits at K = 3 of the FederatedOperator
    assert [s.size for s in fed.subjects] == [6, 5, 20]
    assert sub.label == "subset4x3" and [s.size for s in sub.subjects] == [4, 4, 4]
    assert len({s.data_seed for s in sub.subjects}) == 3
    assert test.subjects[0].kind == "test" and test.subjects[0].size == 6


def test_subset_draws_are_reproducible_from_the_recorded_seed():
    data = _data()
    pooled_x = torch.cat([x for x, _ in data])
    a = realize(parse_subjects("subset:7x2"), client_data=data, seed=3)[0]
    b = realize(parse_subjects("subset:7x2"), client_data=data, seed=3)[0]
    for s, t in zip(a.subjects, b.subjects):
        assert s.data_seed == t.data_seed
        idx = torch.as_tensor(draw_subset(20, 7, s.data_seed))
        torch.testing.assert_close(s.data[0], pooled_x[idx], rtol=0, atol=0)
        assert len(np.unique(idx.numpy())) == 7
    c = realize(parse_subjects("subset:7x2"), client_data=data, seed=4)[0]
    assert c.subjects[0].data_seed != a.subjects[0].data_seed


def test_realize_errors_are_actionable():
    data = _data()
    with pytest.raises(ValueError, match="0..2"):
        realize(parse_subjects("clients:5"), client_data=data)
    with pytest.raises(ValueError, match="N <= 20"):
        realize(parse_subjects("subset:21x1"), client_data=data)
    with pytest.raises(ValueError, match="test set"):
        realize(parse_subjects("test"), client_data=data)


def test_server_alone_is_the_pooled_operator(model):
    data = _data()
    (g,) = realize(parse_subjects("server"), client_data=data)
    op = build_operator(g, model, nn.functional.cross_entropy)
    assert isinstance(op, HessianOperator) and op.num_samples == 20


def test_stack_slices_equal_separate_operators(model):
    data = _data()
    (g,) = realize(parse_subjects("clients"), client_data=data)
    op = build_operator(g, model, nn.functional.cross_entropy)
    assert isinstance(op, OperatorStack) and op.shape[0] == 3
    V = torch.randn(3, op.shape[1], 2, dtype=torch.float64)
    out = op.matmat(V)
    for j, d in enumerate(data):
        ref = HessianOperator(model, nn.functional.cross_entropy, d).matmat(V[j : j + 1])[0]
        torch.testing.assert_close(out[j], ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="expected V"):
        op.matmat(V[:2])


def test_a_client_list_survives_the_comma_split_of_the_settings():
    """``--subjects server,clients:0,2`` reaches the parser as ("server", "clients:0", "2")
    (AnalysisSettings splits at commas); before, the "2" was an unknown subject."""
    from hessrank.analysis.settings import AnalysisSettings

    s = AnalysisSettings.build(subjects="server,clients:0,2")
    assert [p.label for p in parse_subjects(s.subjects)] == ["server", "clients:0,2"]
