"""The federated trainer of two hessrank trees side by side: same bits, same speed.

``--before REV`` (a git revision of this repository, extracted with ``git archive``) is run
against the working tree on the same workloads, each in child processes that import only the
tree under test (``PYTHONPATH``), interleaved (ABBA order) so that drifts of a shared machine
hit both alike:

1. *Bit identity*: every algorithm and variant of :data:`CONFIGS` trained by both trees; every
   tensor of every checkpoint and recorded update, the metrics rows (all but wall-clock
   columns), the partition and the config compared. Checkpoint keys renamed on purpose are
   mapped (pFedLoRU's ``state.personal.<id>.*`` became the client states ``clients.<id>.*``);
   keys added on purpose are listed (mFedLoRU's tiers ``clients.<id>.rank``, the config key
   ``server_lr``). Then runs of the old tree are resumed by the new one to 5 rounds and
   compared with 5-round runs of the old tree.
2. *Speed*: ``bench_trainer.py --fast`` of each tree (its own script: the API changed), whole
   process; and ``hessrank.fl.train`` of each algorithm on the digits MLP (the settings of
   bench_trainer's first row) timed around the call, after a 1-round call that
   pays for imports and the first data load (its own row). Medians over ``--repeats``.
3. ``hessrank --help`` and ``hessrank train --help``, whole process.

Run: ``.venv/bin/python experiments/benchmarks/compare_trees.py --before 548a11b``; writes
``experiments/benchmarks/results/trainer_refactor.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "trainer_refactor.md"

_BASE = {"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [16, 16]},
         "clients": 4, "partition": "dirichlet", "dirichlet_alpha": 0.5, "rounds": 3,
         "local_steps": 3, "batch_size": 16, "lr": 0.1, "rank": 4, "lora_alpha": 4.0,
         "merge_every": 2, "save_every": 1, "dataset_kwargs": {"limit": 400}}  # fmt: skip


def _c(**kw) -> dict:
    return {**_BASE, **kw}


CONFIGS = {
    "fedavg": _c(algo="fedavg", record_updates=True),
    "fedavg_mom": _c(algo="fedavg", momentum=0.9, weight_decay=1e-3, local_steps=0,
                     lr_schedule="cosine", client_fraction=0.5, dtype="float64"),
    "fedprox": _c(algo="fedprox", prox_mu=0.1, record_updates=True),
    "fedlora": _c(algo="fedlora", record_updates=True),
    "fedlora_ft": _c(algo="fedlora", from_scratch=False, validation_fraction=0.1),
    "fedloru": _c(algo="fedloru", merge_every=1, record_updates=True, client_fraction=0.5),
    "fedloru_cnn": _c(algo="fedloru", model="cnn", model_kwargs={"channels": [4, 8],
                      "hidden": 16}, rounds=2),
    "pfedloru": _c(algo="pfedloru", record_updates=True, client_holdout=0.2),
    "pfedloru_pf": _c(algo="pfedloru", personal_order="personal-first", personal_steps=2,
                      client_fraction=0.5, dtype="float64"),
    "mfedloru_h": _c(algo="mfedloru", mfedloru_scheme="hierarchical", record_updates=True),
    "mfedloru_w": _c(algo="mfedloru", mfedloru_scheme="width", record_updates=True,
                     client_ranks=[4, 2, 1, 3]),
    "fedlrt": _c(algo="fedlrt", record_updates=True, lr=0.3),
    "fedlrt_simpl": _c(algo="fedlrt", correction="simplified", fedlrt_weighting="size", lr=0.3,
                       client_fraction=0.5, dtype="float64"),
    "fedlrt_none_lsq": _c(algo="fedlrt", correction="none", dataset="hetero-lsq",
                          dataset_kwargs={"n": 300, "d_in": 12, "d_out": 6, "groups": 4},
                          model_kwargs={"hidden": [8]}, partition="iid", factorize=["fc1"],
                          lr=0.05),
}  # fmt: skip
"""Every algorithm of the old tree and the variants its options select."""

TIMED = {  # bench_trainer's digits row: 10 clients, Dirichlet 0.5, 2 local epochs, lr 0.3
    a: {"algo": a, "clients": 10, "partition": "dirichlet", "dirichlet_alpha": 0.5,
        "batch_size": 32, "rank": 8, "lora_alpha": 16.0, "merge_every": 2, "r_max": 32,
        "rounds": 6, "local_epochs": 2, "lr": 0.3, "save_every": 3}
    for a in ("fedavg", "fedlora", "fedloru", "pfedloru", "mfedloru", "fedlrt")
}  # fmt: skip

_TRAIN_CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from hessrank.fl import train
jobs = json.loads(sys.argv[1])
out = {}
for name, (cfg, path, resume) in jobs.items():
    t0 = time.perf_counter()
    train(cfg, path, progress=False, threads=1, resume=resume)
    out[name] = time.perf_counter() - t0
print(json.dumps(out))
"""


def _extract(rev: str, dest: Path) -> Path:
    archive = dest / "tree.tar"
    with open(archive, "wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def _child(tree: Path, args: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=tree, timeout=timeout, check=True)  # fmt: skip


def _train(tree: Path, jobs: dict) -> dict[str, float]:
    done = _child(tree, ["-c", _TRAIN_CHILD, json.dumps(jobs)])
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- bit identity ----------------------------------------------------------------------------
_RENAMED = (("state.personal.", "clients."),)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for key, value in load_file(str(path)).items():
        for old, new in _RENAMED:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def compare_runs(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of run directory ``b`` against ``a`` (module docstring)."""
    import torch

    problems, notes = [], []
    for sub in ("checkpoints", "updates"):
        fa = sorted((a / sub).glob("*.safetensors")) if (a / sub).is_dir() else []
        fb = sorted((b / sub).glob("*.safetensors")) if (b / sub).is_dir() else []
        if [f.name for f in fa] != [f.name for f in fb]:
            problems.append(f"{sub}: {[f.name for f in fa]} vs {[f.name for f in fb]}")
            continue
        for x, y in zip(fa, fb):
            ta, tb = _tensors(x), _tensors(y)
            added = sorted(set(tb) - set(ta))
            tiers = [k for k in added if k.startswith("clients.") and k.endswith(".rank")]
            if tiers and "tiers" not in " ".join(notes):
                notes.append(f"new keys: mFedLoRU tiers clients.*.rank ({len(tiers)})")
            if set(added) - set(tiers) or set(ta) - set(tb):
                problems.append(f"{sub}/{x.name}: keys differ")
            for key in sorted(set(ta) & set(tb)):
                u, v = ta[key], tb[key]
                if u.dtype != v.dtype or u.shape != v.shape or not torch.equal(u, v):
                    problems.append(f"{sub}/{x.name}: {key} differs")

    def rows(run: Path) -> list[dict]:
        out = []
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            row.pop("seconds", None)
            row["extra"] = {k: v for k, v in (row.get("extra") or {}).items()
                            if k != "client_seconds"}  # fmt: skip
            out.append(row)
        return out

    if rows(a) != rows(b):
        problems.append("metrics rows differ")
    if (a / "partition.json").read_text() != (b / "partition.json").read_text():
        problems.append("partition.json differs")
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    added = sorted(set(cb) - set(ca))  # options the new tree added (at their defaults: the
    if added:                          # tensors above say whether the defaults kept the bits)
        notes.append(f"config.json new options: {added}")
    from hessrank.fl.config import RENAMED_VALUES

    renamed = sorted(k for k, m in RENAMED_VALUES.items()
                     if k in ca and k in cb and m.get(ca[k]) == cb[k])
    if renamed:
        notes.append(f"config.json values renamed on purpose: {renamed}")
    changed = sorted(k for k in set(ca) & set(cb) if ca[k] != cb[k] and k not in renamed)
    if changed:  # "notes" is free text the algorithms write about their open choices
        (notes if set(changed) <= {"notes"} else problems).append(
            f"config.json changed: {changed}")
    if set(ca) - set(cb):
        problems.append(f"config.json lost: {sorted(set(ca) - set(cb))}")
    return problems, notes


def identity(before: Path, work: Path) -> list[list[str]]:
    old, new, resumed = work / "old", work / "new", work / "resumed"
    _train(before, {n: (c, str(old / n), True) for n, c in CONFIGS.items()})
    _train(ROOT, {n: (c, str(new / n), True) for n, c in CONFIGS.items()})
    constant = {n: c for n, c in CONFIGS.items() if c.get("lr_schedule") != "cosine"}
    _train(before, {n: ({**c, "rounds": 5}, str(work / "old5" / n), True)
                    for n, c in constant.items()})  # fmt: skip
    subprocess.run(["cp", "-r", str(old), str(resumed)], check=True)
    _train(ROOT, {n: ({**c, "rounds": 5}, str(resumed / n), True) for n, c in constant.items()})
    table = []
    for name in CONFIGS:
        p1, n1 = compare_runs(old / name, new / name)
        row = [name, "identical" if not p1 else "; ".join(p1[:3])]
        if name in constant:
            p2, _ = compare_runs(work / "old5" / name, resumed / name)
            row.append("identical" if not p2 else "; ".join(p2[:3]))
        else:
            row.append("n/a (cosine: rounds are part of the run)")
        table.append([*row, "; ".join(n1)])
    return table


# ---- speed -----------------------------------------------------------------------------------
def speed(before: Path, work: Path, repeats: int) -> tuple[list[list[str]], list[list[str]]]:
    trees = {"before": before, "after": ROOT}
    per_algo: dict[tuple[str, str], list[float]] = {}
    bench: dict[str, list[float]] = {t: [] for t in trees}
    helps: dict[tuple[str, str], list[float]] = {}
    for rep in range(repeats):
        order = list(trees) if rep % 2 == 0 else list(reversed(trees))
        for tag in order:
            tree = trees[tag]
            # a 1-round run first, timed on its own: the first call in a process pays for
            # imports and the dataset's first load; the rows below are steady-state runs
            warm = {**TIMED["fedavg"], "rounds": 1}
            jobs = {"first call": (warm, str(work / f"t{rep}_{tag}" / "first"), False)}
            jobs |= {a: (c, str(work / f"t{rep}_{tag}" / a), False) for a, c in TIMED.items()}
            for algo, seconds in _train(tree, jobs).items():
                per_algo.setdefault((algo, tag), []).append(seconds)
            t0 = time.perf_counter()
            _child(tree, [str(tree / "experiments/benchmarks/bench_trainer.py"), "--fast",
                          "--out", str(work / f"bench_{rep}_{tag}.md")])  # fmt: skip
            bench[tag].append(time.perf_counter() - t0)
            for label, argv in (("hessrank --help", ["--help"]),
                                ("hessrank train --help", ["train", "--help"])):
                t0 = time.perf_counter()
                _child(tree, ["-m", "hessrank.cli", *argv])
                helps.setdefault((label, tag), []).append(time.perf_counter() - t0)

    def row(label: str, a: list[float], b: list[float]) -> list[str]:
        ma, mb = statistics.median(a), statistics.median(b)
        return [label, f"{ma:.3f}", f"{mb:.3f}", f"{mb / ma:.3f}"]

    rows = [row("train() first call in a process, 1 round (imports, first data load)",
                per_algo["first call", "before"], per_algo["first call", "after"])]
    rows += [row(f"train() {a}", per_algo[a, "before"], per_algo[a, "after"]) for a in TIMED]
    rows.append(row("bench_trainer.py --fast (process)", bench["before"], bench["after"]))
    help_rows = [row(label, helps[label, "before"], helps[label, "after"])
                 for label in ("hessrank --help", "hessrank train --help")]  # fmt: skip
    return rows, help_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    parser.add_argument("--skip-speed", action="store_true", help="bit identity only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hessrank-trees-") as tmp:
        work = Path(tmp)
        before = _extract(args.before, work)
        revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()  # fmt: skip
        ident = identity(before, work / "identity")
        lines = [
            "# Federated trainer: before/after a refactor",
            "",
            f"{datetime.date.today().isoformat()}; before = `{args.before}`, after = "
            f"`{revision}` (working tree); {_timing.machine_line(1)}; one torch thread; "
            f"load average at start {os.getloadavg()[0]:.1f}.",
            "",
            "## Same bits (every tensor of every checkpoint and update, metrics, partition)",
            "",
            _timing.markdown_table(["config", "new tree vs old", "old run resumed by new "
                                    "tree vs old 5-round run", "notes"], ident),  # fmt: skip
            "",
        ]
        if not args.skip_speed:
            rows, help_rows = speed(before, work / "speed", args.repeats)
            lines += [
                f"## Speed (median of {args.repeats} interleaved repeats, seconds)",
                "",
                _timing.markdown_table(["workload", "before", "after", "after/before"], rows),
                "",
                _timing.markdown_table(["command", "before", "after", "after/before"],
                                       help_rows),  # fmt: skip
                "",
            ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
