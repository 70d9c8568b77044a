"""Learning-rate sweep: each algorithm's best learning rate on a validation split.

A shared learning rate is unfair across algorithms (the LoRA family's α/r scale changes the
effective step), so a comparison first tunes each algorithm's lr on held-out *training* data
(``validation_fraction``), never on the test set, then compares at the tuned rates.

``OUT/{algo}_lr{lr}/`` is one run directory per pair (resumable); ``OUT/sweep.csv`` has one row
per pair (algo, lr, val metric at the last round, test accuracy/loss, floats); ``OUT/best.json``
maps each algorithm to its best lr (highest val_accuracy, or lowest val_loss for regression;
a diverged run scores worst).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from hessrank.fl.config import TrainConfig
from hessrank.fl.protocol import NonFiniteError
from hessrank.fl.runner import train
from hessrank.io import atomic_write_text

__all__ = ["sweep"]


def sweep(
    configs: dict[tuple[str, float], TrainConfig],
    out: Path,
    *,
    progress: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """Train every config (keyed by (algo, lr)) into ``out`` and pick each algorithm's best lr.
    ``threads``: torch threads for every run (recorded in each run's provenance).

    Returns the table written to ``out/sweep.csv`` with a ``best`` column.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (algo, lr), cfg in configs.items():
        run_dir = out / f"{algo}_lr{lr:g}"
        row = {"algo": algo, "lr": lr, "run": str(run_dir), "diverged": False}
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
    best = {a: float(g.loc[g["score"].idxmax(), "lr"]) for a, g in table.groupby("algo")}
    table["best"] = [best[a] == lr for a, lr in zip(table["algo"], table["lr"])]
    atomic_write_text(out / "sweep.csv", table.to_csv(index=False))
    atomic_write_text(out / "best.json", json.dumps(best, indent=2, sort_keys=True))
    return table
