"""FeDLRT's floats vs accuracy with and without a rank cap, against FedAvg (issue 23).

Setting: digits, the default MLP (64-64 hidden; the 64×64 layer fc2 factorized, starting at
rank 8) and a wide one (512-512 hidden, fc2 512×512: a large factorized layer, at lr 0.3),
K = 20 clients, Dirichlet 0.5, ROUNDS rounds of one local epoch (batch 32), full
correction, ϑ = 0.02 (hessrank's defaults), at lr 0.3 and 1.0 (the same lr for every
variant; at hessrank's default lr 0.05 the rank never leaves 8), seeds 0..SEEDS-1.
Variants: FedAvg; FeDLRT with r_max 64 (the default); with ``rank_cap = "fedavg"``
(``hessrank.fl.fedlrt.fedavg_rank_cap``: 14 for 64×64); with r_max 8 (the rank frozen at
its start). Reported per lr and variant: mean ± sd over seeds of the final test accuracy,
the cumulative floats relative to FedAvg's, and the final ranks of fc2.

Run: ``.venv/bin/python experiments/benchmarks/bench_fedlrt_cap.py [--rounds R] [--seeds S]``
(about a minute); writes ``experiments/benchmarks/results/fedlrt_cap.md`` (``--fast``: a
smoke test that writes nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hessrank.fl import train

RESULTS = Path(__file__).resolve().parent / "results" / "fedlrt_cap.md"
SETTINGS = (  # (width of the MLP's two hidden layers, lr)
    (64, 0.3), (64, 1.0),
    (512, 0.3),  # a large factorized layer (512×512): where low rank saves most
)
VARIANTS = {
    "FedAvg": {"algo": "fedavg"},
    "FeDLRT, r_max 64 (default)": {"algo": "fedlrt"},
    "FeDLRT, rank_cap fedavg": {"algo": "fedlrt", "rank_cap": "fedavg"},
    "FeDLRT, r_max 8": {"algo": "fedlrt", "r_max": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fast", action="store_true",
                        help="smoke test: 3 rounds, 1 seed, printed only (results untouched)")
    args = parser.parse_args()
    if args.fast:
        args.rounds, args.seeds = 3, 1
    torch.set_num_threads(1)
    start = time.perf_counter()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, lr in SETTINGS:
            results: dict[str, list[tuple[float, int, int]]] = {v: [] for v in VARIANTS}
            for seed in range(args.seeds):
                for i, (name, change) in enumerate(VARIANTS.items()):
                    cfg = {"dataset": "digits", "model": "mlp",
                           "model_kwargs": {"hidden": [width, width]}, "clients": 20,
                           "rounds": args.rounds, "lr": lr, "rank": 8, "seed": seed,
                           "save_every": 10**6, "eval_every": args.rounds, **change}  # fmt: skip
                    out = Path(tmp) / f"w{width}-lr{lr}-v{i}-s{seed}"
                    last = train(cfg, out, progress=False, threads=1).metrics().iloc[-1]
                    rank = int(last["ranks"].get("fc2", 0)) if last["ranks"] else 0
                    results[name].append(
                        (float(last["test_accuracy"]), int(last["cum_floats"]), rank))
                    print(f"{width} lr {lr} seed {seed} {name}: {results[name][-1]}",
                          file=sys.stderr)  # fmt: skip
            fedavg = [f for _, f, _ in results["FedAvg"]]
            for name, rows in results.items():
                acc = [a for a, _, _ in rows]
                ratio = [f / fa for (_, f, _), fa in zip(rows, fedavg)]
                ranks = sorted({r for _, _, r in rows})
                sd = statistics.stdev if len(rows) > 1 else (lambda _: float("nan"))
                table.append(f"| {width}×{width} | {lr:g} | {name} | "
                             f"{statistics.mean(acc):.3f} ± {sd(acc):.3f} | "
                             f"{statistics.mean(ratio):.3f} ± {sd(ratio):.3f} | "
                             f"{', '.join(map(str, ranks)) if ranks != [0] else '—'} |")
    lines = [
        "# FeDLRT: floats vs accuracy with a rank cap",
        "",
        f"digits MLP (hidden w-w, fc2 w×w factorized from rank 8), K = 20, Dirichlet 0.5, "
        f"{args.rounds} rounds of one local epoch, full correction, ϑ = 0.02; "
        f"{args.seeds} seeds (mean ± sd); floats relative to FedAvg's of the same seed and lr; "
        f"final ranks over the seeds. torch {torch.__version__}, 1 thread, "
        f"{time.perf_counter() - start:.0f} s in all. Written by "
        "experiments/benchmarks/bench_fedlrt_cap.py.",
        "",
        "| fc2 | lr | variant | test accuracy | floats / FedAvg's | final rank of fc2 |",
        "|---|---|---|---|---|---|",
        *table,
    ]
    if not args.fast:
        RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
