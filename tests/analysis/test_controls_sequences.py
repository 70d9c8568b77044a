"""Matched controls for next-token data (issue 22): size-matched and token-histogram-matched
random subsets of sequences, the subject groups and table columns that carry them, the
spec's checks of which matched kind fits which targets, and a tiny next-token study."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from hessrank.analysis import controls as ct
from hessrank.analysis import spec as sp
from hessrank.data.catalog import DATASET_CATALOG

V, T = 6, 8


def _token_clients(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three clients of (n, T) token windows with very different token histograms: client 0
    speaks mostly tokens 0 and 1 (a small, skewed client), client 1 mostly 2..5, client 2
    uniformly; a window's inputs are its targets shifted, as in next-token data."""
    rng = np.random.default_rng(seed)
    probs = [np.array([0.45, 0.35, 0.05, 0.05, 0.05, 0.05]), np.array([0.0, 0.0, 1, 1, 1, 1]) / 4,
             np.full(V, 1 / V)]
    out = []
    for n, p in zip((30, 120, 90), probs):
        y = rng.choice(V, size=(n, T), p=p)
        x = np.concatenate([rng.integers(0, V, size=(n, 1)), y[:, :-1]], axis=1)
        out.append((torch.as_tensor(x), torch.as_tensor(y)))
    return out


def _pool_hists(clients):
    y = torch.cat([c[1] for c in clients])
    owner = np.repeat(np.arange(len(clients)), [len(c[1]) for c in clients])
    return ct.target_histograms(y, num_tokens=V), owner


def test_target_histograms_and_tv():
    y = np.array([[0, 1, 1, -100], [2, 2, 2, 2]])
    h = ct.target_histograms(y)
    assert h.tolist() == [[1, 2, 0], [0, 0, 4]]  # ignore_index not counted
    assert ct.target_histograms(np.array([2, 0]), num_tokens=4).tolist() == [[0, 0, 1, 0],
                                                                            [1, 0, 0, 0]]
    assert ct.histogram_tv(np.array([1, 2, 0]), np.array([2, 4, 0])) == 0.0
    assert ct.histogram_tv(np.array([1, 0]), np.array([0, 3])) == 1.0
    assert ct.histogram_tv(np.array([3, 1]), np.array([1, 1])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="integer targets"):
        ct.target_histograms(np.zeros((2, 3)))


def test_size_matched_draws_of_sequences():
    """A sample is a sequence: size-matched draws count sequences and select whole windows."""
    clients = _token_clients()
    sizes = [len(c[1]) for c in clients]
    draws = ct.size_matched_indices(sum(sizes), sizes, draws=3, seed=5)
    groups, info = ct.control_groups(clients, matched_draws=3, seed=5)
    size_groups = [g for g in groups if g.subjects[0].kind == "matched-size"]
    assert [[s.size for s in g.subjects] for g in size_groups] == [[n] * 3 for n in sizes]
    y = torch.cat([c[1] for c in clients])
    for c, g in enumerate(size_groups):
        for d, s in enumerate(g.subjects):
            assert s.name == f"client{c}_size{d}"
            assert torch.equal(s.data[1], y[torch.as_tensor(draws[c][d])])  # whole windows
            assert s.data[0].shape == (sizes[c], T)


def test_histogram_matched_draws_match_better_than_size_matched():
    clients = _token_clients()
    H, owner = _pool_hists(clients)
    sizes = [len(c[1]) for c in clients]
    own = [H[owner == c] for c in range(3)]
    hist = ct.histogram_matched_indices(H, own, draws=4, seed=7)
    size = ct.size_matched_indices(len(H), sizes, draws=4, seed=7)
    for c in range(3):
        target = own[c].sum(0)
        for idx in hist[c]:
            assert len(idx) == sizes[c] and len(np.unique(idx)) == sizes[c]
            assert idx.min() >= 0 and idx.max() < len(H) and np.all(np.diff(idx) > 0)
        tv_hist = [ct.histogram_tv(H[i].sum(0), target) for i in hist[c]]
        tv_size = [ct.histogram_tv(H[i].sum(0), target) for i in size[c]]
        # client 0's tokens 0/1 are rare in the pool: a uniform draw is far from its
        # histogram (TV ≈ 0.4 here), the matched draw close to it
        assert max(tv_hist) < 0.5 * min(tv_size), (c, tv_hist, tv_size)
        assert len({tuple(i) for i in hist[c]}) == 4  # every draw its own subset
    assert max(ct.histogram_tv(H[i].sum(0), own[0].sum(0)) for i in hist[0]) < 0.05
    again = ct.histogram_matched_indices(H, own, draws=4, seed=7)
    assert all(np.array_equal(a, b) for x, y in zip(hist, again) for a, b in zip(x, y))
    other = ct.histogram_matched_indices(H, own, draws=4, seed=8)
    assert not np.array_equal(hist[0][0], other[0][0])


def test_histogram_matched_draws_reach_an_exact_match_when_one_exists():
    """A pool of pure windows (all tokens k) in equal numbers and a client of 2 pure windows
    of token 0 and 2 of token 1: the matched draw must hold two of each (TV 0), which a
    uniform draw of 4 out of 40 windows rarely does."""
    H = np.repeat(np.eye(4, dtype=np.int64) * T, 10, axis=0)
    client = H[[0, 1, 10, 11]]
    for idx in ct.histogram_matched_indices(H, [client], draws=5, seed=0)[0]:
        assert ct.histogram_tv(H[idx].sum(0), client.sum(0)) == 0.0
        assert sorted(np.bincount(idx // 10, minlength=4)) == [0, 0, 2, 2]


def test_histogram_matched_edge_cases_and_errors():
    H = np.ones((5, 3), dtype=np.int64)
    full = ct.histogram_matched_indices(H, [H], draws=2, seed=0)[0]  # the client is the pool
    assert all(np.array_equal(i, np.arange(5)) for i in full)
    with pytest.raises(ValueError, match="more than the 5 available"):
        ct.histogram_matched_indices(H, [np.ones((6, 3), dtype=np.int64)], draws=1, seed=0)
    with pytest.raises(ValueError, match="no counted target token"):
        ct.histogram_matched_indices(H, [np.zeros((2, 3), dtype=np.int64)], draws=1, seed=0)
    with pytest.raises(ValueError, match="proposals and patience"):
        ct.histogram_matched_indices(H, [H[:2]], draws=1, seed=0, proposals=0)


def test_matched_kinds_follow_the_targets():
    labels, tokens = torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.long)
    values = torch.zeros(2, 3)
    assert ct.matched_kinds(labels) == ("matched-size", "matched-label")
    assert ct.matched_kinds(tokens) == ("matched-size", "matched-histogram")
    assert ct.matched_kinds(values) == ("matched-size",)
    assert ct.matched_kinds(tokens, "next-token") == ("matched-size", "matched-histogram")
    assert ct.matched_kinds(labels, "regression") == ("matched-size",)


def test_control_groups_of_next_token_data():
    """Sequence targets get size- and histogram-matched groups (no label-matched one), with
    the achieved TV and the client's own share in ``info``; dict inputs are cut alike."""
    clients = _token_clients()
    groups, info = ct.control_groups(clients, matched_draws=3, nested_sizes=[20], seed=1,
                                     task="next-token")
    kinds = [g.subjects[0].kind for g in groups]
    assert kinds == ["matched-size", "matched-histogram"] * 3 + ["nested"]
    hist = [g for g in groups if g.subjects[0].kind == "matched-histogram"]
    assert [s.name for s in hist[0].subjects] == ["client0_hist0", "client0_hist1",
                                                  "client0_hist2"]
    for c, g in enumerate(hist):
        assert all(s.size == len(clients[c][1]) for s in g.subjects)
        tv_h = [info[s.name]["histogram_tv"] for s in g.subjects]
        tv_s = [info[f"client{c}_size{d}"]["histogram_tv"] for d in range(3)]
        assert max(tv_h) < min(tv_s)
        assert all(0 <= info[s.name]["client_share"] <= 1 for s in g.subjects)
    # the TV in info is the subject's own data against its client's
    s = hist[0].subjects[0]
    want = ct.histogram_tv(ct.target_histograms(s.data[1], V).sum(0),
                           ct.target_histograms(clients[0][1], V).sum(0))
    assert info[s.name]["histogram_tv"] == pytest.approx(want)
    assert np.isnan(info["nested20_0"]["histogram_tv"]) and info["nested20_0"]["client"] == -1
    # same draws with inputs as a dict of tensors
    as_dict = [({"input_ids": x, "mask": torch.ones_like(x)}, y) for x, y in clients]
    g2, _ = ct.control_groups(as_dict, matched_draws=3, seed=1, task="next-token")
    a, b = hist[1].subjects[2], g2[3].subjects[2]
    assert b.kind == "matched-histogram" and torch.equal(a.data[0], b.data[0]["input_ids"])
    assert torch.equal(a.data[1], b.data[1])
    # float targets: size-matched only
    floats = [(x, y.double()) for x, y in clients]
    g3, info3 = ct.control_groups(floats, matched_draws=1, seed=1)
    assert [g.subjects[0].kind for g in g3] == ["matched-size"] * 3
    assert np.isnan(info3["client0_size0"]["histogram_tv"])


# ---- the spec: which matched kind fits which targets ----------------------------------------
NEXT_TOKEN = {
    "study": {"name": "lm", "replicates": 10},
    "train": {"algo": "fedavg", "dataset": "shakespeare", "model": "hf-gpt2",
              "partition": "natural", "clients": 4, "rounds": 2, "save_every": 1},
    "analyze": {"subjects": "server,clients"},
    "controls": {"matched_draws": 3},
    "hypotheses": [
        {"name": "size", "kind": "matched-size", "min_effect": 0.05},
        {"name": "hist", "kind": "matched-histogram", "min_effect": 0.05, "transform": "log"},
    ],
}


def _spec_error(raw) -> str:
    with pytest.raises(ValueError) as err:
        sp.parse_spec(raw, where="s.toml")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    return message


def test_spec_accepts_matched_controls_for_a_next_token_study():
    s = sp.parse_spec(copy.deepcopy(NEXT_TOKEN), where="lm.toml")
    assert s.controls.matched_draws == 3 and s.context().targets == "tokens"
    assert [h.kind for h in s.hypotheses] == ["matched-size", "matched-histogram"]


def test_spec_refuses_the_matched_kind_that_does_not_fit_the_targets():
    raw = copy.deepcopy(NEXT_TOKEN)
    raw["hypotheses"][1]["kind"] = "matched-label"
    msg = _spec_error(raw)
    assert "#2 'hist' (matched-label): matched-label matches class labels" in msg
    assert 'next-token targets' in msg and 'use kind = "matched-histogram"' in msg
    raw = copy.deepcopy(NEXT_TOKEN)
    raw["train"].update(dataset="digits", model="mlp", partition="iid")
    assert 'use kind = "matched-label"' in _spec_error(raw)
    raw["train"].update(dataset="lowrank-lsq", model="linear")
    assert "regression targets" in _spec_error(raw)
    assert "matched-size is the control that applies" in _spec_error(raw)
    raw["hypotheses"] = raw["hypotheses"][:1]  # matched-size fits any targets
    assert sp.parse_spec(raw, where="s.toml").context().targets == "values"
    raw = copy.deepcopy(NEXT_TOKEN)
    raw["controls"]["matched_draws"] = 0
    assert "needs [controls] matched_draws >= 1" in _spec_error(raw)


def test_the_catalog_names_each_loaders_task():
    from hessrank.data.datasets import load_dataset

    for name in ("digits", "gaussian-mixture", "lowrank-lsq", "hetero-lsq"):
        assert load_dataset(name, seed=0).task.name == DATASET_CATALOG[name].task, name
    assert DATASET_CATALOG["shakespeare"].task == "next-token"


# ---- end to end -------------------------------------------------------------------------------
STUDY = """
[study]
name = "tiny_lm"
replicates = 1
[train]
algo = "fedavg"
dataset = "shakespeare"
data_root = "{root}"
dataset_kwargs = {{ min_lines = 5, seq_len = 16 }}
partition = "natural"
clients = 3
model = "hf-gpt2"
model_kwargs = {{ layers = 1, width = 16, heads = 2 }}
rounds = 1
local_steps = 2
batch_size = 8
lr = 0.5
save_every = 1
[analyze]
subjects = "server,clients"
rounds = [1]
matvecs = 10
[controls]
matched_draws = 2
[inference]
phases = [{{ name = "all", lo = 0, hi = 1 }}]
[[hypotheses]]
name = "client_minus_size_matched"
kind = "matched-size"
transform = "log"
min_effect = 0.05
[[hypotheses]]
name = "client_minus_histogram_matched"
kind = "matched-histogram"
transform = "log"
min_effect = 0.05
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers not installed")
def test_a_tiny_next_token_study_with_matched_controls(tmp_path):
    from hessrank.analysis.study import run_study

    plays = tmp_path / "plays"
    plays.mkdir()
    speech = {"KING": "the crown and the realm, my lords", "FOOL": "hey nonny, nonny! ha ha",
              "PAGE": "Yes, sir; at once, sir."}
    body = "\n\n".join(f"**{s}**  \n{w} ({i:02d})" for i in range(30) for s, w in speech.items())
    (plays / "tiny.md").write_text(f"# Tiny\n\n### SCENE I. Here.\n\n{body}\n", encoding="utf-8")
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY.format(root=plays))
    with pytest.warns(UserWarning, match="1 replicate"):
        hyp = run_study(spec, tmp_path / "study", progress=False)
    table = hyp.attrs["table"]
    ctrl = table[table["subject_kind"].isin(["matched-size", "matched-histogram"])]
    assert set(ctrl["subject_kind"]) == {"matched-size", "matched-histogram"}
    assert len(ctrl) == 2 * 3 * 2  # kinds × clients × draws (one replicate, one round)
    clients = table[table["subject_kind"] == "client"].drop_duplicates("subject")
    size_of = dict(zip(clients["subject"].str.removeprefix("client").astype(int),
                       clients["subject_size"]))
    assert (ctrl["subject_size"] == ctrl["client"].map(size_of)).all()
    tv = ctrl.groupby("subject_kind")["histogram_tv"].mean()
    assert tv["matched-histogram"] < tv["matched-size"]
    assert ctrl["client_share"].between(0, 1).all() and (ctrl["value"] >= 1 - 1e-6).all()
    assert set(hyp["hypothesis"]) == {"client_minus_size_matched",
                                      "client_minus_histogram_matched"}
    assert hyp["estimate"].notna().all()
    saved = pd.read_parquet(tmp_path / "study" / "results.parquet")
    assert {"histogram_tv", "client_share"} <= set(saved.columns)
