"""Shared pieces of the figure pipeline: sizes, the digits and least-squares configs, cached
training runs and the stable-rank analysis of the FedLoRU run."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # light at import: the CLI wrapper builds its parser from this package
    import pandas as pd

CSV_COLUMNS: dict[str, list[str]] = {
    "client_vs_server_stable_rank": [
        "round", "server", "server_stderr", "client_mean", "client_stderr", "client_sd",
        "client_min", "client_max", "num_clients", "frac_clients_above", "ratio",
        "ratio_stderr", "z",
    ],
    "stable_rank_vs_dataset_size": ["round", "subject", "n", "mean", "stderr", "sd", "draws"],
    "gradient_alignment": [
        "round", "layer", "rank", "value", "stderr", "minus_full", "minus_full_stderr",
        "pairs_above_full", "minus_full_p10", "minus_full_p90",
    ],
    "fedlrt_lowrank_lsq": [
        "correction", "round", "train_loss", "test_loss", "rank", "floats_up", "floats_down",
    ],
    "communication": [
        "algo", "floats_per_round", "relative_to_fedavg", "final_test_accuracy",
        "last5_test_accuracy", "last5_test_accuracy_sd", "best_test_accuracy", "cum_floats",
        "rounds",
    ],
    "theory_model": ["model", "n", "source", "stable_rank", "stderr", "draws"],
    "accuracy_vs_clients": [
        "dataset", "partition", "clients", "client_fraction", "algo", "seeds", "diverged",
        "mean", "ci_low", "ci_high", "floats", "lr",
    ],
}
"""Columns of each figure's CSV (tests check them)."""

ALGOS = ("fedavg", "fedlora", "fedloru", "fedlrt")


@dataclass(frozen=True)
class Scale:
    """Sizes of every experiment; :meth:`full` for the paper, :meth:`fast` for smoke runs."""

    name: str
    hidden: tuple[int, ...]
    clients: int
    rounds: int
    save_every: int
    rank: int
    matvecs: int
    subset_sizes: tuple[int, ...]
    subset_draws: int
    alignment_ranks: tuple[int, ...]
    lsq_clients: int
    lsq_rounds: int
    lsq_local_steps: int
    theory_dim: int
    theory_draws: int
    theory_ns: tuple[int, ...]
    client_counts: tuple[int, ...]
    lr: float = 0.3  # the fast scale's tiny FedLoRU diverged at 0.3 once the trainer changed
    # per-algorithm learning rates where the shared one diverges: trained from scratch (W0 = 0,
    # the paper's default) FedLoRA diverged at 0.3 in round 8 of the full-scale digits run and
    # FedLoRU in round 2 with 5 clients (the trainer now stops on divergence)
    algo_lr: tuple[tuple[str, float], ...] = (("fedlora", 0.1), ("fedloru", 0.1))

    @classmethod
    def full(cls) -> Scale:
        return cls("full", hidden=(64, 64), clients=20, rounds=40, save_every=2, rank=8,
                   matvecs=40, subset_sizes=(25, 50, 100, 200, 400, 800), subset_draws=5,
                   alignment_ranks=(1, 2, 4, 8, 16), lsq_clients=10, lsq_rounds=30,
                   lsq_local_steps=10, theory_dim=1000, theory_draws=16,
                   theory_ns=(25, 50, 100, 200, 400, 800, 1600),
                   client_counts=(5, 10, 20, 40))

    @classmethod
    def fast(cls) -> Scale:
        return cls("fast", hidden=(16, 16), clients=4, rounds=4, save_every=2, rank=4,
                   matvecs=12, subset_sizes=(50, 200), subset_draws=2,
                   alignment_ranks=(1, 2, 4), lsq_clients=4, lsq_rounds=4, lsq_local_steps=3,
                   theory_dim=200, theory_draws=2, theory_ns=(25, 100, 400),
                   client_counts=(2, 4), lr=0.1)


@dataclass
class Context:
    out: Path
    work: Path
    scale: Scale
    seed: int
    progress: bool
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.work / self.scale.name / f"seed{self.seed}"

    def say(self, message: str) -> None:
        """One progress line (``[figures] HH:MM:SS message``) when progress is on: a long
        figure reports where it is instead of staying silent."""
        if self.progress:
            print(f"[figures] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr,
                  flush=True)

    def shown(self, path: str | Path) -> str:
        """A path under the work directory as the committed files show it, ``WORK/...``:
        never the absolute path of the machine that made the figures (the work directory
        only caches runs; any gives the same figures)."""
        return "WORK/" + Path(os.path.relpath(Path(path).resolve(),
                                              self.work.resolve())).as_posix()


@dataclass
class Made:
    """What one figure function hands back for its files and the README."""

    frame: pd.DataFrame
    fig: Any
    configs: dict[str, Any]
    reading: str


# ---- configs and runs -----------------------------------------------------------------------
def digits_config(algo: str, s: Scale, seed: int) -> dict[str, Any]:
    """The digits federation shared by every digits figure (one run per algorithm)."""
    return {
        "algo": algo, "dataset": "digits", "model": "mlp",
        "model_kwargs": {"hidden": list(s.hidden)},
        "clients": s.clients, "partition": "dirichlet", "dirichlet_alpha": 0.5,
        "rounds": s.rounds, "save_every": s.save_every, "lr": dict(s.algo_lr).get(algo, s.lr),
        "batch_size": 32,
        "local_epochs": 2, "rank": s.rank, "merge_every": 5, "factorize": ["fc1", "fc2"],
        "seed": seed,
    }  # fmt: skip


def lsq_config(correction: str, s: Scale, seed: int) -> dict[str, Any]:
    return {
        "algo": "fedlrt", "dataset": "lowrank-lsq", "model": "linear", "factorize": ["fc"],
        "clients": s.lsq_clients, "partition": "iid", "rounds": s.lsq_rounds,
        "save_every": s.lsq_rounds, "rank": 8, "correction": correction, "lr": 0.1,
        "local_steps": s.lsq_local_steps, "batch_size": 1000, "trunc_theta": 0.05,
        "seed": seed,
    }  # fmt: skip


def train_run(ctx: Context, config: dict[str, Any], name: str):
    from hessrank.fl import train

    key = f"run:{name}"
    if key not in ctx.cache:
        ctx.say(f"training (or reusing) {name}: {config['algo']}, {config['clients']} clients, "
                f"{config['rounds']} rounds")
        ctx.cache[key] = train(config, ctx.runs / name, progress=ctx.progress)
    return ctx.cache[key]


def spectra(ctx: Context) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Stable ranks of server, clients and subsets at every saved round of the FedLoRU run."""
    from hessrank.analysis.trajectory import analyze

    if "spectra" not in ctx.cache:
        s = ctx.scale
        run = train_run(ctx, digits_config("fedloru", s, ctx.seed), "digits_fedloru")
        subjects = ["server", "clients", *(f"subset:{n}x{s.subset_draws}"
                                           for n in s.subset_sizes)]
        settings = {"run": ctx.shown(run.path), "subjects": ",".join(subjects),
                    "quantities": "stable-rank", "matvecs": s.matvecs, "seed": ctx.seed,
                    "rounds": "all saved"}
        ctx.say(f"analyzing {ctx.shown(run.path)}: stable rank of {', '.join(subjects)}")
        table = analyze(run.path, subjects=subjects, quantities=("stable-rank",),
                        matvecs=s.matvecs, seed=ctx.seed, out=run.path / "analysis_spectra",
                        progress=ctx.progress)
        check_errors(table, "stable-rank analysis")
        ctx.cache["spectra"] = (table, settings)
    return ctx.cache["spectra"]


def check_errors(table: pd.DataFrame, what: str) -> None:
    errors = table.attrs.get("errors") or []
    if errors:
        first = errors[0]
        raise RuntimeError(f"{what}: {len(errors)} unit(s) failed, e.g. round {first['round']}: "
                           f"{first['error']}; see {table.attrs.get('out')}/errors.csv")

