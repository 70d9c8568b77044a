"""Trajectory analysis end to end: stable rank of server + every client at every checkpoint.

The target (performance issue): "a 20-checkpoint analysis of a digits CNN run (server + 20
clients, stable rank at 40 matvecs) finishes in minutes on 2 cores — give the number."

1. Train FedAvg on scikit-learn's digits with the ``cnn`` model, 20 clients, Dirichlet(0.5)
   label split, 20 rounds of 2 local epochs (lr 0.1, batch 16, as the demo), a checkpoint
   every round (rounds 0..20: 21 checkpoints), through :func:`hessrank.fl.runner.train`.
   Training is timed but is not part of the target.
2. Run ``hessrank analyze RUN --subjects server,clients --quantities stable-rank --matvecs 40
   --threads 2 --quiet`` in a fresh process (default operator settings; no density, alignment
   or subsets) and time its wall clock from process start to exit: imports, loading data and
   checkpoints, building operators, the estimator, writing the table. The process is the
   ordinary CLI (``python -m hessrank.cli``); the product route each checkpoint's operator
   reported is read from the table's ``route`` column.

Reported: checkpoints, Hessians estimated (checkpoints × (K + 1)), wall seconds and seconds per
checkpoint, the estimator's share (the table's per-unit ``seconds``), CPU seconds of the
analysis process, the product strategy, and training time; the machine line and the load from
other work at the start (``_timing.busy_cores``).

    python experiments/benchmarks/bench_trajectory.py          # full: writes results/trajectory.md
    python experiments/benchmarks/bench_trajectory.py --fast   # 5 clients, 3 rounds: prints only
    python experiments/benchmarks/bench_trajectory.py --base OLD --repeats 3
        # before/after: the same analysis with OLD's code and with this checkout's, in rounds
        # (order alternating), medians and the median per-round ratio after/before;
        # writes results/trajectory_before_after.md

``--fast`` writes a file only when ``--out`` is given, so a smoke test never overwrites the
reported result. ``--workdir DIR`` keeps the run there (retrained from scratch and re-analyzed
on every call); by default a temporary directory is used and removed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hessrank.fl.config import TrainConfig
from hessrank.fl.rundir import RunDir
from hessrank.fl.runner import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results" / "trajectory.md"
BEFORE_AFTER = HERE / "results" / "trajectory_before_after.md"
MATVECS = 40
TARGET_MINUTES = 10.0
"""How this report reads "finishes in minutes": under ten minutes of wall clock."""

FULL = {"clients": 20, "rounds": 20}
FAST = {"clients": 5, "rounds": 3}

@dataclass
class Analysis:
    """What one timed ``hessrank analyze`` process produced."""

    argv: list[str]
    wall: float
    cpu: float
    table: pd.DataFrame
    strategies: list[dict[str, Any]]  # the route reported per checkpoint
    stdout: str
    allocator: str = "not recorded (an older checkout)"  # environment.allocator


def train_config(clients: int, rounds: int, seed: int) -> TrainConfig:
    """FedAvg on digits with the CNN, Dirichlet(0.5) split, a checkpoint every round; local
    schedule as in ``hessrank.demo`` (2 epochs, lr 0.1, batch 16: test accuracy ≈ 0.8 after 20
    rounds, where the default lr 0.05 and 1 epoch leave the CNN near chance)."""
    return TrainConfig(**train_settings(clients, rounds, seed))


def train_settings(clients: int, rounds: int, seed: int) -> dict[str, Any]:
    """The keys :func:`train_config` sets (an older checkout's trainer takes them too)."""
    return dict(algo="fedavg", dataset="digits", model="cnn", clients=clients,
                partition="dirichlet", dirichlet_alpha=0.5, rounds=rounds, local_epochs=2,
                lr=0.1, batch_size=16, save_every=1, eval_every=1, seed=seed)


_TRAIN_WITH = """import json, sys
from hessrank.fl.runner import train
train(json.loads(sys.argv[1]), sys.argv[2], resume=False, progress=False)
"""


def train_with(code: Path, settings: dict[str, Any], run_dir: Path) -> None:
    """Train ``settings`` into ``run_dir`` with checkout ``code``'s trainer (a fresh process):
    an older analysis reads only runs its own trainer wrote (it refuses unknown config keys)."""
    subprocess.run([sys.executable, "-c", _TRAIN_WITH, json.dumps(settings), str(run_dir)],
                   cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True)


def train_run(config: TrainConfig, run_dir: Path) -> tuple[RunDir, float]:
    """Train from scratch into ``run_dir``; (run, wall seconds)."""
    t0 = time.perf_counter()
    run = train(config, run_dir, resume=False, progress=False)
    return run, time.perf_counter() - t0


def analyze_argv(run_dir: Path, out: Path, threads: int, seed: int) -> list[str]:
    """``hessrank analyze`` arguments: server + all clients, stable rank at 40 matvecs."""
    return ["analyze", str(run_dir), "--subjects", "server,clients", "--quantities",
            "stable-rank", "--matvecs", str(MATVECS), "--seed", str(seed), "--threads",
            str(threads), "--out", str(out), "--quiet"]


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_analysis(run_dir: Path, threads: int, seed: int, code: Path = REPO) -> Analysis:
    """Time one fresh ``hessrank analyze`` process of ``code`` (a checkout; any earlier
    analysis output is removed, since the analysis skips units it finds done)."""
    out = run_dir / "analysis"
    shutil.rmtree(out, ignore_errors=True)
    argv = analyze_argv(run_dir, out, threads, seed)
    env = {**os.environ, "PYTHONPATH": str(code)}
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hessrank.cli", *argv], cwd=code,
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"hessrank analyze exited {proc.returncode}:\n{proc.stderr}")
    table = pd.read_parquet(out / "results.parquet")
    # the product route each checkpoint's operator reported (recorded in the table's rows)
    routes = [json.loads(r) for r in table.groupby("round")["route"].first()]
    env = json.loads((out / "analysis.json").read_text())["calls"][-1]["environment"]
    return Analysis(argv, wall, cpu, table, routes, proc.stdout + proc.stderr,
                    env.get("allocator", Analysis.allocator))


def _describe(record: dict[str, Any]) -> str:
    """One line for one checkpoint's strategy record (client settings collapsed, counted)."""
    parts = [f"{k} {json.dumps(v, sort_keys=True, default=str)}" for k, v in sorted(record.items())
             if k != "clients"]
    if "clients" in record:
        per = Counter(json.dumps(c, sort_keys=True, default=str) for c in record["clients"])
        parts.append("clients " + ", ".join(f"{k} × {n}" for k, n in per.most_common()))
    return "; ".join(parts)


def strategy_summary(strategies: list[dict[str, Any]]) -> str:
    """Distinct product strategies over checkpoints, each with its number of checkpoints."""
    counts = Counter(_describe(record) for record in strategies)
    if not counts:
        return "not recorded"
    text = " / ".join(f"`{k}` at {n} checkpoint(s)" for k, n in counts.most_common())
    return text.replace("|", "\\|")  # a markdown table cell


def numbers(run: RunDir, a: Analysis, train_s: float, clients: int) -> dict[str, Any]:
    """The figures of the report, all from the run and the analysis table."""
    sr = a.table[a.table["quantity"] == "stable-rank"]
    checkpoints = sr["round"].nunique()
    hessians = len(sr)
    if hessians != checkpoints * (clients + 1):
        raise SystemExit(f"expected {checkpoints} × {clients + 1} stable ranks, got {hessians}")
    estimator = float(sr.groupby("round")["seconds"].first().sum())  # one stacked call/round
    model = run.load_model(0)
    sizes = [len(y) for _, y in run.client_data()]
    acc = run.metrics().dropna(subset=["test_accuracy"]).iloc[-1]["test_accuracy"]
    return {
        "checkpoints": checkpoints, "rounds": sorted(int(r) for r in sr["round"].unique()),
        "hessians": hessians, "matvecs": sorted(int(m) for m in sr["matvecs"].unique()),
        "wall": a.wall, "per_checkpoint": a.wall / checkpoints, "estimator": estimator,
        "cpu": a.cpu, "train": train_s, "p": sum(t.numel() for t in model.parameters()),
        "sizes": sizes, "accuracy": float(acc), "strategy": strategy_summary(a.strategies),
        "allocator": a.allocator,
    }


def timing_rows(n: dict[str, Any], threads: int, route_label: str) -> list[list[object]]:
    """The rows every trajectory benchmark reports, from "matvecs per Hessian" on: threads,
    wall clock, per checkpoint and per Hessian, the estimator's share, CPU, route, training."""
    other = n["wall"] - n["estimator"]
    return [
        ["matvecs per Hessian", ", ".join(map(str, n["matvecs"]))],
        ["torch threads", threads],
        ["**analysis wall clock, process start to exit**",
         f"**{n['wall']:.1f} s ({n['wall'] / 60:.2f} min)**"],
        ["seconds per checkpoint", f"{n['per_checkpoint']:.2f}"],
        ["seconds per Hessian", f"{n['wall'] / n['hessians']:.3f}"],
        ["in the estimator (stable_rank calls)",
         f"{n['estimator']:.1f} s ({n['estimator'] / n['wall']:.0%})"],
        ["other (start-up, imports, data and checkpoint loading, operator set-up, writing)",
         f"{other:.1f} s ({other / n['wall']:.0%})"],
        ["CPU seconds of the analysis process (user + sys)",
         f"{n['cpu']:.1f} ({n['cpu'] / n['wall']:.2f} cores on average)"],
        [route_label, n["strategy"]],
        ["allocator (hessrank.allocator, as recorded)", n.get("allocator", "not recorded")],
        ["training wall clock (not part of the target)", f"{n['train']:.1f} s"],
    ]


def table_rows(n: dict[str, Any], threads: int) -> list[list[object]]:
    return [
        ["checkpoints analysed", f"{n['checkpoints']} (rounds {n['rounds'][0]}–{n['rounds'][-1]})"],
        ["Hessians estimated (checkpoints × (K + 1))", n["hessians"]],
        *timing_rows(n, threads, "product strategy"),
    ]


def reading(n: dict[str, Any], threads: int, busy: float, *, hessians: str = "Hessians",
            target_minutes: float = TARGET_MINUTES,
            target: str = "minutes this report reads \"in minutes\" as") -> str:
    """The report's one-sentence reading: wall clock against ``target_minutes``."""
    minutes = n["wall"] / 60
    verdict = "under" if minutes < target_minutes else "over"
    load = (f" Other work kept {busy:.1f} cores busy at the start, so an idle machine should "
            "do at least as well." if busy >= 0.5 else "")
    return (f"With {threads} torch thread(s) the analysis of {n['checkpoints']} checkpoints "
            f"({n['hessians']} {hessians} at {MATVECS} matvecs) took {minutes:.1f} minutes end "
            f"to end, {n['per_checkpoint']:.1f} s per checkpoint — {verdict} the "
            f"{target_minutes:.0f} {target}.{load}")


def report_page(title: str, machine: str, a: Analysis, command: str, run: str,
                rows: list[list[object]], closing: str) -> str:
    """A trajectory benchmark's page: title, machine line, the command and the timed
    analysis process, the run, the table of numbers, the reading."""
    return "\n".join([
        title, "", machine,
        f"Produced by `{command}`. The timed analysis process: "
        f"`hessrank {shlex.join(a.argv)}` (run dir and output in a scratch directory).",
        "", run, "", _timing.markdown_table(["quantity", "value"], rows), "", closing, "",
    ])


def report(n: dict[str, Any], a: Analysis, config: TrainConfig, threads: int, busy: float,
           command: str) -> str:
    sizes = n["sizes"]
    return report_page(
        "# Trajectory analysis end to end: server + every client, stable rank at 40 matvecs",
        f"{datetime.date.today()} — {_timing.machine_line(threads)}; other work kept "
        f"{busy:.1f} cores busy at the start.",
        a, command,
        f"Run: FedAvg on scikit-learn digits, model `{config.model}` (p = {n['p']:,}, "
        f"{config.dtype}), {config.clients} clients, {config.partition} split "
        f"(alpha {config.dirichlet_alpha}; client sizes {min(sizes)}–{max(sizes)}, "
        f"N = {sum(sizes)}), {config.rounds} rounds of {config.local_epochs} local epoch(s), "
        f"lr {config.lr}, batch {config.batch_size}, a checkpoint every round; final test "
        f"accuracy {n['accuracy']:.3f}. Analysis: default operator settings, eval mode, "
        "one FederatedOperator (K + 1 stacked Hessians) per checkpoint; no density, alignment "
        "or subsets. Single run, not repeated.",
        table_rows(n, threads), reading(n, threads, busy))


def before_after(base: Path, repeats: int, threads: int, seed: int, fast: bool,
                 out: Path | None, command: str) -> str:
    """Time the analysis with ``base``'s code and with this checkout's, interleaved."""
    size = FAST if fast else FULL
    busy = _timing.busy_cores()
    config = train_config(size["clients"], size["rounds"], seed)
    codes = {"before": base.resolve(), "after": REPO}
    times: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench_trajectory_") as tmp:
        run_dirs = {name: Path(tmp) / name / "run" for name in codes}
        for name, code in codes.items():  # each checkout analyzes the run its trainer wrote
            train_with(code, train_settings(size["clients"], size["rounds"], seed),
                       run_dirs[name])
        tables = {}
        for r in range(repeats):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in order:
                a = run_analysis(run_dirs[name], threads, seed, codes[name])
                times[name].append(a.wall)
                tables[name] = a.table
                print(f"round {r}: {name} {a.wall:.1f} s", flush=True)
    key = ["round", "subject", "quantity", "k"]
    same = tables["before"].sort_values(key)["value"].to_numpy()
    same = bool((same == tables["after"].sort_values(key)["value"].to_numpy()).all())
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    busy_after = _timing.busy_cores()
    rows = [[name, f"{_timing.median(times[name]):.1f}",
             " / ".join(f"{t:.1f}" for t in times[name])] for name in ("before", "after")]
    base_rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or str(base)
    new_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    ratio = _timing.median(ratios)
    text = "\n".join([
        "# Trajectory analysis before / after: the same command, two checkouts",
        "",
        f"{datetime.date.today()} — {_timing.machine_line(threads)}; other work kept "
        f"{busy:.1f} cores busy at the start and {busy_after:.1f} at the end (a shared "
        "machine: contenders interleaved, order alternating each round, medians reported).",
        f"Produced by `{command}`; before = {base_rev}, after = {new_rev}. Each contender: a "
        f"fresh `hessrank {shlex.join(analyze_argv(Path('RUN'), Path('OUT'), threads, seed))}` "
        f"process on {config.clients} clients × {config.rounds + 1} checkpoints of the run "
        "described in `trajectory.md` (each checkout analyzes the run its own trainer "
        "wrote), timed from start to exit.",
        "",
        _timing.markdown_table(["code", "median wall s", "per round s"], rows),
        "",
        f"After / before: median of the per-round ratios {ratio:.3f} "
        f"({', '.join(f'{x:.3f}' for x in ratios)}); the tables' values are "
        f"{'bit-identical' if same else 'NOT identical'}.",
        "",
    ])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def trajectory_parser(description: str, fast: str, results: Path) -> argparse.ArgumentParser:
    """The options every trajectory benchmark takes (``fast`` says what --fast shrinks)."""
    ap = argparse.ArgumentParser(description=description, allow_abbrev=False)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (target: 2 cores)")
    ap.add_argument("--fast", action="store_true",
                    help=f"{fast}; prints only unless --out is given")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the run here (default: a temporary directory, removed)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown output (default {results.relative_to(REPO)}; none with --fast)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = trajectory_parser(__doc__.splitlines()[0], "5 clients, 3 rounds", RESULTS)
    ap.add_argument("--base", type=Path, default=None,
                    help="another checkout: time its analysis against this one's, interleaved "
                         f"(writes {BEFORE_AFTER.relative_to(REPO)})")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of before/after (--base)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.base is not None:
        command = shlex.join(["python", "experiments/benchmarks/bench_trajectory.py",
                              *(argv if argv is not None else sys.argv[1:])])
        out = args.out if args.out is not None or args.fast else BEFORE_AFTER
        print(before_after(args.base, args.repeats, args.threads, args.seed, args.fast, out,
                           command.replace(str(args.base), "OLD")))
        return 0
    out = args.out if args.out is not None or args.fast else RESULTS
    size = FAST if args.fast else FULL
    command = shlex.join(["python", "experiments/benchmarks/bench_trajectory.py",
                          *(argv if argv is not None else sys.argv[1:])])
    busy = _timing.busy_cores()
    config = train_config(size["clients"], size["rounds"], args.seed)
    a, n = measure(config, args.workdir, args.threads, args.seed,
                   f"{config.algo} {config.model}: {config.clients} clients, "
                   f"{config.rounds} rounds",
                   lambda run, a, train_s: numbers(run, a, train_s, config.clients))
    publish(report(n, a, config, args.threads, busy, command), out, a)
    return 0


def measure(config: TrainConfig, workdir: Path | None, threads: int, seed: int, label: str,
            summarize: Callable[[RunDir, Analysis, float], dict[str, Any]]
            ) -> tuple[Analysis, dict[str, Any]]:
    """Train ``config`` (in ``workdir``/run, else a temporary directory), time the analysis
    process on it, and ``summarize(run, analysis, training seconds)`` while the run exists."""
    with tempfile.TemporaryDirectory(prefix="bench_trajectory_") as tmp:
        run_dir = (workdir or Path(tmp)) / "run"
        print(f"training {label}", flush=True)
        run, train_s = train_run(config, run_dir)
        print(f"analyzing {len(run.rounds())} checkpoints", flush=True)
        a = run_analysis(run_dir, threads, seed)
        return a, summarize(run, a, train_s)


def publish(text: str, out: Path | None, a: Analysis) -> None:
    """Write the report to ``out`` (when given) and print the analysis output and the report;
    the scratch run directory is shown as RUN (no path of this machine in a results file)."""
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/bench_\w+/run", "RUN", text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(a.stdout.strip())
    print(text)


if __name__ == "__main__":
    sys.exit(main())
