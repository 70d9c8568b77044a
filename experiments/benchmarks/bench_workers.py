"""``hessrank analyze`` of one trajectory: one process vs ``--workers 2`` vs ``torchrun`` ×2.

Issue 14 asks for the time of ``hessrank analyze`` on the 21 checkpoints of the digits CNN run
with ``--workers 1`` vs ``--workers 2`` (and the measured 1 → 2 process speedup of the
data-parallel ``torchrun`` launch).

1. Train the run of ``bench_trajectory.py`` (FedAvg, digits, ``cnn``, Dirichlet(0.5), 2 local
   epochs, lr 0.1, batch 16, a checkpoint every round): 20 clients × 20 rounds = 21 checkpoints
   (``FULL``; ``--fast``: 2 clients × 4 rounds = 5 checkpoints, one round of contenders).
2. Time three fresh CLI processes (wall clock, start to exit, analysis output removed before
   each) on the same command ``analyze RUN --subjects server,clients --quantities stable-rank
   --matvecs M --threads 2 --quiet``:
   ``workers1`` (one process, 2 torch threads), ``workers2`` (``--workers 2``: two pool
   processes, one thread each, each a shard of the units) and ``torchrun2``
   (``python -m torch.distributed.run --standalone --nproc-per-node 2 -m hessrank analyze ...
   --threads 1``: two gloo ranks, each holding half of every subject's data).
   Contenders run in rounds, the order rotated each round; medians over rounds and the median
   of the per-round ratios to ``workers1`` are reported. The tables are checked: same rows,
   how far the values are from ``workers1``'s (float32; see :func:`check_tables`).

    python experiments/benchmarks/bench_workers.py            # writes results/workers.md
    python experiments/benchmarks/bench_workers.py --fast     # prints only (unless --out)
    python experiments/benchmarks/bench_workers.py --base OLD # before/after, interleaved:
        # every contender with OLD's code and with this checkout's, back to back (order
        # alternating), medians and median per-round ratios; writes results/workers_before_after.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
from bench_trajectory import train_config, train_run  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results" / "workers.md"
BEFORE_AFTER = HERE / "results" / "workers_before_after.md"
FULL = {"clients": 20, "rounds": 20, "matvecs": 10, "repeats": 3}
"""The issue's size: 21 checkpoints of the 20-client run."""
FAST = {"clients": 2, "rounds": 4, "matvecs": 10, "repeats": 1}
CONTENDERS = ("workers1", "workers2", "torchrun2", "threads1")
"""``threads1`` (one process, one thread) shows what the second thread of ``workers1`` buys."""


def argv_of(name: str, run_dir: Path, out: Path, matvecs: int) -> list[str]:
    """The command line of one contender."""
    common = ["analyze", str(run_dir), "--subjects", "server,clients", "--quantities",
              "stable-rank", "--matvecs", str(matvecs), "--out", str(out), "--quiet"]
    if name == "workers1":
        return [sys.executable, "-m", "hessrank", *common, "--threads", "2"]
    if name == "threads1":
        return [sys.executable, "-m", "hessrank", *common, "--threads", "1"]
    if name == "workers2":
        return [sys.executable, "-m", "hessrank", *common, "--threads", "2", "--workers", "2"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "hessrank", *common, "--threads", "1"]


def timed(argv: list[str], out: Path, fresh: bool = True, code: Path = REPO
          ) -> tuple[float, pd.DataFrame]:
    """Wall seconds of one CLI process of ``code`` (a checkout; ``fresh``: OUT removed
    first) and its table."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=code, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, pd.read_parquet(out / "results.parquet")


def check_tables(tables: dict[str, pd.DataFrame]) -> str:
    """Same rows in every table (else exit 1), and how far the values are from ``workers1``'s:
    float32 with another thread count or another data split sums in another order, and an
    estimator's discrete choices (the adaptive Lanczos/probe split, the better of two
    estimates) can flip on such differences, so some rows may move by the estimator's own
    error; the exact equalities are tested in float64 (tests/analysis/test_shards.py,
    test_torchrun.py)."""
    key = ["round", "subject", "quantity", "k"]
    t = {n: df.sort_values(key).reset_index(drop=True) for n, df in tables.items()}
    a, err = t["workers1"]["value"], t["workers1"]["stderr"]
    parts = []
    for name in CONTENDERS[1:]:
        if not t[name][key].equals(t["workers1"][key]):
            raise SystemExit(f"{name}'s table has other rows than workers1's")
        b = t[name]["value"]
        rel = (a - b).abs() / a.abs().clip(lower=1e-12)
        within = int((rel <= 1e-4).sum())
        in_err = float(((a - b).abs() / err.clip(lower=1e-30)).max())
        parts.append(f"`{name}`: {within} of {len(a)} values within 1e-4 relative of "
                     f"`workers1`'s (max {rel.max():.1e} relative; the largest difference "
                     f"is {in_err:.2f} of its row's stderr)")
    return (f"Checked: same rows in every table ({len(a)}). " + "; ".join(parts) + ". Not bit "
            "for bit here: float32 with 2 torch threads vs 1, or with each subject's data "
            "split over two ranks, sums in another order, and the estimator's discrete choices "
            "(adaptive split) can flip on such differences, moving a row by a fraction of its "
            "stderr. In float64 at one thread, `--workers` equals the serial table bit for bit "
            "(tests/analysis/test_shards.py) and torchrun to 1e-10 "
            "(tests/analysis/test_torchrun.py).")


def before_after(base: Path, size: dict, repeats: int, seed: int, out_md: Path | None,
                 command: str) -> str:
    """Every contender with ``base``'s code and with this checkout's, back to back."""
    busy = _timing.busy_cores()
    config = train_config(size["clients"], size["rounds"], seed)
    codes = {"before": base.resolve(), "after": REPO}
    times = {(n, c): [] for n in CONTENDERS for c in codes}
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        run_dir = Path(tmp) / "run"
        run, _ = train_run(config, run_dir)
        for r in range(repeats):
            k = r % len(CONTENDERS)
            for name in CONTENDERS[k:] + CONTENDERS[:k]:
                for c in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    out = Path(tmp) / f"{name}_{c}"
                    wall, _ = timed(argv_of(name, run_dir, out, size["matvecs"]), out,
                                    code=codes[c])
                    times[(name, c)].append(wall)
                    print(f"round {r}: {name} {c} {wall:.1f} s", flush=True)
    busy_after = _timing.busy_cores()
    rows = []
    for name in CONTENDERS:
        b, a = times[(name, "before")], times[(name, "after")]
        ratios = [x / y for x, y in zip(a, b)]
        rows.append([f"`{name}`", f"{_timing.median(b):.1f}", f"{_timing.median(a):.1f}",
                     f"{_timing.median(ratios):.3f}", " / ".join(f"{x:.2f}" for x in ratios)])
    base_rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or str(base)
    new_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# `hessrank analyze` contenders before / after: two checkouts, interleaved",
        "",
        f"{when} — {_timing.machine_line(2)}; other work kept {busy:.1f} cores busy at the "
        f"start and {busy_after:.1f} at the end (a shared machine: each contender's before "
        "and after run back to back, order alternating, contenders rotated, medians).",
        "",
        f"Produced by `{command}`; before = {base_rev}, after = {new_rev}. Run and contenders "
        f"as in `workers.md`: {config.clients} clients, {config.rounds + 1} checkpoints, "
        f"`--matvecs {size['matvecs']}`.",
        "",
        _timing.markdown_table(["contender", "before median s", "after median s",
                                "after / before (median of per-round ratios)",
                                "per-round ratios"], rows),
        "",
    ])
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--fast", action="store_true", help="5 checkpoints, one round")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of the 3 contenders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown output (default {RESULTS.relative_to(REPO)}; none with --fast)")
    ap.add_argument("--base", type=Path, default=None,
                    help="another checkout: every contender before (its code) and after "
                         f"(this one), interleaved; writes {BEFORE_AFTER.relative_to(REPO)}")
    args = ap.parse_args(argv)
    size = FAST if args.fast else FULL
    repeats = args.repeats or size["repeats"]
    if args.base is not None:
        command = shlex.join(["python", "experiments/benchmarks/bench_workers.py",
                              *(argv if argv is not None else sys.argv[1:])])
        out_md = args.out if args.out is not None or args.fast else BEFORE_AFTER
        print(before_after(args.base, size, repeats, args.seed, out_md,
                           command.replace(str(args.base), "OLD")))
        return 0
    out_md = args.out if args.out is not None or args.fast else RESULTS
    command = shlex.join(["python", "experiments/benchmarks/bench_workers.py",
                          *(argv if argv is not None else sys.argv[1:])])
    busy = _timing.busy_cores()
    config = train_config(size["clients"], size["rounds"], args.seed)
    times: dict[str, list[float]] = {n: [] for n in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        run_dir = Path(tmp) / "run"
        run, train_s = train_run(config, run_dir)
        ckpts = len(run.rounds())
        print(f"trained {ckpts} checkpoints in {train_s:.1f} s", flush=True)
        tables = {}
        for r in range(repeats):
            c = len(CONTENDERS)
            order = CONTENDERS[r % c:] + CONTENDERS[:r % c]
            for name in order:
                out = Path(tmp) / name
                wall, tables[name] = timed(argv_of(name, run_dir, out, size["matvecs"]), out)
                times[name].append(wall)
                print(f"round {r}: {name} {wall:.1f} s", flush=True)
        checked = check_tables(tables)
        # the fixed cost of a process: the same command again, every unit already in OUT
        # (imports, reading the run, realizing the subjects, planning; nothing computed)
        out = Path(tmp) / "workers1"
        startup = [timed(argv_of("workers1", run_dir, out, size["matvecs"]), out,
                         fresh=False)[0] for _ in range(3)]
    base = times["workers1"]
    rows = []
    for name in CONTENDERS:
        ratios = [b / t for b, t in zip(base, times[name])]
        rows.append([f"`{name}`", f"{_timing.median(times[name]):.1f}",
                     " / ".join(f"{t:.1f}" for t in times[name]),
                     f"{_timing.median(ratios):.2f}"])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# `hessrank analyze` on one trajectory: 1 process vs `--workers 2` vs torchrun × 2",
        "",
        f"{when} — {_timing.machine_line(2)}; other work kept {busy:.1f} cores busy at the "
        "start (this machine is shared with other jobs: timings are noisy; contenders are "
        "interleaved, order rotated each round, medians reported).",
        "",
        f"Produced by `{command}`. Run: FedAvg on digits, `cnn` (p = 13,706, float32), "
        f"{config.clients} clients (Dirichlet 0.5), {config.rounds} rounds, {ckpts} checkpoints "
        f"(trained in {train_s:.1f} s, not timed). Each contender: `analyze RUN --subjects "
        f"server,clients --quantities stable-rank --matvecs {size['matvecs']} --quiet`, a fresh "
        "process from start to exit; `workers1` `--threads 2`; `workers2` `--threads 2 "
        "--workers 2` (two pool processes, 1 thread each); `torchrun2` `python -m "
        "torch.distributed.run --standalone --nproc-per-node 2 -m hessrank analyze ... "
        "--threads 1` (two gloo ranks, each half of every subject's data); `threads1` one "
        "process, `--threads 1`.",
        "",
        _timing.markdown_table(["contender", "median wall s", "per round s",
                                "speedup vs workers1 (median of per-round ratios)"], rows),
        "",
        f"Fixed cost of one process (the `workers1` command again on its finished OUT: "
        f"imports, reading the run, realizing the subjects, planning; nothing computed): "
        f"median {_timing.median(startup):.1f} s of 3 "
        f"({' / '.join(f'{t:.1f}' for t in startup)}). `--workers 2` pays it in the calling "
        "process (worker 1) and, in parallel, in the one spawned worker; each torchrun rank "
        "pays it too.",
        "",
        checked,
        "",
    ])
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
