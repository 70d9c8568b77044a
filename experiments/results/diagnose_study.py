"""Diagnostics of a study's replicates without rerunning its analysis and controls.

    python experiments/results/diagnose_study.py experiments/configs/centralized_digits.toml \\
        --out DIR --replicates 3

Replicate i is retrained exactly as ``hessrank study`` trains it (``[train]`` with seed
``study.seed + i``; training resumes/reuses DIR/replicate_i/run) and diagnosed by
:func:`hessrank.analysis.diagnostics.run_diagnostics` with the spec's ``[diagnostics]`` at the
``[analyze]`` rounds, with the replicate's analysis seed (so subset draw d is the analysis's
draw d). Writes DIR/diagnostics.csv (all replicates, ``replicate`` column) and
DIR/diagnostics_tests.csv (:func:`~hessrank.analysis.diagnostics.reversal_tests` with the
spec's phases). A replicate whose DIR/replicate_i/diagnostics.csv exists is reused.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    from hessrank.analysis import diagnostics as dg
    from hessrank.analysis import study
    from hessrank.fl import train
    from hessrank.io import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--out", required=True)
    ap.add_argument("--replicates", type=int, default=None)
    ap.add_argument("--start", type=int, default=0,
                    help="first replicate (run replicates in parallel processes)")
    ap.add_argument("--combine", action="store_true",
                    help="compute nothing: combine the replicates already diagnosed in --out")
    args = ap.parse_args(argv)
    spec = study.load_spec(args.spec)
    if spec.diagnostics is None:
        print(f"{args.spec} has no [diagnostics] section", file=sys.stderr)
        return 2
    R = args.replicates or spec.replicates
    out = Path(args.out)
    conf = spec.diagnostics_kwargs()
    rounds = conf.pop("rounds", None) or spec.analyze.get("rounds")
    frames = []
    todo = [] if args.combine else range(args.start, R)
    if args.combine:
        found = sorted(out.glob("replicate_*/diagnostics.csv"),
                       key=lambda p: int(p.parent.name.removeprefix("replicate_")))
        frames = [pd.read_csv(p) for p in found]
        if not frames:
            print(f"{out} holds no diagnosed replicate", file=sys.stderr)
            return 2
    for i in todo:
        rep = out / f"replicate_{i}"
        csv = rep / "diagnostics.csv"
        if csv.is_file():
            frames.append(pd.read_csv(csv))
            continue
        run = train({**copy.deepcopy(spec.train), "seed": spec.seed + i}, rep / "run",
                    progress=False)
        t = dg.run_diagnostics(run.path, seed=study.analysis_seed(spec.seed, i), rounds=rounds,
                               progress=True, **conf)
        t = t.assign(replicate=i, train_seed=spec.seed + i)
        atomic_write_text(csv, t.to_csv(index=False))
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    atomic_write_text(out / "diagnostics.csv", table.to_csv(index=False))
    seed = spec.inference.seed if spec.inference.seed is not None else spec.seed
    tests = dg.reversal_tests(table, phases=study.phases_of(spec), last_round=spec.last_round,
                              alpha=spec.inference.alpha, adjust=spec.inference.adjust,
                              seed=seed)
    atomic_write_text(out / "diagnostics_tests.csv", tests.to_csv(index=False))
    print(f"-> {out / 'diagnostics.csv'} and {out / 'diagnostics_tests.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
