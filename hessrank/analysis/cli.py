"""``hessrank analyze RUN_DIR ...`` and ``hessrank plot ANALYSIS_DIR ...``.

Every flag is checked before any work (:meth:`AnalysisSettings.validate` and the data checks
of :func:`~hessrank.analysis.trajectory.run_analysis`). Errors reach the top-level guard
(:func:`hessrank.clikit.run_command`): a bad flag or input is one line on stderr and exit
status 2; an I/O failure (read-only or full disk) one line and exit 1; ``--debug`` shows the
traceback. A run in which some checkpoints or units failed exits 1 after a summary line
(failures listed in ``OUT/errors.csv``).

This module imports no torch, pandas or analysis code at module level, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

from hessrank.curvature.registry import curvature_help  # imports no torch

# Spelled out so that building the parser (and --help) imports no torch; tests check them
# against hessrank.analysis.subjects.VALID_FORMS and the quantity registry.
VALID_FORMS = "server, clients, clients:0,3,5, subset:NxD (e.g. subset:50x5), test"
QUANTITIES = ("stable-rank", "top-eig", "trace", "frobenius", "density", "alignment")


def _analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hessrank.analysis.settings import AnalysisSettings, default_threads
    from hessrank.analysis.trajectory import run_analysis

    settings = AnalysisSettings.build(
        rounds=args.rounds, subjects=args.subjects, quantities=args.quantities,
        matvecs=args.matvecs, seed=args.seed, curvature=args.curvature, rtol=args.rtol,
        max_matvecs=args.max_matvecs, params=args.params, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, mode=args.mode,
        density_probes=args.density_probes, density_steps=args.density_steps,
        alignment_ranks=args.alignment_ranks, model_factory=args.model_factory,
        dataset=args.dataset, clients=args.clients, data_root=args.data_root,
        threads=args.threads if args.threads is not None else default_threads(),
        memory_mb=args.memory_mb,
        progress=not args.quiet, force=args.force, prune=args.prune, shard=args.shard,
        workers=args.workers,
    )
    table = run_analysis(args.run_dir, settings, out=args.out, command=sys.argv)
    if table.attrs.get("rank", 0) != 0:
        return 0  # under torchrun rank 0 reports (and writes); the others only computed
    out = Path(table.attrs["out"])
    errors = table.attrs["errors"]
    print(f"{len(table)} rows selected by this call; table -> {out / 'results.parquet'} and "
          f"{out / 'results.csv'}")
    if errors:
        rounds = sorted({e["round"] for e in errors})
        print(f"hessrank analyze: {len(errors)} unit(s) failed in rounds {rounds}; see "
              f"{out / 'errors.csv'} (rerun to retry them)", file=sys.stderr)
        return 1
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hessrank.analysis.store import check_out_dir
    from hessrank.plotting import load_table, plot_all

    load_table(args.analysis_dir)  # no table: say how to make one, before creating folders
    out = Path(args.out) if args.out else Path(args.analysis_dir) / "figures"
    check_out_dir(out)
    for p in plot_all(args.analysis_dir, out=out, rounds=args.rounds):
        print(p)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from hessrank.analysis.store import merge_dirs

    table = merge_dirs(args.analysis_dirs, args.out)
    print(f"{len(table)} rows -> {args.out}/results.parquet")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` and ``plot`` subcommands."""
    a = subparsers.add_parser(
        "analyze", allow_abbrev=False,
        help="Hessian stable ranks/spectra of server, clients, subsets along a run",
        description="Estimate curvature quantities for every saved round and subject. "
                    "Resumable; the table in OUT only grows (--prune drops rows); one run "
                    "per OUT (--force replaces another run's analysis).",
    )
    a.add_argument("run_dir", metavar="RUN_DIR",
                   help="hessrank run directory, or a directory of state_dict files "
                        "(with --model-factory)")
    a.add_argument("--rounds", default=None,
                   help="start:stop:step (stop inclusive), or a list 5,10,20 (default: all)")
    a.add_argument("--subjects", default="server,clients", help=f"comma list of: {VALID_FORMS}")
    a.add_argument("--quantities", default="stable-rank",
                   help=f"comma list of: {', '.join(QUANTITIES)}")
    a.add_argument("--curvature", default="hessian", help=curvature_help())
    a.add_argument("--matvecs", type=int, default=40,
                   help="products per operator for the Lanczos family")
    a.add_argument("--rtol", type=float, default=None,
                   help="keep spending products until the stable rank is predicted to be "
                        "within this relative error (e.g. 0.01) in 90%% of runs, up to "
                        "--max-matvecs")
    a.add_argument("--max-matvecs", type=int, default=400,
                   help="cap on products with --rtol")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis)")
    a.add_argument("--model-factory", default=None, metavar="MODULE:FN",
                   help="for foreign checkpoints: a function of no arguments returning the model")
    a.add_argument("--dataset", default=None, help="dataset name (with --model-factory)")
    a.add_argument("--clients", type=int, default=None,
                   help="number of iid clients (with --model-factory)")
    a.add_argument("--data-root", default=None, help="local data folder (mnist, cifar10, ...)")
    a.add_argument("--params", default=None, help="comma list of parameter names (default all)")
    a.add_argument("--batch-size", type=int, default=None, help="split data into batches")
    a.add_argument("--dtype", default=None, help="float32 or float64 (default: as trained)")
    a.add_argument("--device", default="cpu", help="cpu or cuda")
    a.add_argument("--mode", default="eval", help="network mode: eval or train")
    a.add_argument("--density-probes", type=int, default=4, help="SLQ probes (density)")
    a.add_argument("--density-steps", type=int, default=None,
                   help="Lanczos steps per SLQ probe (default --matvecs)")
    a.add_argument("--alignment-ranks", default="1,2,4,8,full",
                   help="truncation ranks for alignment; 'full' = full gradient")
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: half the cores, at most 4)")
    a.add_argument("--memory-mb", type=float, default=2048.0,
                   help="memory for kept linearizations per operator (default 2048); above "
                        "it products are recomputed, streaming over micro-batches")
    a.add_argument("--force", action="store_true",
                   help="OUT holds another run's analysis: replace it")
    a.add_argument("--prune", action="store_true",
                   help="drop the table rows this call does not select")
    a.add_argument("--shard", default=None, metavar="I/N",
                   help="compute only the I-th of N deterministic slices of the (round x "
                        "subject group) units (job arrays writing into one OUT)")
    a.add_argument("--workers", type=int, default=1,
                   help="processes in a local pool, each a shard with its share of --threads")
    a.add_argument("--quiet", action="store_true", help="no progress")
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

    m = subparsers.add_parser(
        "merge", allow_abbrev=False, help="merge analysis directories of one run",
        description="Union of the tables (no duplicate, no lost row), units and call records "
                    "of analysis directories of the same run; refuses different runs.",
    )
    m.add_argument("analysis_dirs", metavar="ANALYSIS_DIR", nargs="+")
    m.add_argument("--out", required=True, help="the merged analysis directory")
    m.set_defaults(func=_merge)
