"""Run every ``bench_*.py`` beside this file, one after another, each writing its
``results/*.md``; then print a one-line summary per script.

    python experiments/benchmarks/run_all.py              # full runs (tens of minutes)
    python experiments/benchmarks/run_all.py --fast       # every script's --fast smoke test
    python experiments/benchmarks/run_all.py --only hvp,peers --threads 2

Scripts run in fresh processes with the same interpreter, ``--threads`` (passed to the scripts
that take it; by default each keeps its own: 1 for the timing comparisons — on a shared 2-core
machine two threads measured 5–20× noisier — 2 for bench_estimators.py, which counts matvecs,
and for bench_trajectory.py, whose target is stated for 2 cores) and ``--fast`` passed through.
A script that fails does not stop the others; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(only: str | None) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {f"bench_{name.strip().removeprefix('bench_').removesuffix('.py')}.py"
                  for name in only.split(",")}
        missing = wanted - {p.name for p in found}
        if missing:
            raise SystemExit(f"no such benchmark: {', '.join(sorted(missing))}; available: "
                             f"{', '.join(p.name for p in found)}")
        found = [p for p in found if p.name in wanted]
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="pass --fast to every script")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every script (default: each script's own)")
    ap.add_argument("--only", default=None, help="comma list, e.g. hvp,peers")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    summary = []
    for path in scripts(args.only):
        source = path.read_text()
        cmd = [sys.executable, str(path)]
        if args.threads is not None and '"--threads"' in source:  # most take --threads
            cmd += ["--threads", str(args.threads)]
        if args.fast:
            cmd.append("--fast")
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=HERE.parent.parent).returncode
        summary.append((path.name, rc, time.perf_counter() - t0))
    print("\n== summary")
    for name, rc, secs in summary:
        print(f"{name:24s} {'ok' if rc == 0 else f'FAILED (exit {rc})':16s} {secs:7.0f} s")
    return int(any(rc != 0 for _, rc, _ in summary))


if __name__ == "__main__":
    sys.exit(main())
