"""Do analysis bits depend on the torch thread count? (issue 19, item 3)

The unit keys of ``hessrank analyze`` hold the thread count exactly when the numbers depend on
it (:func:`hessrank.analysis.planner.thread_key`). This script measures it: it trains two small
runs (an MLP and a CNN on digits, 4 clients) and analyzes each at 1 and at 2 torch threads,
in float32 and in float64 (server, clients and two 50-sample subsets; stable rank, top
eigenvalues and the SLQ density; 20 products), then counts the values that are bit-identical
across the two thread counts and the largest relative difference.

    python experiments/benchmarks/measure_threads.py     # writes results/threads.md

Each analysis runs in a fresh process (``python -m hessrank analyze ... --threads T``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results" / "threads.md"
RUNS = {
    "mlp": {"algo": "fedavg", "dataset": "digits", "model": "mlp",
            "model_kwargs": {"hidden": [32]}, "clients": 4, "partition": "iid", "rounds": 1,
            "save_every": 1, "local_steps": 2, "seed": 0},
    "cnn": {"algo": "fedavg", "dataset": "digits", "model": "cnn", "clients": 4,
            "partition": "dirichlet", "dirichlet_alpha": 0.5, "rounds": 1, "save_every": 1,
            "local_epochs": 1, "lr": 0.1, "batch_size": 16, "seed": 0},
}
ARGS = ["--rounds", "1", "--subjects", "server,clients,subset:50x2", "--quantities",
        "stable-rank,top-eig,density", "--density-probes", "2", "--matvecs", "20", "--quiet"]


def analyze(run: Path, out: Path, threads: int, dtype: str | None) -> pd.DataFrame:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-m", "hessrank", "analyze", str(run), "--out", str(out),
            "--threads", str(threads), *ARGS, *(["--dtype", dtype] if dtype else [])]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    key = ["round", "subject", "quantity", "k"]
    return pd.read_parquet(out / "results.parquet").sort_values(key).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown output")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import hessrank.fl as fl

    busy = _timing.busy_cores()
    rows = []
    with tempfile.TemporaryDirectory(prefix="measure_threads_") as tmp:
        for name, config in RUNS.items():
            run = Path(tmp) / name
            fl.train(config, run, progress=False)
            for dtype in (None, "float64"):
                a = analyze(run, Path(tmp) / f"{name}_{dtype}_1", 1, dtype)
                b = analyze(run, Path(tmp) / f"{name}_{dtype}_2", 2, dtype)
                va, vb = a["value"].to_numpy(), b["value"].to_numpy()
                same = (va == vb) | (np.isnan(va) & np.isnan(vb))
                rel = np.nanmax(np.abs(va - vb) / np.maximum(np.abs(va), 1e-300))
                rows.append([name, dtype or "float32", len(va), int(same.sum()), f"{rel:.1e}"])
                print(rows[-1], flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    depends = any(r[3] < r[2] for r in rows)
    text = "\n".join([
        "# Analysis bits at 1 vs 2 torch threads",
        "",
        f"{when} — {_timing.machine_line(2)}; other work kept {busy:.1f} cores busy at the "
        "start. Produced by `python experiments/benchmarks/measure_threads.py`.",
        "",
        "Each run (FedAvg on digits, 4 clients, round 1) analyzed twice in fresh processes, "
        f"`hessrank analyze RUN {' '.join(ARGS)} --threads T` with T = 1 and T = 2 (and "
        "`--dtype float64` for the float64 rows); values compared row by row.",
        "",
        _timing.markdown_table(["model", "dtype", "rows", "bit-identical values",
                                "max relative difference"], rows),
        "",
        ("The numbers depend on the thread count (intra-op reductions sum in another order), "
         "so the unit keys hold it (`hessrank.analysis.planner.thread_key`)." if depends else
         "No value depended on the thread count here."),
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
