"""FeDLRT on the digits CNN: why the plain truncated-SVD init sat at chance, and the fix.

Setting of issue 11 #4: digits, CNN (conv2 and fc1 factorized at rank 8), K = 20 clients,
Dirichlet 0.5, 30 rounds of one local epoch (batch 32), full correction, uniform client
weights. For each learning rate on the grid: FedAvg; FeDLRT with the old defaults
(``fedlrt_init="svd"``, ϑ = 0.1), with the scaled init alone, and with the new defaults
(``"scaled-svd"``, ϑ = 0.02); final test accuracy and final ranks. Each algorithm's best lr
is its tuned accuracy. Also the MLP (64-64, fc2 factorized) at the same grid.

Run: ``.venv/bin/python experiments/benchmarks/bench_fedlrt_init.py [--fast]``; appends a
section to ``experiments/benchmarks/results/trainer.md``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

from hessrank.fl import train

VARIANTS = {
    "fedavg": {"algo": "fedavg"},
    "fedlrt svd ϑ=0.1 (old)": {"algo": "fedlrt", "fedlrt_init": "svd", "trunc_theta": 0.1},
    "fedlrt scaled-svd ϑ=0.1": {"algo": "fedlrt", "fedlrt_init": "scaled-svd", "trunc_theta": 0.1},
    "fedlrt scaled-svd ϑ=0.02 (new)": {"algo": "fedlrt", "fedlrt_init": "scaled-svd",
                                        "trunc_theta": 0.02},
}


def run(model: str, variant: str, lr: float, rounds: int, root: Path) -> tuple[float, dict]:
    cfg = {"dataset": "digits", "model": model, "clients": 20, "partition": "dirichlet",
           "rounds": rounds, "lr": lr, "rank": 8, "save_every": 1000, "eval_every": rounds,
           **VARIANTS[variant]}  # fmt: skip
    out = root / f"{model}-{variant.replace(' ', '_')}-{lr}"
    m = train(cfg, out, progress=False, resume=False).metrics()
    return float(m["test_accuracy"].iloc[-1]), m["ranks"].iloc[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="10 rounds, lr 1.0 only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 10 if args.fast else 30
    lrs = (1.0,) if args.fast else (0.3, 1.0)
    lines = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("cnn", "mlp"):
            best: dict[str, tuple[float, float]] = {}
            for lr in lrs:
                for variant in VARIANTS:
                    acc, ranks = run(model, variant, lr, rounds, Path(tmp))
                    lines.append(f"| {model} | {variant} | {lr} | {acc:.3f} | {ranks or ''} |")
                    print(lines[-1], flush=True)
                    if acc > best.get(variant, (-1.0, 0.0))[0]:
                        best[variant] = (acc, lr)
            tuned = ", ".join(f"{v} {a:.3f} (lr {lr})" for v, (a, lr) in best.items())
            lines.append(f"| {model} | **tuned** | | {tuned} | |")
    header = (
        f"\n## FeDLRT initialization (bench_fedlrt_init.py{' --fast' if args.fast else ''})\n\n"
        f"{datetime.date.today()}; torch {torch.__version__}; 1 thread; digits, K = 20 "
        f"(Dirichlet 0.5), {rounds} rounds, 1 local epoch, batch 32, rank 8, full correction, "
        f"uniform weights; {time.perf_counter() - t0:.0f} s.\n\n"
        "| model | algorithm | lr | final test acc. | final ranks |\n|---|---|---|---|---|\n"
    )
    out = Path(__file__).parent / "results" / "trainer.md"
    with open(out, "a") as fh:
        fh.write(header + "\n".join(lines) + "\n")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
