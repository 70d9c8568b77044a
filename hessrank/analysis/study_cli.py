"""``hessrank study``: replicated train → analyze → verdicts, a plan, or the spec's schema.

    hessrank study SPEC --out DIR [--replicates R]   run (or resume) the study
    hessrank study SPEC --out DIR --only 0,2,4       compute only these replicates, no tests
    hessrank study SPEC --check                      validate the spec, train nothing
    hessrank study SPEC --plan [--pilot DIR]         replicates × units needed, from a pilot
    hessrank study --schema                          the JSON schema of the spec format

A run prints the verdict table and exits 0 when the study completed (whatever the verdicts
say); ``DIR/hypotheses.csv`` comes with a ``README.md`` that explains every column, verdict and
flag. Verdicts: supported (a one-sided test rejects θ ≤ +δ), reversed (rejects θ ≥ −δ),
negligible (equivalence test rejects |θ| ≥ δ), inconclusive; t-test on the replicate
statistics, Holm over the study (hessrank.analysis.inference).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path

from hessrank.clikit import RawDescriptionHelpFormatter

__all__ = ["register"]


class _HelpWithSpecFormat(argparse.Action):
    """-h/--help: the usual help, then the spec format generated from the spec's models
    (:func:`hessrank.analysis.spec.format_help`). The models are imported only when help is
    asked for: importing pydantic at registration would slow every hessrank command's start."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):  # noqa: A002 (argparse's keyword)
        super().__init__(option_strings, dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from hessrank.analysis.spec import format_help  # pydantic only when help is asked for

        parser.print_help()
        print("\n" + format_help())
        parser.exit()


def _study(args: argparse.Namespace) -> int:
    # the work is imported here, not at registration: `hessrank study --help` stays fast
    if args.schema:
        from hessrank.analysis.spec import json_schema  # keeps --help fast (pydantic)

        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.spec is None:
        raise ValueError("give a study spec (TOML), e.g. experiments/configs/"
                         "centralized_digits.toml, or --schema")
    from hessrank.analysis.spec import load_spec  # keeps --help fast (pydantic)

    spec = load_spec(args.spec)  # the whole spec, before anything trains
    if args.replicates is not None and args.replicates < 1:
        raise ValueError(f"--replicates must be >= 1, got {args.replicates}")
    if args.check:
        print(f"{args.spec}: valid ({len(spec.hypotheses)} hypotheses, "
              f"{args.replicates or spec.replicates} replicates)")
        return 0
    if args.plan:
        from hessrank.analysis.study import format_plan, plan_study  # keeps --help fast

        pilot = args.pilot or args.out
        if pilot is None:
            raise ValueError("--plan reads a pilot study: give --pilot DIR (or --out DIR)")
        plan = plan_study(spec, pilot)
        R = int(plan["n_replicates"].max()) if len(plan) else 0
        K = len(plan.drop_duplicates(["hypothesis", "phase"]))
        print(f"Plan from the pilot in {pilot} ({R} replicates): replicates needed for "
              f"{spec.inference.power:.0%} power at each hypothesis's min_effect, at Holm's "
              f"first-step level alpha/K (K = {K} tests), by units per replicate (1x = the "
              "pilot's); between = variance of the replicate statistic between replicates, "
              "icc = its share.")
        print(format_plan(plan))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required to run a study (rerun with the same --out to "
                         "resume)")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from hessrank.analysis.study import (  # keeps --help fast
        compute_replicates,
        format_verdicts,
        run_study,
    )

    command = "hessrank study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    if args.only is not None:
        only = _indices(args.only)
        timing = compute_replicates(spec, args.out, only, replicates=args.replicates,
                                    progress=not args.quiet, command=command)
        done = ", ".join(str(t["replicate"]) for t in timing)
        print(f"replicate(s) {done} of {args.replicates or spec.replicates} computed in "
              f"{args.out}; rerun without --only (same --out) to test the hypotheses")
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hyp = run_study(spec, args.out, replicates=args.replicates, progress=not args.quiet,
                        command=command)
    for w in caught:
        print(f"hessrank study: warning: {w.message}", file=sys.stderr)
    print(format_verdicts(hyp))
    out = Path(args.out)
    print(f"-> {out / 'hypotheses.csv'} (explained in {out / 'README.md'}) and "
          f"{out / 'results.parquet'}")
    return 0


def _indices(text: str) -> list[int]:
    """``--only``'s replicate indices: comma-separated integers or ranges ``a-b``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise ValueError(f"--only takes replicate indices like 0,2,5-7; got {text!r}") \
                from None
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study", help="replicated study: train, analyze, test hypotheses per training phase",
        description=__doc__, formatter_class=RawDescriptionHelpFormatter,
        allow_abbrev=False, add_help=False,
    )
    p.add_argument("-h", "--help", action=_HelpWithSpecFormat,
                   help="show this help and the spec format, and exit")
    p.add_argument("spec", nargs="?", default=None,
                   help="study spec (TOML), e.g. experiments/configs/centralized_digits.toml")
    p.add_argument("--replicates", type=int, default=None,
                   help="number of replicates (default: the spec's study.replicates)")
    p.add_argument("--out", default=None, help="study directory (rerun to resume)")
    p.add_argument("--only", default=None, metavar="I[,J,A-B]",
                   help="train and analyze only these replicates (0-based), no tests: "
                        "processes or machines sharing --out each compute some; a final run "
                        "without --only reuses them and tests")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true",
                   help="validate the spec (every table, key and hypothesis) and stop")
    p.add_argument("--plan", action="store_true",
                   help="print replicates x units per replicate for the spec's power, from "
                        "the variance components of a pilot or finished study; trains nothing")
    p.add_argument("--pilot", default=None,
                   help="the pilot study directory of --plan (default: --out)")
    p.add_argument("--schema", action="store_true",
                   help="print the JSON schema of the spec format and stop")
    p.set_defaults(func=_study)
