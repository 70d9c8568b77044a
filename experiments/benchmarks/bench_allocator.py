"""The ``hessrank`` command's allocator setting (hessrank.allocator) against glibc's defaults.

Each workload is one fresh ``python -m hessrank`` process (what the ``hessrank`` command runs),
with the command's setting ("tuned") and with ``HESSRANK_ALLOCATOR=system`` (glibc's defaults),
interleaved A B B A over ``--repeats`` rounds; reported per workload: the median wall clock of
each, the median of the per-round ratios tuned ÷ system (< 1: the setting is faster), user and
kernel CPU seconds (the kernel's share is where glibc's page faults show), peak resident
memory, and whether the two results are bit-identical (analysis tables without their
``seconds`` column; training checkpoints by content).

Workloads (the runs are trained once, untimed, in a scratch directory):

- ``lm``: ``analyze`` of the last checkpoint of a FedLoRU run with PEFT adapters (the
  ``[train]`` table of ``experiments/configs/federated_shakespeare_lora.toml``, 10 rounds):
  server + 20 clients, adapters-only Hessians, stable rank at 20 matvecs.
- ``cnn``: ``analyze`` of a FedAvg CNN on digits (10 clients, Dirichlet 0.5, 3 checkpoints,
  ``bench_trajectory.py``'s recipe): server + clients at 40 matvecs.
- ``train``: ``hessrank train`` of that digits CNN federation (10 clients, 3 rounds).

    python experiments/benchmarks/bench_allocator.py              # results/allocator.md
    python experiments/benchmarks/bench_allocator.py --fast       # 3 roles, 1 repeat, prints

``--fast`` shrinks every workload (3 roles and 2 rounds for ``lm``, 3 clients and 1 round for
the others, one repeat) and writes a file only with ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402

REPO = HERE.parent.parent
SPEC = REPO / "experiments" / "configs" / "federated_shakespeare_lora.toml"
RESULTS = HERE / "results" / "allocator.md"
MODES = ("tuned", "system")


def lm_train(fast: bool) -> dict[str, Any]:
    from hessrank.analysis.spec import load_spec

    train = dict(load_spec(SPEC).train)
    train.update(rounds=2 if fast else 10, save_every=2 if fast else 10, seed=0)
    if fast:
        train.update(clients=3, dataset_kwargs={**train["dataset_kwargs"], "roles": 3,
                                                "stride": 512})
    return train


def cnn_train(fast: bool) -> dict[str, Any]:
    return dict(algo="fedavg", dataset="digits", model="cnn", clients=3 if fast else 10,
                partition="dirichlet", dirichlet_alpha=0.5, rounds=1 if fast else 2,
                local_epochs=2, lr=0.1, batch_size=16, save_every=1, eval_every=1, seed=0)


def workloads(work: Path, fast: bool) -> dict[str, dict[str, Any]]:
    """name → the hessrank argv (``WORK`` stands for ``work``, ``OUT`` for the output
    directory) and how to read the result; trains the runs the analyses read."""
    from hessrank.fl import train

    runs = {}
    for name, config in (("lm", lm_train(fast)), ("cnn", cnn_train(fast))):
        runs[name] = work / f"{name}_run"
        if not (runs[name] / "checkpoints").is_dir():
            train(config, runs[name], progress=False)
    lm_last = max(int(p.stem.split("_")[1]) for p in (runs["lm"] / "checkpoints").iterdir())
    analysis = ["--quantities", "stable-rank", "--seed", "0", "--threads", "1", "--quiet",
                "--out", "OUT"]
    cfg = cnn_train(fast)
    train_argv = ["train", "--algo", "fedavg", "--dataset", "digits", "--model", "cnn",
                  "--clients", str(cfg["clients"]), "--partition", "dirichlet",
                  "--dirichlet-alpha", "0.5", "--rounds", "1" if fast else "3",
                  "--local-epochs", "2", "--lr", "0.1", "--batch-size", "16", "--seed", "0",
                  "--threads", "1", "--quiet", "--out", "OUT"]
    return {
        "lm": {"argv": ["analyze", "WORK/lm_run", "--rounds", str(lm_last), "--subjects",
                        "server,clients", "--matvecs", "10" if fast else "20", *analysis],
               "kind": "analysis"},
        "cnn": {"argv": ["analyze", "WORK/cnn_run", "--subjects", "server,clients",
                         "--matvecs", "10" if fast else "40", *analysis], "kind": "analysis"},
        "train": {"argv": train_argv, "kind": "train"},
    }


# the child reports its own peak resident set (VmHWM) at exit: a forked child's getrusage
# maxrss would include this process's resident set at the fork
CHILD = """import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as f:
        f.write(str(kb))
atexit.register(peak)
sys.argv = ["hessrank", *sys.argv[1:]]
runpy.run_module("hessrank", run_name="__main__")
"""


def run_once(argv: list[str], work: Path, out: Path, mode: str) -> dict[str, float]:
    """One fresh ``python -m hessrank`` process: wall, user and kernel seconds (``wait4``'s
    usage of that child alone), and its peak resident MiB."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "HESSRANK_ALLOCATOR"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if mode == "system":
        env["HESSRANK_ALLOCATOR"] = "system"
    argv = [a.replace("OUT", str(out)).replace("WORK", str(work)) for a in argv]
    with tempfile.TemporaryDirectory() as tmp:
        env["BENCH_PEAK_FILE"] = peak_file = str(Path(tmp) / "peak")
        with open(Path(tmp) / "stderr", "w+b") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                raise SystemExit(f"hessrank {shlex.join(argv)} exited {proc.returncode}:\n"
                                 f"{err.read().decode(errors='replace')[-2000:]}")
        peak_mib = int(Path(peak_file).read_text()) / 1024
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "peak_mib": peak_mib}


def result_of(out: Path, kind: str) -> Any:
    """What must not change: the analysis table (no timings) or the checkpoints' contents."""
    if kind == "analysis":
        return pd.read_parquet(out / "results.parquet").drop(columns=["seconds"])
    from hessrank.fl.rundir import RunDir

    run = RunDir(out)
    return {r: run.checkpoint_hash(r) for r in run.rounds()}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame):
        return a.equals(b)
    return a == b


def measure(work: Path, fast: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, w in workloads(work, fast).items():
        times: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        results = {}
        for r in range(repeats):
            order = MODES if r % 2 == 0 else MODES[::-1]  # A B, B A, ...
            for mode in order:
                out = work / f"{name}_{mode}_{r}"
                times[mode].append(run_once(w["argv"], work, out, mode))
                results.setdefault(mode, result_of(out, w["kind"]))
                if w["kind"] == "analysis":
                    call = json.loads((out / "analysis.json").read_text())["calls"][-1]
                    results.setdefault(f"{mode}_allocator", call["environment"]["allocator"])
        ratios = [t["wall"] / s["wall"] for t, s in zip(times["tuned"], times["system"])]
        med = {m: {k: _timing.median([t[k] for t in times[m]]) for k in times[m][0]}
               for m in MODES}
        rows.append({"workload": name, "argv": w["argv"], "ratio": _timing.median(ratios),
                     "ratios": ratios, "median": med,
                     "identical": same(results["tuned"], results["system"]),
                     "recorded": results.get("tuned_allocator")})
        print(f"{name}: tuned/system {rows[-1]['ratio']:.3f} (rounds "
              f"{', '.join(f'{x:.3f}' for x in ratios)}), identical {rows[-1]['identical']}",
              flush=True)
    return rows


def report(rows: list[dict[str, Any]], repeats: int, busy: float, command: str) -> str:
    header = ["workload", "hessrank command", "wall tuned / system (s)",
              "**tuned ÷ system**", "user s", "kernel s (tuned / system)",
              "peak MiB (tuned / system)", "same result"]
    table = []
    for r in rows:
        t, s = r["median"]["tuned"], r["median"]["system"]
        table.append([
            r["workload"], f"`hessrank {shlex.join(r['argv'])}`",
            f"{t['wall']:.1f} / {s['wall']:.1f}", f"**{r['ratio']:.3f}**",
            f"{t['user']:.1f} / {s['user']:.1f}", f"{t['sys']:.1f} / {s['sys']:.1f}",
            f"{t['peak_mib']:.0f} / {s['peak_mib']:.0f}",
            "bit-identical" if r["identical"] else "**differs**"])
    recorded = next((r["recorded"] for r in rows if r["recorded"]), "n/a")
    return "\n".join([
        "# The hessrank command's allocator setting against glibc's defaults",
        "",
        f"{datetime.date.today()} — {_timing.machine_line(1)}; other work kept {busy:.1f} "
        f"cores busy at the start. Produced by `{command}`. Each cell: median of {repeats} "
        "fresh processes per setting, interleaved A B / B A; the ratio is the median of the "
        "per-round ratios. Peak MiB: the median over processes of each one's largest resident "
        "set (VmHWM, read by the process at exit). WORK, OUT: scratch directories.",
        "",
        f"Tuned, as recorded in the analysis's `environment.allocator`: `{recorded}`; "
        "system: `HESSRANK_ALLOCATOR=system`.",
        "",
        _timing.markdown_table(header, table),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="small workloads, 1 repeat, prints")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 3, --fast 1)")
    ap.add_argument("--out", type=Path, default=None, help=f"report (default {RESULTS})")
    ap.add_argument("--workdir", type=Path, default=None, help="keep runs and outputs here")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.fast else 3)
    command = shlex.join(["python", "experiments/benchmarks/bench_allocator.py",
                          *(argv if argv is not None else sys.argv[1:])])
    busy = _timing.busy_cores()
    with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
        work = args.workdir or Path(tmp)
        rows = measure(work, args.fast, repeats)
    text = report(rows, repeats, busy, command)
    out = args.out if args.out is not None or args.fast else RESULTS
    if out is None:
        print(text)
    else:
        out.write_text(text)
        print(f"-> {out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
