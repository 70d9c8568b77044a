"""Trajectory analysis of a federated language-model run: server + every client, adapters only.

The target (issue 22, performance): "a Shakespeare trajectory (20 clients, 5 checkpoints,
adapters) analyzed in under 10 minutes on 2 cores".

1. Train the federation of the study ``experiments/configs/federated_shakespeare_lora.toml``
   (its ``[train]`` table, read from the spec: FedLoRU with PEFT LoRA adapters of rank 4 on the
   attention projections of a frozen tiny GPT-2 — 2 layers, width 32, 2 heads — on 20
   Shakespeare roles drawn with the seed, one client per role, windows of 32 characters) for 20
   rounds with a checkpoint every 5: 5 checkpoints (rounds 0, 5, 10, 15, 20), through
   :func:`hessrank.fl.runner.train`. Training is timed but is not part of the target.
2. Run ``hessrank analyze RUN --subjects server,clients --quantities stable-rank --matvecs 40
   --threads T --quiet`` in a fresh process and time its wall clock from process start to
   exit (imports, data and checkpoints, operators, the estimator, writing the table). No
   ``--params``: an adapter run's analysis differentiates the adapters by default, which is
   what is timed (the report reads the recorded setting back). The route each checkpoint's
   operator reported is read from the table's ``route`` column.

Reported: checkpoints, Hessians estimated (checkpoints × (K + 1)), adapter parameters, wall
seconds and seconds per checkpoint, the estimator's share, CPU seconds of the analysis
process, the product route, training time; the machine line, this process's CPU affinity and
the load from other work at the start (``_timing.busy_cores``).

    python experiments/benchmarks/bench_lm_trajectory.py            # full: results/lm_trajectory.md
    python experiments/benchmarks/bench_lm_trajectory.py --fast     # 3 roles, 2 rounds: prints

``--fast`` (3 roles, a window every 512 characters, 2 rounds, checkpoints 0 and 2) writes a
file only when ``--out`` is given, so a smoke run never overwrites the reported result.
``--workdir DIR`` keeps the run there (retrained from scratch on every call); by default a
temporary directory is used and removed. Needs the ``hf`` and ``text`` extras.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from hessrank.analysis.spec import load_spec
from hessrank.fl.config import TrainConfig
from hessrank.fl.rundir import RunDir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402
import bench_trajectory as bt  # noqa: E402  (the timed analysis process and its summaries)

REPO = HERE.parent.parent
SPEC = REPO / "experiments" / "configs" / "federated_shakespeare_lora.toml"
RESULTS = HERE / "results" / "lm_trajectory.md"
MATVECS = bt.MATVECS
TARGET_MINUTES = 10.0
"""The issue's target: under ten minutes of wall clock."""

FULL = {"roles": 20, "rounds": 20, "save_every": 5, "dataset_kwargs": {}}
FAST = {"roles": 3, "rounds": 2, "save_every": 2, "dataset_kwargs": {"stride": 512}}


def train_config(size: dict[str, Any], seed: int) -> TrainConfig:
    """The study's ``[train]`` table with this benchmark's roles, rounds and checkpoints."""
    cfg = dict(load_spec(SPEC).train)
    cfg.update(
        dataset_kwargs={**cfg["dataset_kwargs"], "roles": size["roles"],
                        **size["dataset_kwargs"]},
        clients=size["roles"], rounds=size["rounds"], save_every=size["save_every"], seed=seed,
    )  # fmt: skip
    return TrainConfig.from_dict(cfg)


def recorded_params(analysis_dir: Path) -> str:
    """The ``params`` setting the analysis recorded (None: the default, adapters for an adapter
    run)."""
    calls = json.loads((analysis_dir / "analysis.json").read_text())["calls"]
    params = calls[-1]["settings"].get("params")
    return "default (adapters for an adapter run)" if params is None else str(params)


def numbers(run: RunDir, a: bt.Analysis, train_s: float, clients: int) -> dict[str, Any]:
    """The figures of the report, all from the run and the analysis table."""
    sr = a.table[a.table["quantity"] == "stable-rank"]
    checkpoints = sr["round"].nunique()
    hessians = len(sr)
    if hessians != checkpoints * (clients + 1):
        raise SystemExit(f"expected {checkpoints} × {clients + 1} stable ranks, got {hessians}")
    estimator = float(sr.groupby("round")["seconds"].first().sum())  # one stacked call/round
    model = run.load_model(0)
    metrics = run.metrics()
    return {
        "checkpoints": checkpoints, "rounds": sorted(int(r) for r in sr["round"].unique()),
        "hessians": hessians, "matvecs": sorted(int(m) for m in sr["matvecs"].unique()),
        "wall": a.wall, "per_checkpoint": a.wall / checkpoints, "estimator": estimator,
        "cpu": a.cpu, "train": train_s,
        "adapters": sum(t.numel() for t in model.parameters() if t.requires_grad),
        "p": sum(t.numel() for t in model.parameters()),
        "sizes": [len(y) for _, y in run.client_data()],
        "test_loss": (float(metrics["test_loss"].iloc[0]), float(metrics["test_loss"].iloc[-1])),
        "strategy": bt.strategy_summary(a.strategies), "allocator": a.allocator,
        "params": recorded_params(run.path / "analysis"),
    }  # fmt: skip


def table_rows(n: dict[str, Any], threads: int) -> list[list[object]]:
    return [
        ["checkpoints analysed", f"{n['checkpoints']} (rounds {', '.join(map(str, n['rounds']))})"],
        ["Hessians estimated (checkpoints × (K + 1))", n["hessians"]],
        ["parameters differentiated", f"{n['params']}: {n['adapters']:,} adapter floats of "
                                      f"{n['p']:,} parameters"],
        *bt.timing_rows(n, threads, "product route"),
    ]  # fmt: skip


def reading(n: dict[str, Any], threads: int, busy: float) -> str:
    return bt.reading(n, threads, busy, hessians="adapters-only Hessians",
                      target_minutes=TARGET_MINUTES, target="minutes of the target")


def report(n: dict[str, Any], a: bt.Analysis, config: TrainConfig, threads: int, busy: float,
           command: str) -> str:
    sizes = n["sizes"]
    kw = config.dataset_kwargs
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    return bt.report_page(
        "# Language-model trajectory: server + every client, adapters-only stable rank at "
        "40 matvecs",
        f"{datetime.date.today()} — {_timing.machine_line(threads)}; CPU affinity {affinity}; "
        f"other work kept {busy:.1f} cores busy at the start.",
        a, command,
        f"Run: the `[train]` table of `{SPEC.relative_to(REPO)}` with {config.rounds} rounds "
        f"and a checkpoint every {config.save_every}: {config.algo} with {config.adapters} "
        f"adapters (rank {config.rank}, alpha {config.lora_alpha}, merge every "
        f"{config.merge_every}) on `{config.model}` {json.dumps(config.model_kwargs)} "
        f"({config.dtype}, base frozen), dataset `{config.dataset}` {json.dumps(kw)}, "
        f"{config.partition} partition: {config.clients} roles as clients (training windows "
        f"{min(sizes)}–{max(sizes)}, N = {sum(sizes)}), {config.local_steps} local steps of "
        f"batch {config.batch_size}, lr {config.lr}; test loss {n['test_loss'][0]:.3f} → "
        f"{n['test_loss'][1]:.3f} nats per character. Analysis: default operator settings, "
        "eval mode, one FederatedOperator (K + 1 stacked Hessians) per checkpoint; no density, "
        "alignment or subsets. Single run, not repeated.",
        table_rows(n, threads), reading(n, threads, busy))


def main(argv: list[str] | None = None) -> int:
    ap = bt.trajectory_parser(__doc__.splitlines()[0], "3 roles, 2 rounds", RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None or args.fast else RESULTS
    command = shlex.join(["python", "experiments/benchmarks/bench_lm_trajectory.py",
                          *(argv if argv is not None else sys.argv[1:])])
    busy = _timing.busy_cores()
    config = train_config(FAST if args.fast else FULL, args.seed)
    a, n = bt.measure(config, args.workdir, args.threads, args.seed,
                      f"{config.algo} ({config.adapters} adapters) {config.model}: "
                      f"{config.clients} roles, {config.rounds} rounds",
                      lambda run, a, train_s: numbers(run, a, train_s, config.clients))
    bt.publish(report(n, a, config, args.threads, busy, command), out, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
