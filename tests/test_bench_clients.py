"""The accuracy-vs-clients benchmark (experiments/benchmarks/bench_clients.py): its intervals,
its per-cell and paired summaries, a smoke run, bad input, and the paper figure drawn from
its committed results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.benchmarks.bench_clients import (
    COLUMNS,
    RESULTS_CSV,
    cell_summary,
    main,
    paired_interval,
    paired_summary,
    t_interval,
)
from experiments.figures.make_figures import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def test_t_interval_is_the_textbook_one():
    x = np.array([0.91, 0.88, 0.93])
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    mean, lo, hi = t_interval(x)
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert (lo, hi) == pytest.approx((x.mean() - half, x.mean() + half), abs=1e-12)
    assert math.isnan(t_interval([0.5])[1]) and math.isnan(t_interval([])[0])
    assert t_interval([0.1, 0.1, 0.1]) == (0.1, 0.1, 0.1)  # no spread: a point


def test_paired_interval_is_the_interval_of_the_differences():
    a, b = np.array([0.90, 0.85, 0.95, 0.80]), np.array([0.88, 0.86, 0.90, 0.79])
    assert paired_interval(a, b) == pytest.approx(t_interval(a - b), abs=1e-12)


def test_intervals_cover_at_their_level():
    """95 % intervals over 3 normal seeds cover the true mean in 95 % of 600 draws (binomial
    sd 0.0089: the band ±0.035 is about 4 sd wide), and the paired one the true difference."""
    rng = np.random.default_rng(0)
    draws = 600
    x = rng.normal(0.8, 0.05, size=(draws, 3))
    shared = rng.normal(0.0, 0.05, size=(draws, 3))  # seed effect common to both algorithms
    a = 0.80 + shared + rng.normal(0, 0.01, size=(draws, 3))
    b = 0.78 + shared + rng.normal(0, 0.01, size=(draws, 3))
    single = np.mean([lo <= 0.8 <= hi for _, lo, hi in map(t_interval, x)])
    paired = np.mean([lo <= 0.02 <= hi for _, lo, hi in
                      (paired_interval(p, q) for p, q in zip(a, b))])
    assert abs(single - 0.95) < 0.035 and abs(paired - 0.95) < 0.035


def _runs() -> pd.DataFrame:
    rows = []
    for seed, (avg, loru) in enumerate([(0.90, 0.92), (0.85, 0.86), (0.88, None), (0.80, 0.83)]):
        for algo, acc in (("fedavg", avg), ("fedloru", loru)):
            rows.append({"dataset": "digits", "partition": "dirichlet", "clients": 10,
                         "client_fraction": 1.0, "algo": algo, "seed": seed, "lr": 0.3,
                         "final_test_accuracy": math.nan if acc is None else acc,
                         "floats": 100 if algo == "fedavg" else 60, "rounds": 20,
                         "diverged": acc is None, "seconds": 1.0})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def test_cells_leave_diverged_seeds_out_and_count_them():
    table = cell_summary(_runs())
    assert list(table.columns) == CSV_COLUMNS["accuracy_vs_clients"]
    cells = table.set_index("algo")
    assert cells.loc["fedloru", "seeds"] == 4 and cells.loc["fedloru", "diverged"] == 1
    assert cells.loc["fedloru", "mean"] == pytest.approx(np.mean([0.92, 0.86, 0.83]))
    assert cells.loc["fedavg", "mean"] == pytest.approx(np.mean([0.90, 0.85, 0.88, 0.80]))


def test_paired_difference_uses_the_seeds_both_finished():
    pairs = paired_summary(_runs())
    assert pairs["pairs"].tolist() == [3]
    d = np.array([0.92 - 0.90, 0.86 - 0.85, 0.83 - 0.80])
    assert pairs[["mean", "ci_low", "ci_high"]].iloc[0].tolist() == pytest.approx(
        list(t_interval(d)), abs=1e-12)


@pytest.mark.slow
def test_fast_run_writes_csv_and_table(tmp_path, capsys):
    assert main(["--fast", "--out", str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "clients.csv")
    assert list(runs.columns) == COLUMNS
    # 3 settings (K 2, 4; 8 at C = 0.5) x 4 algorithms x 2 seeds, Dirichlet only
    assert len(runs) == 24 and set(runs["client_fraction"]) == {1.0, 0.5}
    assert (runs["rounds"][~runs["diverged"]] == 2).all()
    md = (tmp_path / "clients.md").read_text()
    assert "| 8 (C = 0.5) |" in md and "FedLoRU − FedAvg" in md and "torch threads 1" in md
    assert "bench_clients.py --fast" in md


def test_bad_sampled_setting_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sampled", "100"])
    assert exit_info.value.code == 2
    assert "--sampled item '100' is not K:C" in capsys.readouterr().err
def test_committed_figure_is_drawn_from_the_committed_results():
    """paper_figures/accuracy_vs_clients.csv is the benchmark's clients.csv summarized: a rerun
    of the benchmark without regenerating the figure makes this fail."""
    runs = pd.read_csv(RESULTS_CSV)
    want = cell_summary(runs[runs["partition"] == "dirichlet"])
    drawn = pd.read_csv(ROOT / "paper_figures" / "accuracy_vs_clients.csv")
    assert list(drawn.columns) == CSV_COLUMNS["accuracy_vs_clients"]
    assert len(drawn) == len(want)
    for col in ("mean", "ci_low", "ci_high"):
        np.testing.assert_allclose(drawn[col], want[col], rtol=1e-5, err_msg=(
            "paper_figures/accuracy_vs_clients is stale: run python experiments/figures/"
            "make_figures.py --out paper_figures --only accuracy_vs_clients"))
    assert drawn["clients"].tolist() == want["clients"].tolist()
