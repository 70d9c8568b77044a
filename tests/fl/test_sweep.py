"""Issue 11 #6-#7: validation split, per-client held-out data, per-algorithm lr sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hessrank.cli import main
from hessrank.fl import train
from hessrank.fl.sweep import summarize

from .test_runner import tiny


def test_validation_and_client_holdout_are_never_trained_on(tmp_path):
    run = train(tiny(algo="pfedloru", validation_fraction=0.2, client_holdout=0.25, rounds=2),
                tmp_path / "r", progress=False)  # fmt: skip
    part = run.partition()
    val = np.asarray(part.params["validation_indices"])
    holdout = [np.asarray(h) for h in part.params["holdout_indices"]]
    n = run.dataset().train_x.shape[0]
    assert len(val) == round(0.2 * n)
    everything = np.concatenate([val, *holdout, *part.indices])
    assert np.array_equal(np.sort(everything), np.arange(n))  # disjoint, covering
    for idx, h in zip(part.indices, holdout):
        assert len(h) == round(0.25 * (len(idx) + len(h)))
    assert [len(x) for x, _ in run.client_data()] == part.sizes()  # training samples only
    last = run.metrics().iloc[-1]
    assert 0 <= last["val_accuracy"] <= 1 and 0 <= last["holdout_accuracy_mean"] <= 1
    per_client = last["client_holdout_accuracy"]
    assert sorted(per_client) == [str(c) for c in range(4)]
    assert last["holdout_accuracy_mean"] == np.mean(list(per_client.values()))


def test_sweep_picks_each_algorithms_lr_on_the_mean_over_seeds(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--out", str(out), "--algos", "fedavg,fedlora", "--lrs", "0.01,0.5",
                 "--clients", "3", "--rounds", "3", "--partition", "iid", "--local-steps", "3",
                 "--model-kwargs", '{"hidden": [16, 16]}', "--rank", "4", "--quiet",
                 "--threads", "1"])  # fmt: skip
    assert code == 0
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 12 and table["val_accuracy"].notna().all()  # 2 algos x 2 lrs x 3 seeds
    assert sorted(set(table["seed"])) == [0, 1, 2]
    runs = {(r.algo, r.lr, r.seed): r for r in table.itertuples()}
    assert len({runs["fedavg", 0.5, s].val_accuracy for s in (0, 1, 2)}) > 1  # seeds differ
    summary = pd.read_csv(out / "summary.csv")
    best = json.loads((out / "best.json").read_text())
    assert set(best) == {"fedavg", "fedlora"}
    for row in summary.itertuples():
        scores = table[(table["algo"] == row.algo) & (table["lr"] == row.lr)]["val_accuracy"]
        assert row.seeds == 3 and np.isclose(row.mean, scores.mean())
        assert np.isclose(row.std, scores.std(ddof=1)) and row.min == scores.min()
    for algo, lr in best.items():
        rows = summary[summary["algo"] == algo]
        assert rows.loc[rows["mean"].idxmax(), "lr"] == lr
    printed = capsys.readouterr().out
    assert "fedlora" in printed and "std" in printed
    for run in table["run"]:  # --threads reaches every run (issue 19: sweep had none)
        sessions = json.loads((Path(run) / "provenance.json").read_text())["sessions"]
        assert [s["threads"] for s in sessions] == [1]


def test_summary_picks_the_mean_not_one_seed_and_never_an_unstable_lr():
    """Seed 0 alone would pick lr 0.3 (0.95); the mean over three seeds picks 0.1; lr 1.0 has
    the best seed of all but diverged on another, so it scores -inf."""
    rows = [("fedavg", 0.1, s, v) for s, v in enumerate([0.90, 0.91, 0.92])]
    rows += [("fedavg", 0.3, s, v) for s, v in enumerate([0.95, 0.60, 0.70])]
    rows += [("fedavg", 1.0, s, v) for s, v in enumerate([0.99, float("-inf"), 0.97])]
    table = pd.DataFrame(rows, columns=["algo", "lr", "seed", "score"])
    table["diverged"] = table["score"] == float("-inf")
    summary = summarize(table).set_index("lr")
    assert summary["best"].tolist() == [True, False, False]
    assert np.isclose(summary.loc[0.1, "mean"], 0.91) and np.isclose(summary.loc[0.1, "std"], 0.01)
    assert summary.loc[1.0, "mean"] == float("-inf") and summary.loc[1.0, "diverged"] == 1
    assert summary.loc[1.0, "max"] == 0.99 and np.isclose(summary.loc[1.0, "std"], 0.01 * 2**0.5)


def test_sweep_flag_errors(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--algos", "fedsgd", "--lrs", "0.1"]) != 0
    assert main(["sweep", "--out", str(tmp_path), "--algos", "fedavg", "--lrs", "-1"]) != 0
    assert main(["sweep", "--out", str(tmp_path), "--algos", "fedavg", "--lrs", "0.1",
                 "--lr", "0.2"]) != 0  # fmt: skip
    assert main(["sweep", "--out", str(tmp_path), "--algos", "fedavg", "--lrs", "0.1",
                 "--validation-fraction", "0"]) != 0  # fmt: skip
    assert main(["sweep", "--out", str(tmp_path), "--algos", "fedavg", "--lrs", "0.1",
                 "--threads", "0"]) != 0  # fmt: skip
    assert "validation-fraction" in capsys.readouterr().err
    for bad in ("0,0,1", "-1,2"):
        assert main(["sweep", "--out", str(tmp_path), "--algos", "fedavg", "--lrs", "0.1",
                     f"--seeds={bad}"]) != 0  # fmt: skip
        assert "--seeds must be distinct" in capsys.readouterr().err
    assert main(["sweep", "--out", str(tmp_path), "--algos", "fedavg", "--lrs", "0.1",
                 "--seed", "3"]) != 0  # fmt: skip
    assert "not --seed" in capsys.readouterr().err
