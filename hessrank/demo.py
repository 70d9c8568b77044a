"""``make demo``: the main job on the embedded default data, end to end, in about a minute.

1. Train a FedLoRU federation on scikit-learn's digits (20 clients, Dirichlet(0.5) label split).
2. At every saved round, estimate the stable rank srank(H) = ‖H‖_F²/‖H‖₂² (± stderr) of every
   client's loss, of the server's loss (all training data) and of random 50-sample subsets,
   with the joint FederatedOperator (all clients' products in one batched call).
3. Write the tidy table and the figures, and print what they show — computed from the numbers.

``python -m hessrank.demo --fast`` is a ~30-second version with fewer rounds and clients.

Torch runs single-threaded (``--threads 1``): for these small models a second intra-op thread
does not pay, and on a loaded two-core machine two threads made the fast demo take 86 s
instead of about 20 s (OpenMP threads waiting on each other).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hessrank.clikit import (
    ArgumentParser,
    RawDescriptionHelpFormatter,
    format_number,
    one_line_warnings,
    run_command,
)

if TYPE_CHECKING:
    import pandas as pd

FULL = dict(clients=20, rounds=30, save_every=5, matvecs=40, subsets="subset:50x3")
FAST = dict(clients=6, rounds=4, save_every=2, matvecs=24, subsets="subset:50x2")


def run_config(clients: int, rounds: int, save_every: int, seed: int) -> dict:
    """The federation under study: FedLoRU on digits, MLP 64-64-64-10, rank 8, merge every 5."""
    return dict(
        algo="fedloru", dataset="digits", model="mlp", clients=clients, partition="dirichlet",
        dirichlet_alpha=0.5, rounds=rounds, save_every=save_every, local_epochs=2, lr=0.1,
        batch_size=16, rank=8, lora_alpha=8.0, merge_every=5, seed=seed,
    )


SHOWN = {
    "round": "round", "server": "server", "server_stderr": "±", "client_mean": "client mean",
    "client_min": "min", "client_max": "max", "ratio": "ratio", "ratio_stderr": "ratio ±",
    "frac_clients_above_2se": "above", "frac_clients_below_2se": "below",
    "subset50_mean": "subset50", "verdict": "verdict",
}
"""Columns of the printed table (the CSV keeps all) and their headers. above / below: the
share of clients more than 2 combined standard errors above / below the server."""


def summarize(table: pd.DataFrame, metrics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per round: the shared client-vs-server summary
    (:func:`hessrank.analysis.inference.client_vs_server_summary`: server srank ± stderr,
    client mean, range, ratio ± delta-method stderr, shares of clients more than 2 combined
    stderr above / below the server), the mean of the random 50-sample subsets, and a verdict
    by majority of clients; with the text that reports them."""
    import numpy as np

    # here: `hessrank --help` imports this module, and these import torch
    from hessrank.analysis.inference import client_vs_server_summary

    per_round = client_vs_server_summary(table)
    sr = table[table["quantity"] == "stable-rank"]
    subsets = sr[sr["subject_kind"] == "subset"].groupby("round")["value"].mean()
    per_round["subset50_mean"] = per_round["round"].map(subsets).astype(float)
    per_round["verdict"] = np.select(
        [per_round["frac_clients_above_2se"] > 0.5, per_round["frac_clients_below_2se"] > 0.5],
        ["client > server", "client < server"], default="mixed",
    )
    acc = metrics.dropna(subset=["test_accuracy"]).iloc[-1]["test_accuracy"]

    def rounds_with(label: str) -> str:
        rs = per_round.loc[per_round["verdict"] == label, "round"].astype(int).tolist()
        return ", ".join(map(str, rs)) if rs else "none"

    text = (
        f"FedLoRU reached test accuracy {acc:.3f}. Over {len(per_round)} saved rounds the mean "
        f"client stable rank was {per_round['ratio'].min():.2f}–{per_round['ratio'].max():.2f}× "
        "the server's. A majority of clients lay more than 2 standard errors above the server "
        f"at rounds {rounds_with('client > server')}, and more than 2 below at rounds "
        f"{rounds_with('client < server')} (mixed: {rounds_with('mixed')}). Random 50-sample "
        f"subsets averaged {np.nanmean(per_round['subset50_mean'] / per_round['server']):.2f}× "
        "the server's stable rank. The hypothesis that client Hessians have higher stable rank "
        "than the server's "
        + ("holds at every saved round of this run."
           if (per_round["verdict"] == "client > server").all()
           else "does not hold along the whole trajectory of this run.")
        + " (Per-round description; `hessrank study` tests it across replicates.)"
    )
    return per_round, text


def run(args: argparse.Namespace) -> int:
    """Train, analyze, plot and summarize (the module doc's steps 1–3)."""
    import pandas as pd
    import torch

    # here: `hessrank --help` imports this module, and these import torch
    from hessrank.analysis.plotting import plot_all
    from hessrank.analysis.trajectory import analyze
    from hessrank.fl import train

    torch.set_num_threads(args.threads)
    bars = sys.stderr.isatty()  # tqdm bars on a terminal only; a log gets the step lines
    size = FAST if args.fast else FULL
    t0 = time.perf_counter()
    print(f"[1/3] training FedLoRU on digits: {size['clients']} clients, {size['rounds']} rounds",
          flush=True)
    run = train(run_config(size["clients"], size["rounds"], size["save_every"], args.seed),
                args.out / "run", progress=bars)
    print("[2/3] client vs server Hessian spectra at every saved round", flush=True)
    analysis = args.out / "analysis"
    table = analyze(run.path, subjects=f"server,clients,{size['subsets']}",
                    quantities="stable-rank,top-eig", matvecs=size["matvecs"], seed=args.seed,
                    out=analysis, progress=bars)
    print("[3/3] figures", flush=True)
    figures = plot_all(analysis, args.out / "figures")
    per_round, text = summarize(table, run.metrics())
    per_round.to_csv(args.out / "summary.csv", index=False)
    with pd.option_context("display.width", 120):
        shown = per_round[list(SHOWN)].rename(columns=SHOWN)
        print(shown.to_string(index=False, float_format=lambda v: format_number(v, 4)))
    print()
    print(text)
    print(f"\ntable:   {analysis / 'results.csv'}\nsummary: {args.out / 'summary.csv'}")
    for f in figures:
        if f.suffix == ".png":
            print(f"figure:  {f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m hessrank.demo", description=__doc__,
                            formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="output directory")
    parser.add_argument("--fast", action="store_true",
                        help="fewer clients, rounds and matvecs: about 30 s")
    parser.add_argument("--seed", type=int, default=0, help="training and estimator seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for these small models)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        build_parser().error(f"--threads must be >= 1, got {args.threads}")
    with one_line_warnings("hessrank demo"):
        return run_command("hessrank demo", run, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
