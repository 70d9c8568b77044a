"""Learning-rate sweep: each algorithm's best learning rate on a validation split, over seeds.

A shared learning rate is unfair across algorithms (the LoRA family's α/r scale changes the
effective step), so a comparison first tunes each algorithm's lr on held-out *training* data
(``validation_fraction``), never on the test set, then compares at the tuned rates. One seed
is not enough to tune on: at K = 10 clients a single-seed sweep picked an FedAvg lr that was
unstable on other seeds (issue 23), so every (algorithm, lr) pair is trained with several
seeds (default 0, 1, 2; the seed moves the model init, the split and the batches) and scored
by the mean over them.

``OUT/{algo}_lr{lr}_seed{seed}/`` is one run directory per triple (resumable);
``OUT/sweep.csv`` has one row per triple (val metric at the last round, test accuracy/loss,
floats); ``OUT/summary.csv`` one row per (algo, lr): the number of seeds, the mean, standard
deviation (ddof 1), minimum and maximum of the score over seeds, the number of diverged
seeds and whether the pair is its algorithm's best; ``OUT/best.json`` maps each algorithm to
its best lr. The score is val_accuracy (classification) or −val_loss (regression); a pair
with a diverged seed scores −inf, so an lr that is unstable on any seed is never picked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from hessrank.fl.config import TrainConfig
from hessrank.fl.protocol import NonFiniteError
from hessrank.fl.runner import train
from hessrank.io import atomic_write_text

__all__ = ["summarize", "sweep"]

Key = tuple[str, float, int]


def sweep(
    configs: dict[Key, TrainConfig],
    out: Path,
    *,
    progress: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """Train every config (keyed by (algo, lr, seed)) into ``out``; pick each algorithm's lr
    by the mean score over its seeds (module docstring). ``threads``: torch threads for every
    run (recorded in each run's provenance).

    Returns the per-(algo, lr) summary written to ``out/summary.csv``.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (algo, lr, seed), cfg in configs.items():
        run_dir = out / f"{algo}_lr{lr:g}_seed{seed}"
        row = {"algo": algo, "lr": lr, "seed": seed, "run": str(run_dir), "diverged": False}
        try:
            last = train(cfg, run_dir, progress=progress, threads=threads).metrics().iloc[-1]
        except NonFiniteError:
            rows.append({**row, "diverged": True})
            continue
        for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "cum_floats"):
            row[key] = last.get(key)
        rows.append(row)
    table = pd.DataFrame(rows)
    classification = "val_accuracy" in table and table["val_accuracy"].notna().any()
    score = table["val_accuracy"] if classification else -table.get("val_loss", pd.Series())
    table["score"] = score.where(~table["diverged"], float("-inf")).fillna(float("-inf"))
    summary = summarize(table)
    best = {a: float(lr) for a, lr in summary.loc[summary["best"], ["algo", "lr"]].values}
    atomic_write_text(out / "sweep.csv", table.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "best.json", json.dumps(best, indent=2, sort_keys=True))
    return summary


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (algo, lr) of a per-seed ``table`` (columns algo, lr, seed, score,
    diverged): seeds, mean, std (ddof 1; NaN for one seed), min, max of the score, diverged
    seeds, and ``best`` — the lr with the highest mean per algorithm (ties: the smaller lr).
    A pair with a diverged seed has mean −inf."""
    rows = []
    for (algo, lr), group in table.groupby(["algo", "lr"], sort=True):
        scores = group["score"].astype(float)
        diverged = int(group["diverged"].sum())
        finite = scores[scores > float("-inf")]
        rows.append({
            "algo": algo, "lr": float(lr), "seeds": int(len(group)),
            "mean": float("-inf") if diverged or finite.empty else float(finite.mean()),
            "std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            "min": float(scores.min()), "max": float(scores.max()), "diverged": diverged,
        })  # fmt: skip
    summary = pd.DataFrame(rows)
    summary["best"] = False
    for _, group in summary.groupby("algo"):
        summary.loc[group["mean"].idxmax(), "best"] = True  # first max: the smaller lr
    return summary
