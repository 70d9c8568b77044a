"""Same command, same table: this checkout's ``hessrank analyze`` against another checkout's.

Issue 21 (analysis engine split) asks that the tables stay bit-identical to those of the code
before the split for the same command. This script trains one small run with this checkout,
then runs each scenario — a sequence of ``hessrank analyze`` / ``hessrank merge`` command lines
into one analysis directory — twice in fresh processes, once with ``--base``'s code on
``PYTHONPATH`` and once with this checkout's, and compares:

- ``results.parquet``: every column but ``seconds`` (the wall time of the estimator call,
  which no two runs share), values and dtypes, exactly;
- ``results.csv``: the text of every column but ``seconds``, character for character;
- the SLQ tridiagonals behind every ``effective-rank`` row (``units/<unit>.npz`` in a
  format-2 directory, the store in format 3), bit for bit;
- the number of rows each ``analyze`` call reported.

    python experiments/benchmarks/compare_engine.py --base /path/to/old/checkout
    python experiments/benchmarks/compare_engine.py --base OLD --only default,workers

Writes ``experiments/benchmarks/results/engine_identity.md`` (``--out``), or prints only with
``--fast`` (three scenarios).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results" / "engine_identity.md"
RUN_CONFIG = {
    "algo": "fedavg", "dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [8]},
    "clients": 3, "partition": "dirichlet", "dirichlet_alpha": 0.5, "rounds": 2,
    "save_every": 1, "local_steps": 2, "seed": 0,
}
"""The small run every scenario analyzes (3 clients, label-skewed, rounds 0..2)."""

A = ["--matvecs", "10", "--quiet"]
SCENARIOS: dict[str, list[list[str]]] = {
    "default": [["analyze", "RUN", "--out", "OUT", *A]],
    "everything": [["analyze", "RUN", "--out", "OUT", "--subjects",
                    "server,clients,subset:20x2,test", "--quantities",
                    "stable-rank,top-eig,trace,frobenius,density,alignment",
                    "--density-probes", "2", "--alignment-ranks", "1,full", *A]],
    "grow-and-prune": [["analyze", "RUN", "--out", "OUT", "--rounds", "0", *A],
                       ["analyze", "RUN", "--out", "OUT", "--rounds", "1,2", "--seed", "1",
                        "--quantities", "stable-rank,top-eig", *A],
                       ["analyze", "RUN", "--out", "OUT", "--rounds", "0:2", *A],
                       ["analyze", "RUN", "--out", "OUT", "--rounds", "2", "--prune", *A]],
    "rtol-float64-ggn": [["analyze", "RUN", "--out", "OUT", "--rtol", "0.05", "--dtype",
                          "float64", "--curvature", "ggn", "--subjects", "server,subset:15x2",
                          *A]],
    "workers": [["analyze", "RUN", "--out", "OUT", "--workers", "2", "--threads", "2",
                 "--subjects", "server,clients,subset:10x2", *A]],
    "shards-and-merge": [["analyze", "RUN", "--out", "OUT_a", "--shard", "1/2", "--quantities",
                          "stable-rank,density", "--density-probes", "2", *A],
                         ["analyze", "RUN", "--out", "OUT_b", "--shard", "2/2", "--quantities",
                          "stable-rank,density", "--density-probes", "2", *A],
                         ["merge", "OUT_a", "OUT_b", "--out", "OUT"]],
    "torchrun": [["torchrun", "analyze", "RUN", "--out", "OUT", "--dtype", "float64",
                  "--threads", "1", "--subjects", "server,clients,subset:11x1", *A]],
}
FAST = ("default", "everything", "workers")


def _argv(step: list[str], run: Path, out: Path) -> list[str]:
    def sub(a: str) -> str:
        if a == "RUN":
            return str(run)
        if a.startswith("OUT"):
            return str(out) + a[3:]
        return a

    args = [sub(a) for a in step]
    if args[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "hessrank", *args[1:]]
    return [sys.executable, "-m", "hessrank", *args]


def run_scenario(code: Path, steps: list[list[str]], run: Path, out: Path) -> list[str]:
    """Run the steps with ``code`` first on PYTHONPATH; the 'N rows' line of every step."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    shutil.rmtree(out, ignore_errors=True)
    for suffix in ("_a", "_b"):
        shutil.rmtree(str(out) + suffix, ignore_errors=True)
    said = []
    for step in steps:
        argv = _argv(step, run, out)
        p = subprocess.run(argv, cwd=code, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} (code {code}) exited {p.returncode}:\n"
                             f"{p.stderr[-3000:]}")
        said += [ln.split(";")[0].replace(str(out), "OUT") for ln in p.stdout.splitlines()
                 if "rows" in ln]
    return said


def _densities(out: Path, table: pd.DataFrame) -> dict[tuple, tuple]:
    """(round, subject, settings) → (alpha, beta, meta) of every effective-rank row, whatever
    the directory's format."""
    rows = table[table["quantity"] == "effective-rank"]
    found = {}
    db = out / "store.sqlite"
    if db.is_file():
        import sqlite3

        con = sqlite3.connect(db)
        blobs = {k: b for k, b in con.execute("SELECT key, densities FROM units")}
        con.close()
    for r in rows.itertuples():
        if db.is_file():
            z = np.load(io.BytesIO(blobs[r.unit]))
        else:
            z = np.load(out / "units" / f"{r.unit}.npz")
        found[(r.round, r.subject, r.settings)] = tuple(
            np.asarray(z[f"{r.subject}.{p}"]) for p in ("alpha", "beta", "meta"))
    return found


ORDER = ["round", "subject", "quantity", "k", "layer", "settings"]


def compare(base: Path, new: Path, ignore: tuple[str, ...] = ()) -> tuple[bool, str]:
    """(identical, what was compared / what differs); ``ignore``: columns left out besides
    ``seconds`` (keys whose definition changed on purpose: then rows are compared in the
    order of what they mean, since the table is sorted by unit key within a round)."""
    drop = ["seconds", *ignore]
    full_a = pd.read_parquet(base / "results.parquet")
    full_b = pd.read_parquet(new / "results.parquet")
    ca = pd.read_csv(base / "results.csv", dtype=str, keep_default_na=False)
    cb = pd.read_csv(new / "results.csv", dtype=str, keep_default_na=False)
    if ignore:
        full_a, full_b = (t.sort_values(ORDER).reset_index(drop=True) for t in (full_a, full_b))
        ca, cb = (t.sort_values(ORDER).reset_index(drop=True) for t in (ca, cb))
    a, b = full_a.drop(columns=drop), full_b.drop(columns=drop)
    problems = []
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True, check_dtype=True)
    except AssertionError as err:
        problems.append("parquet: " + " ".join(str(err).split())[:300])
    if not ca.drop(columns=drop).equals(cb.drop(columns=drop)):
        problems.append("csv text differs")
    da, db = _densities(base, full_a), _densities(new, full_b)
    if da.keys() != db.keys() or any(
            not all(np.array_equal(x, y) for x, y in zip(da[k], db[k])) for k in da):
        problems.append("densities differ")
    what = (f"{len(a)} rows × {a.shape[1]} columns (all but {', '.join(drop)}), CSV text, "
            f"{len(da)} density tridiagonals")
    return not problems, what + ("" if not problems else "; DIFFERENT: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--base", type=Path, required=True,
                    help="a checkout of the code to compare against (its repository root)")
    ap.add_argument("--only", default=None, help=f"comma list of: {', '.join(SCENARIOS)}")
    ap.add_argument("--fast", action="store_true", help=f"only {', '.join(FAST)}; prints only")
    ap.add_argument("--ignore", default="",
                    help="comma list of columns to leave out besides seconds (e.g. unit, when "
                         "the unit keys gained an ingredient)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown output (default {RESULTS.relative_to(REPO)}; none with "
                         "--fast)")
    args = ap.parse_args(argv)
    names = (args.only.split(",") if args.only else list(FAST if args.fast else SCENARIOS))
    bad = [n for n in names if n not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; valid: {', '.join(SCENARIOS)}")
    out_md = args.out if args.out is not None or args.fast or args.only else RESULTS
    base_rev = subprocess.run(["git", "-C", str(args.base), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "(no git)"
    new_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    rows, ok_all = [], True
    with tempfile.TemporaryDirectory(prefix="compare_engine_") as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(REPO))
        import hessrank.fl as fl

        run = tmp / "run"
        fl.train(RUN_CONFIG, run, progress=False)
        for name in names:
            said_a = run_scenario(args.base.resolve(), SCENARIOS[name], run, tmp / "base")
            said_b = run_scenario(REPO, SCENARIOS[name], run, tmp / "new")
            ok, what = compare(tmp / "base", tmp / "new",
                               tuple(c for c in args.ignore.split(",") if c))
            ok = ok and said_a == said_b
            ok_all &= ok
            cmds = "<br>".join(f"`hessrank {' '.join(s)}`" for s in SCENARIOS[name])
            rows.append([name, cmds, what + ("" if said_a == said_b else
                                             f"; reported rows {said_a} vs {said_b}"),
                         "**identical**" if ok else "**DIFFERENT**"])
            print(f"{name}: {'identical' if ok else 'DIFFERENT'} — {what}", flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    only = f" --only {args.only}" if args.only else ""
    text = "\n".join([
        "# Analysis tables: this checkout against the code before the engine split",
        "",
        f"{when} — {_timing.machine_line(1)}. Produced by `python "
        f"experiments/benchmarks/compare_engine.py --base BASE{only}` with BASE a checkout "
        f"of {base_rev}, this checkout at {new_rev}.",
        "",
        "Run: FedAvg on digits, MLP (hidden 8), 3 clients (Dirichlet 0.5), rounds 0–2, trained "
        "once; every scenario is run in fresh processes with each code on `PYTHONPATH` into a "
        "fresh directory (`OUT`, `OUT_a`, `OUT_b`), then the directories are compared.",
        "",
        _timing.markdown_table(["scenario", "commands", "compared", "result"], rows),
        "",
        (("Every scenario's table is identical: same rows in the same order, every value "
          "and dtype, the CSV text and the stored densities." if not args.ignore else
          f"Every scenario's table is identical but for {args.ignore}: same rows (compared in "
          "the order of what they mean, since the export sorts by unit key within a round), "
          "every other value and dtype, the CSV text and the stored densities.")
         if ok_all else "Some scenario differs (see the table)."),
        "",
    ])
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
    print(text)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
