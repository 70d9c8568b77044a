"""``hessrank study SPEC --replicates R --out DIR``: replicated train → analyze → verdicts.

See :mod:`hessrank.analysis.study` for the spec format and the output directory. Prints the
verdict table; exits 0 when the study completed (whatever the verdicts say).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

__all__ = ["register"]


def _study(args: argparse.Namespace) -> int:
    from hessrank.analysis.study import format_verdicts, load_spec, run_study

    spec = load_spec(args.spec)  # fail fast on a bad spec, before anything trains
    if args.replicates is not None and args.replicates < 1:
        raise ValueError(f"--replicates must be >= 1, got {args.replicates}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    command = "hessrank study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hyp = run_study(spec, args.out, replicates=args.replicates, progress=not args.quiet,
                        command=command)
    for w in caught:
        print(f"hessrank study: warning: {w.message}", file=sys.stderr)
    print(format_verdicts(hyp))
    print(f"-> {Path(args.out) / 'hypotheses.csv'} and {Path(args.out) / 'results.parquet'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study", help="replicated study: train, analyze, test hypotheses per training phase",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("spec",
                   help="study spec (TOML), e.g. experiments/configs/centralized_digits.toml")
    p.add_argument("--replicates", type=int, default=None,
                   help="number of replicates (default: the spec's study.replicates)")
    p.add_argument("--out", required=True, help="study directory (rerun to resume)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_study)
