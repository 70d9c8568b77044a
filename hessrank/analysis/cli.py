"""``hessrank analyze RUN_DIR ...`` and ``hessrank plot ANALYSIS_DIR ...``.

Bad flags (unknown quantity or subject, malformed rounds) are ValueErrors, which the top-level
dispatcher prints as one line with exit status 2. A run in which some checkpoints or units
failed exits 1 after a summary line; the failures are listed in ``OUT/errors.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Spelled out so that building the parser (and --help) imports no torch; tests/test_cli.py
# checks them against hessrank.analysis.subjects.VALID_FORMS and trajectory.QUANTITIES.
VALID_FORMS = "server, clients, clients:0,3,5, subset:NxD (e.g. subset:50x5), test"
QUANTITIES = ("stable-rank", "top-eig", "trace", "frobenius", "density", "alignment")


def _analyze(args: argparse.Namespace) -> int:
    from hessrank.analysis.subjects import parse_subjects
    from hessrank.analysis.trajectory import analyze, parse_quantities

    quantities = parse_quantities(args.quantities)  # fail fast, before any data is loaded
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    parse_subjects(args.subjects)
    ranks = [None if t.strip() in ("0", "full") else int(t)
             for t in args.alignment_ranks.split(",") if t.strip()]
    table = analyze(
        args.run_dir, rounds=args.rounds, subjects=args.subjects, quantities=quantities,
        matvecs=args.matvecs, seed=args.seed, out=args.out, model_factory=args.model_factory,
        dataset=args.dataset, clients=args.clients, data_root=args.data_root,
        params=args.params.split(",") if args.params else None,
        progress=not args.quiet, batch_size=args.batch_size, dtype=args.dtype,
        device=args.device, mode=args.mode, density_probes=args.density_probes,
        alignment_ranks=ranks,
    )
    out = Path(table.attrs["out"])
    errors = table.attrs["errors"]
    print(f"{len(table)} rows -> {out / 'results.parquet'} and {out / 'results.csv'}")
    if errors:
        rounds = sorted({e["round"] for e in errors})
        print(f"hessrank analyze: {len(errors)} unit(s) failed in rounds {rounds}; see "
              f"{out / 'errors.csv'} (rerun to retry them)", file=sys.stderr)
        return 1
    return 0


def _plot(args: argparse.Namespace) -> int:
    from hessrank.plotting import plot_all

    paths = plot_all(args.analysis_dir, out=args.out, rounds=args.rounds)
    for p in paths:
        print(p)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` and ``plot`` subcommands."""
    a = subparsers.add_parser(
        "analyze", allow_abbrev=False,
        help="Hessian stable ranks/spectra of server, clients, subsets along a run",
        description="Estimate Hessian quantities for every saved round and subject; resumable.",
    )
    a.add_argument("run_dir", metavar="RUN_DIR",
                   help="hessrank run directory, or a directory of state_dict files "
                        "(with --model-factory)")
    a.add_argument("--rounds", default=None,
                   help="start:stop:step (stop inclusive), or a list 5,10,20 (default: all)")
    a.add_argument("--subjects", default="server,clients", help=f"comma list of: {VALID_FORMS}")
    a.add_argument("--quantities", default="stable-rank",
                   help=f"comma list of: {', '.join(QUANTITIES)}")
    a.add_argument("--matvecs", type=int, default=40, help="products per operator (default 40)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis)")
    a.add_argument("--model-factory", default=None, metavar="MODULE:FN",
                   help="for foreign checkpoints: a function returning the model")
    a.add_argument("--dataset", default=None, help="dataset name (with --model-factory)")
    a.add_argument("--clients", type=int, default=None,
                   help="number of iid clients (with --model-factory)")
    a.add_argument("--data-root", default=None, help="local data folder (mnist, cifar10, ...)")
    a.add_argument("--params", default=None, help="comma list of parameter names (default all)")
    a.add_argument("--batch-size", type=int, default=None, help="split data into batches")
    a.add_argument("--dtype", choices=("float32", "float64"), default=None)
    a.add_argument("--device", default=None, help="e.g. cuda (default cpu)")
    a.add_argument("--mode", choices=("eval", "train"), default="eval")
    a.add_argument("--density-probes", type=int, default=4, help="SLQ probes (density)")
    a.add_argument("--alignment-ranks", default="1,2,4,8,full",
                   help="truncation ranks for alignment; 'full' = full gradient")
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a "
                        "shared or small machine)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_analyze)

    p = subparsers.add_parser(
        "plot", allow_abbrev=False, help="figures from an analysis directory",
        description="Stable rank vs round, client/server ratio, densities, eigenvalues, "
                    "alignment; PNG and PDF.",
    )
    p.add_argument("analysis_dir", metavar="ANALYSIS_DIR")
    p.add_argument("--out", default=None, help="figure directory (default ANALYSIS_DIR/figures)")
    p.add_argument("--rounds", default=None,
                   help="rounds for the density plot (start:stop:step or list; default: "
                        "first, middle, last)")
    p.set_defaults(func=_plot)
