"""``hessrank analyze RUN_DIR ...``, ``hessrank plot ANALYSIS_DIR ...`` and ``hessrank merge``.

Every flag is checked before any work (:meth:`AnalysisSettings.validate` and the data checks
of :func:`~hessrank.analysis.executor.open_call`). Errors reach the top-level guard
(:func:`hessrank.clikit.run_command`): a bad flag or input is one line on stderr and exit
status 2; an I/O failure (read-only or full disk) one line and exit 1; ``--debug`` shows the
traceback. A run in which some checkpoints or units failed exits 1 after a summary line
(failures listed in ``OUT/errors.csv``).

The choices and help of ``--quantities`` come from the estimator registry
(:data:`hessrank.analysis.quantities.QUANTITIES`), the defaults from
:class:`~hessrank.analysis.settings.AnalysisSettings`, the subject forms from
:mod:`hessrank.analysis.subjects`; ``--curvature`` is checked against the curvature registry
(:func:`hessrank.curvature.curvature_class`) when the command runs. Building the parser
imports no torch, pandas or numerics, so ``--help`` is fast; the commands import the work
when they run (each such import below says so).
"""

from __future__ import annotations

import argparse
import sys

from hessrank.analysis.quantities import QUANTITIES as _REGISTRY
from hessrank.analysis.settings import AnalysisSettings, default_threads
from hessrank.curvature.registry import curvature_help  # imports no torch

VALID_FORMS = "server, clients, clients:0,3,5, subset:NxD (e.g. subset:50x5), test"
"""The subject forms (tests check them against :data:`hessrank.analysis.subjects.VALID_FORMS`,
which sits beside torch code and cannot be imported for --help)."""
_DEFAULTS = {f.name: f.default for f in AnalysisSettings.__dataclass_fields__.values()}


def _quantities_help() -> str:
    return "comma list of: " + "; ".join(f"{q.name} ({q.help})" for q in _REGISTRY.values())


def _analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    # the analysis itself (torch, pandas): imported when the command runs, keeping --help fast
    from hessrank.analysis.trajectory import run_analysis

    settings = AnalysisSettings.build(
        rounds=args.rounds, subjects=args.subjects, quantities=args.quantities,
        matvecs=args.matvecs, seed=args.seed, curvature=args.curvature, rtol=args.rtol,
        max_matvecs=args.max_matvecs, params=args.params, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, mode=args.mode,
        density_probes=args.density_probes, density_steps=args.density_steps,
        alignment_ranks=args.alignment_ranks, model_factory=args.model_factory,
        data=args.data, loss=args.loss,
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

    # plotting (matplotlib, pandas): imported when the command runs, keeping --help fast
    from hessrank.analysis.plotting import load_table, plot_all
    from hessrank.analysis.store import check_out_dir, refuse_empty

    refuse_empty(args.out)
    load_table(args.analysis_dir)  # no usable table: say so before creating folders
    out = Path(args.out) if args.out else Path(args.analysis_dir) / "figures"
    check_out_dir(out)
    for p in plot_all(args.analysis_dir, out=out, rounds=args.rounds):
        print(p)
    return 0


def _merge(args: argparse.Namespace) -> int:
    # the store (pandas, sqlite): imported when the command runs, keeping --help fast
    from hessrank.analysis.store import merge_dirs

    table = merge_dirs(args.analysis_dirs, args.out)
    print(f"{len(table)} rows -> {args.out}/results.parquet")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze``, ``plot`` and ``merge`` subcommands."""
    a = subparsers.add_parser(
        "analyze", allow_abbrev=False,
        help="Hessian stable ranks/spectra of server, clients, subsets along a run",
        description="Estimate curvature quantities for every saved round and subject. "
                    "Resumable; the table in OUT only grows (--prune drops rows); one run "
                    "per OUT (--force replaces another run's analysis).",
    )
    a.add_argument("run_dir", metavar="RUN_DIR",
                   help="hessrank run directory, or a folder of checkpoints of another "
                        "trainer (with --model): state_dict files or PEFT adapter folders")
    a.add_argument("--rounds", default=None,
                   help="start:stop:step (stop inclusive), or a list 5,10,20 (default: all)")
    d = _DEFAULTS
    a.add_argument("--subjects", default=",".join(d["subjects"]),
                   help=f"comma list of: {VALID_FORMS}")
    a.add_argument("--quantities", default=",".join(d["quantities"]), help=_quantities_help())
    a.add_argument("--curvature", default=d["curvature"], help=curvature_help())
    a.add_argument("--matvecs", type=int, default=d["matvecs"],
                   help="products per operator for the Lanczos family")
    a.add_argument("--rtol", type=float, default=None,
                   help="keep spending products until the stable rank is predicted to be "
                        "within this relative error (e.g. 0.01) in 90%% of runs, up to "
                        "--max-matvecs")
    a.add_argument("--max-matvecs", type=int, default=d["max_matvecs"],
                   help="cap on products with --rtol")
    a.add_argument("--seed", type=int, default=d["seed"])
    a.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis)")
    a.add_argument("--model", "--model-factory", dest="model_factory", default=None,
                   metavar="MODULE:FN",
                   help="checkpoints of another trainer: a function of no arguments returning "
                        "the model (for PEFT adapter folders: the base model); MODULE is "
                        "imported from the working directory")
    a.add_argument("--data", default=None, metavar="MODULE:FN",
                   help="with --model: a function of no arguments returning the clients' "
                        "datasets ([(inputs, targets), ...] or torch Datasets; inputs may be "
                        "tensors, tuples or dicts), optionally with a test set: "
                        "(clients, test) or {'clients': ..., 'test': ...}")
    a.add_argument("--loss", default=None, metavar="MODULE:NAME",
                   help="with --model: the loss, a task or loss_fn(outputs, targets) "
                        "returning the batch mean (default: the dataset's; cross-entropy for "
                        "integer targets of --data)")
    a.add_argument("--dataset", default=None,
                   help="with --model and no --data: a built-in dataset split iid")
    a.add_argument("--clients", type=int, default=None,
                   help="number of iid clients (with --dataset)")
    a.add_argument("--data-root", default=None, help="local data folder (mnist, cifar10, ...)")
    a.add_argument("--params", default=None,
                   help="comma list of parameter names, fnmatch patterns ('*.attn.*') or "
                   "groups: adapters (the LoRA adapters), all (every parameter, frozen base "
                   "included) (default: every trainable parameter — the adapters of a run "
                   "with --adapters peft)")  # fmt: skip
    a.add_argument("--batch-size", type=int, default=None, help="split data into batches")
    a.add_argument("--dtype", default=None, help="float32 or float64 (default: as trained)")
    a.add_argument("--device", default=d["device"], help="cpu or cuda")
    a.add_argument("--mode", default=d["mode"], help="network mode: eval or train")
    a.add_argument("--density-probes", type=int, default=d["density_probes"],
                   help="SLQ probes (density)")
    a.add_argument("--density-steps", type=int, default=None,
                   help="Lanczos steps per SLQ probe (default --matvecs)")
    a.add_argument("--alignment-ranks",
                   default=",".join("full" if r is None else str(r)
                                    for r in d["alignment_ranks"]),
                   help="truncation ranks for alignment; 'full' = full gradient")
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: half the cores, at most 4)")
    a.add_argument("--memory-mb", type=float, default=d["memory_mb"],
                   help="memory for kept linearizations per operator (default 2048); above "
                        "it products are recomputed, streaming over micro-batches")
    a.add_argument("--force", action="store_true",
                   help="OUT holds another run's analysis: replace it")
    a.add_argument("--prune", action="store_true",
                   help="drop the table rows this call does not select")
    a.add_argument("--shard", default=None, metavar="I/N",
                   help="compute only the I-th of N deterministic slices of the (round x "
                        "subject group) units (job arrays writing into one OUT)")
    a.add_argument("--workers", type=int, default=d["workers"],
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
