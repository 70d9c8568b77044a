"""Floats communicated per client per round vs FedAvg, as the factorized layers get wider.

The counts are deterministic (no timing): one short run per (width, algorithm) on digits,
rank 8, every hidden Linear factorized except the first and the classifier (the default).
Writes experiments/benchmarks/results/communication.md.

    python experiments/benchmarks/bench_communication.py [--fast]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hessrank.fl import train

RESULTS = Path(__file__).parent / "results" / "communication.md"


def per_client(floats: dict) -> float:
    return sum(floats.values()) / len(floats)


def measure(hidden: tuple[int, ...], algo: str, work: Path) -> tuple[float, float]:
    config = dict(algo=algo, dataset="digits", model="mlp", model_kwargs={"hidden": list(hidden)},
                  clients=4, rounds=2, save_every=2, rank=8, r_max=8, local_steps=1, seed=0)
    run = train(config, work / f"{algo}-{'x'.join(map(str, hidden))}", progress=False)
    last = run.metrics().iloc[-1]
    return per_client(last["floats_up"]), per_client(last["floats_down"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--fast", action="store_true", help="two widths only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    widths = [(64, 64), (256, 256)] if args.fast else [(64, 64), (256, 256), (512, 512, 512)]
    lines = [
        "# Communication per client per round, relative to FedAvg",
        "",
        "digits, MLP with the given hidden widths, rank 8 (FeDLRT: r_max 8), 4 clients, round 2;",
        "factorized: every hidden Linear but the first and the classifier (the default).",
        "",
        "| hidden widths | algorithm | floats up | floats down | up / FedAvg | down / FedAvg |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in widths:
            base = None
            for algo in ("fedavg", "fedloru", "fedlrt"):
                up, down = measure(hidden, algo, Path(tmp))
                base = base or (up, down)
                lines.append(f"| {'-'.join(map(str, hidden))} | {algo} | {up:.0f} | {down:.0f} "
                             f"| {up / base[0]:.3f} | {down / base[1]:.3f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
