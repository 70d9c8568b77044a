"""Accuracy versus number of clients (issue 11): FedAvg, FedLoRA, FedLoRU, FeDLRT on digits.

Does FedLoRU's advantage over FedAvg grow with the number of clients K (the paper's claim)?
Protocol: each algorithm's learning rate is tuned once (``hessrank.fl.sweep``: K = 10,
Dirichlet 0.5, seed 0, 20 % of the training set as validation, best final val_accuracy on
``--lrs``); then for every K in ``--ks``, partition (iid, Dirichlet 0.5) and seed, each algorithm
trains ``--rounds`` rounds at its tuned lr (same rounds for all) and reports the final test
accuracy and the floats communicated. Table: mean ± sd over seeds, and FedLoRU − FedAvg per K.

Run: ``.venv/bin/python experiments/benchmarks/bench_clients.py [--fast]``; writes
``experiments/benchmarks/results/clients.md``. The full run (4 K × 2 partitions × 4
algorithms × 3 seeds × 30 rounds, plus the sweep) takes hours on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hessrank.fl import TrainConfig, train
from hessrank.fl.sweep import sweep

BASE = {"dataset": "digits", "model": "mlp", "rank": 8, "lora_alpha": 8.0, "merge_every": 5,
        "local_epochs": 1, "batch_size": 32, "save_every": 1000}  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ks", type=_ints, default=[5, 10, 20, 40])
    parser.add_argument("--algos", default="fedavg,fedlora,fedloru,fedlrt")
    parser.add_argument("--lrs", default="0.1,0.3,1.0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fast", action="store_true", help="K 5,10; 1 seed; 5 rounds; 2 lrs")
    args = parser.parse_args(argv)
    if args.fast:
        args.ks, args.seeds, args.rounds, args.lrs = [5, 10], 1, 5, "0.3,1.0"
    algos = args.algos.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            (a, lr): TrainConfig(**{**BASE, "algo": a, "lr": lr, "clients": 10,
                                    "partition": "dirichlet", "rounds": args.rounds,
                                    "validation_fraction": 0.2, "eval_every": args.rounds})
            for a in algos for lr in lrs
        }  # fmt: skip
        tuned_table = sweep(configs, Path(tmp) / "sweep", progress=False)
        best = {a: float(g.loc[g["best"], "lr"].iloc[0]) for a, g in tuned_table.groupby("algo")}
        print("tuned lrs:", best, flush=True)
        results: dict[tuple[str, int, str], list[tuple[float, int]]] = {}
        for k in args.ks:
            for part in ("iid", "dirichlet"):
                for seed in range(args.seeds):
                    for a in algos:
                        cfg = {**BASE, "algo": a, "lr": best[a], "clients": k, "partition": part,
                               "rounds": args.rounds, "seed": seed, "eval_every": args.rounds}
                        out = Path(tmp) / f"{a}-{k}-{part}-{seed}"
                        m = train(cfg, out, progress=False).metrics().iloc[-1]
                        results.setdefault((part, k, a), []).append(
                            (float(m["test_accuracy"]), int(m["cum_floats"])))
                        print(part, k, a, seed, results[part, k, a][-1], flush=True)
    lines = ["| partition | K | " + " | ".join(algos) + " | FedLoRU − FedAvg |",
             "|---|---|" + "---|" * (len(algos) + 1)]
    for part in ("iid", "dirichlet"):
        for k in args.ks:
            cells, means = [], {}
            for a in algos:
                accs = [acc for acc, _ in results[part, k, a]]
                means[a] = statistics.fmean(accs)
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                floats = statistics.fmean(f for _, f in results[part, k, a])
                cells.append(f"{means[a]:.3f} ± {sd:.3f} ({floats:.2e} floats)")
            diff = means.get("fedloru", float("nan")) - means.get("fedavg", float("nan"))
            lines.append(f"| {part} | {k} | " + " | ".join(cells) + f" | {diff:+.3f} |")
    command = " ".join(sys.argv[1:] if argv is None else argv) or "default arguments"
    full = (args.seeds, args.rounds) == (3, 30)
    reduced = "" if full else " (reduced from the full protocol's 3 seeds and 30 rounds)"
    header = (
        f"# Accuracy vs number of clients (bench_clients.py {command})\n\n"
        f"Scale of this run: K {args.ks}, {args.seeds} seed(s), {args.rounds} rounds, lr grid "
        f"{lrs}{reduced}.\n\n"
        f"{datetime.date.today()}; torch {torch.__version__}; 1 thread; digits MLP 64-64, rank "
        f"8, merge every 5, 1 local epoch, batch 32, {args.rounds} rounds, {args.seeds} "
        f"seed(s); lrs tuned on validation (K = 10, Dirichlet): {best}; "
        f"{time.perf_counter() - t0:.0f} s. Cells: final test accuracy mean ± sd over seeds "
        "(total floats communicated).\n\n"
    )
    out = Path(__file__).parent / "results" / "clients.md"
    out.write_text(header + "\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
