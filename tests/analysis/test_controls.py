"""Controls that isolate sample size: index draws, label entropy, the rank regression."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hessrank.analysis import controls as ct


def test_size_and_label_matched_draws():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=300)
    clients = [y[:40], y[40:100]]
    size_m = ct.size_matched_indices(300, [40, 60], draws=3, seed=1)
    assert [[len(i) for i in c] for c in size_m] == [[40] * 3, [60] * 3]
    assert all(len(np.unique(i)) == len(i) for c in size_m for i in c)
    assert not np.array_equal(size_m[0][0], size_m[0][1])
    again = ct.size_matched_indices(300, [40, 60], draws=3, seed=1)
    assert all(np.array_equal(a, b) for c, d in zip(size_m, again) for a, b in zip(c, d))
    label_m = ct.label_matched_indices(y, clients, draws=2, seed=1)
    for c, draws in enumerate(label_m):
        want = np.bincount(clients[c], minlength=5)
        for idx in draws:
            assert np.array_equal(np.bincount(y[idx], minlength=5), want)
            assert len(np.unique(idx)) == len(idx)
    with pytest.raises(ValueError, match="class"):
        ct.label_matched_indices(y[:10], clients, draws=1, seed=0)


def test_nested_subsets_are_nested():
    chain = ct.nested_indices(200, [100, 25, 50], seed=3)
    assert list(chain) == [25, 50, 100]
    assert set(chain[25]) <= set(chain[50]) <= set(chain[100])
    other = ct.nested_indices(200, [25], seed=3, draw=1)
    assert not np.array_equal(chain[25], other[25])
    with pytest.raises(ValueError, match="1..200"):
        ct.nested_indices(200, [0, 10], seed=0)


def test_label_entropy():
    assert ct.label_entropy(np.arange(10)) == pytest.approx(math.log(10))
    assert ct.label_entropy(np.zeros(7)) == pytest.approx(0.0)


def test_rank_regression_recovers_the_size_effect_at_fixed_entropy():
    # log srank = 1 − 0.5 log n + 0.8 H + replicate shift + noise: n and H correlated, so a
    # regression on log n alone would be biased; the joint fit must recover −0.5.
    rng = np.random.default_rng(1)
    rows = []
    for rep in range(6):
        shift = rng.normal(0, 0.1)
        for _ in range(60):
            n = rng.choice([25, 50, 100, 200, 400])
            H = 0.3 * np.log(n) + rng.normal(0, 0.3)
            v = math.exp(1 - 0.5 * math.log(n) + 0.8 * H + shift + rng.normal(0, 0.1))
            rows.append({"replicate": rep, "round": int(rng.integers(0, 2)), "value": v,
                         "subject_size": n, "label_entropy": H, "quantity": "stable-rank"})
    fit = ct.rank_regression(pd.DataFrame(rows)).set_index("term")
    assert fit.loc["log_n", "ci_low"] < -0.5 < fit.loc["log_n", "ci_high"]
    assert fit.loc["label_entropy", "ci_low"] < 0.8 < fit.loc["label_entropy", "ci_high"]
    assert fit.loc["log_n", "cov_type"] == "cluster" and fit.loc["log_n", "n_clusters"] == 6
    with pytest.raises(ValueError, match=">= 4 rows"):
        ct.rank_regression(pd.DataFrame(rows[:2]))


def test_analyze_controls_on_a_run(trained_run):
    from hessrank.analysis.subjects import draw_subset
    from hessrank.fl.rundir import RunDir

    t = ct.analyze_controls(trained_run, rounds=[0, 2], matched_draws=2, nested_sizes=[10, 40],
                            nested_draws=1, matvecs=10, seed=0)
    run = RunDir(trained_run)
    sizes = [int(y.shape[0]) for _, y in run.client_data()]
    assert set(t["subject_kind"]) == {"matched-size", "matched-label", "nested"}  # labels
    assert list(t.columns[-4:]) == list(ct.CONTROL_COLUMNS)
    label = t[t["subject_kind"] == "matched-label"]
    assert (label["histogram_tv"] == 0).all()  # the client's label histogram exactly
    assert (t.loc[t["subject_kind"] == "matched-size", "histogram_tv"] > 0).all()
    assert t.loc[t["subject_kind"] != "nested", "client_share"].between(0, 1).all()
    ms = t[(t["subject_kind"] == "matched-size") & (t["round"] == 0)]
    assert len(ms) == 2 * len(sizes)
    assert (ms["subject_size"].to_numpy() == np.repeat(sizes, 2)).all()
    assert np.isfinite(t["value"]).all() and (t["value"] >= 1 - 1e-6).all()
    # entropy of subset rows of an analyze table is recomputed from their data seed
    table = pd.DataFrame([{"subject": "subset10_0", "subject_kind": "subset",
                           "subject_size": 10, "data_seed": 5}])
    y = np.concatenate([y.numpy() for _, y in run.client_data()])
    got = ct.subject_label_entropy(table, run.client_data()).iloc[0]
    assert got == pytest.approx(ct.label_entropy(y[draw_subset(len(y), 10, 5)]))


def test_matched_controls_of_sequence_targets_match_sizes_and_histograms():
    """Next-token targets (n, T) have no class label per sample: label matching would index
    flattened token positions, so sequences get size- and token-histogram-matched controls
    (tests/analysis/test_controls_sequences.py tests them in depth)."""
    clients = [(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))] * 2
    groups, info = ct.control_groups(clients, matched_draws=1)
    assert [g.subjects[0].kind for g in groups] == ["matched-size", "matched-histogram"] * 2
    assert all(s.data[1].shape == (4, 3) for g in groups for s in g.subjects)
    assert info["client1_hist0"]["histogram_tv"] == 0.0  # one token everywhere
    groups, _ = ct.control_groups(clients, nested_sizes=[2])  # nested controls still work
    assert [g.subjects[0].size for g in groups] == [2]


def test_an_interrupted_controls_call_resumes_at_its_first_unfinished_round(trained_run,
                                                                            tmp_path,
                                                                            monkeypatch):
    kw = dict(rounds=[0, 1, 2], matched_draws=1, matvecs=10, seed=0)
    whole = ct.analyze_controls(trained_run, out=tmp_path / "whole", **kw)
    assert not (tmp_path / "whole" / "rounds").exists()  # scratch removed once finished
    # interrupted during round 1: round 0's rows are kept, nothing final is written
    calls = {"n": 0}
    real = ct.stable_rank
    groups = len(whole[whole["round"] == 0].groupby("seed"))

    def dies_in_round_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > groups:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ct, "stable_rank", dies_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        ct.analyze_controls(trained_run, out=tmp_path / "cut", **kw)
    assert not (tmp_path / "cut" / "controls.parquet").exists()
    assert [p.name for p in sorted((tmp_path / "cut" / "rounds").glob("*.parquet"))] == [
        "round_0.parquet"]
    # the rerun computes rounds 1 and 2 only and gives the uninterrupted table
    calls["n"] = -10**6
    monkeypatch.setattr(ct, "stable_rank", lambda *a, **k: (calls.__setitem__(
        "n", calls["n"] + 1), real(*a, **k))[1])
    resumed = ct.analyze_controls(trained_run, out=tmp_path / "cut", **kw)
    assert calls["n"] == -10**6 + 2 * groups
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"),
                                  whole.drop(columns="seconds"))
    # parts written under other settings are not reused
    stale = tmp_path / "cut" / "rounds"
    stale.mkdir()
    (stale / "settings.json").write_text('{"other": 1}')
    whole[whole["round"] == 0].to_parquet(stale / "round_0.parquet", index=False)
    again = ct.analyze_controls(trained_run, out=tmp_path / "cut", **{**kw, "matvecs": 12})
    assert (again["matvecs"] == 12).all() and not stale.exists()


def test_controls_are_keyed_by_checkpoint_content_so_a_copied_run_keeps_them(trained_run,
                                                                           tmp_path,
                                                                           monkeypatch):
    """The checkpoints key the stored controls by their content hashes, not their files'
    modification times: a copy of the run (new times) reuses them; a table stored under the
    former key (times) is reused, and its key rewritten, only while the times match."""
    import json
    import os
    import shutil

    from hessrank.fl.rundir import RunDir

    kw = dict(rounds=[0, 2], matched_draws=1, matvecs=10, seed=0)
    first = ct.analyze_controls(trained_run, out=tmp_path / "ctl", **kw)
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)  # copies the bytes; new modification times below
    for f in (copy / "checkpoints").iterdir():
        os.utime(f, ns=(1, 1))
    shutil.copytree(tmp_path / "ctl", tmp_path / "ctl_copy")

    def must_not_run(*a, **k):
        raise AssertionError("recomputed")

    real = ct.stable_rank
    monkeypatch.setattr(ct, "stable_rank", must_not_run)
    again = ct.analyze_controls(copy, out=tmp_path / "ctl_copy", **kw)
    pd.testing.assert_frame_equal(again, first)
    # the former key: modification times of the same files
    key = tmp_path / "ctl_copy" / "controls.json"
    new = json.loads(key.read_text())
    times = [RunDir(copy).checkpoint_path(r).stat().st_mtime_ns for r in kw["rounds"]]
    key.write_text(json.dumps({**new, "checkpoints": times}))
    pd.testing.assert_frame_equal(ct.analyze_controls(copy, out=tmp_path / "ctl_copy", **kw),
                                  first)
    assert json.loads(key.read_text()) == new  # rewritten with the content hashes
    # former-key times that do not match the files: not reused
    key.write_text(json.dumps({**new, "checkpoints": [t + 1 for t in times]}))
    calls = {"n": 0}
    monkeypatch.setattr(ct, "stable_rank", lambda *a, **k: (calls.__setitem__(
        "n", calls["n"] + 1), real(*a, **k))[1])
    ct.analyze_controls(copy, out=tmp_path / "ctl_copy", **kw)
    assert calls["n"] > 0
