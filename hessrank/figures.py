"""The paper figures, regenerated from scratch: train → analyze → plot (``hessrank figures``).

Each figure is produced by running code: federated runs are trained with
:func:`hessrank.fl.train` under a work directory (default ``runs/figures``, gitignored),
analyzed with :func:`hessrank.analysis.trajectory.analyze`, and drawn here. For each figure the
output directory receives ``NAME.png``, ``NAME.pdf``, ``NAME.csv`` (the numbers drawn) and
``NAME.json`` (command, configs, timing and the reading), and ``README.md`` is rebuilt from all
``*.json`` present, so ``--only`` refreshes one figure and keeps the others listed. Runs and
analyses are resumable: a finished run or analysis unit is reused, an interrupted one resumes.

Figures (digits, the embedded scikit-learn data, unless stated):

- ``client_vs_server_stable_rank``: FedLoRU, Dirichlet(α = 0.5) label skew; stable rank of each
  client's Hessian (mean ± stderr over clients, min–max band) vs the server's (± estimator
  stderr) along rounds, and the ratio mean client / server (delta-method error bar).
- ``stable_rank_vs_dataset_size``: same checkpoints; random subsets of n samples (D draws
  each, mean ± stderr over draws) and the server (n = N), vs round and vs n.
- ``gradient_alignment``: mean pairwise cosine of client gradients truncated to rank r, per
  weight matrix, vs r, at the first, a quarter, the middle and the last saved round
  (± leave-one-client-out jackknife).
- ``fedlrt_lowrank_lsq``: FeDLRT on ``lowrank-lsq`` (true rank 3, linear model, layer ``fc``
  factorized, iid clients — Dirichlet splits need class labels): training loss and the rank of
  ``fc`` vs round for the corrections full / simplified / none.
- ``communication``: floats communicated per round (relative to FedAvg) vs final test accuracy
  of FedAvg, FedLoRA, FedLoRU and FeDLRT on the same federation.

``fast=True`` shrinks every setting (a few rounds and clients, a small MLP, few matvecs) so the
whole set runs in well under a minute on two cores; it exists for tests and smoke runs, and its
numbers are not meant to be read.

Torch runs single-threaded here by default (``threads=1``): for these small models an extra
intra-op thread does not pay, and on a loaded two-core machine two threads made a FedAvg round
on digits take 11 s instead of 0.05 s (OpenMP threads waiting on each other).

Example:
    >>> paths = make_figures("paper_figures_smoke", fast=True)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used, so that building the CLI parser stays light
    import numpy as np
    import pandas as pd

__all__ = ["CSV_COLUMNS", "FIGURES", "Scale", "make_figures", "parse_only", "register"]

FIGURES: dict[str, str] = {
    "client_vs_server_stable_rank": "stable rank of client vs server Hessians along FedLoRU",
    "stable_rank_vs_dataset_size": "stable rank of Hessians of random subsets of n samples",
    "gradient_alignment": "client-gradient alignment, rank-r truncation vs full",
    "fedlrt_lowrank_lsq": "FeDLRT on low-rank least squares: loss and rank per correction",
    "communication": "floats per round (relative to FedAvg) vs final test accuracy",
}
"""Figure name → one-line description, in the order they are made."""

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
}
"""Columns of each figure's CSV (tests check them)."""

_ALGOS = ("fedavg", "fedlora", "fedloru", "fedlrt")


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

    @classmethod
    def full(cls) -> Scale:
        return cls("full", hidden=(64, 64), clients=20, rounds=40, save_every=2, rank=8,
                   matvecs=40, subset_sizes=(25, 50, 100, 200, 400, 800), subset_draws=5,
                   alignment_ranks=(1, 2, 4, 8, 16), lsq_clients=10, lsq_rounds=30,
                   lsq_local_steps=10)

    @classmethod
    def fast(cls) -> Scale:
        return cls("fast", hidden=(16, 16), clients=4, rounds=4, save_every=2, rank=4,
                   matvecs=12, subset_sizes=(50, 200), subset_draws=2,
                   alignment_ranks=(1, 2, 4), lsq_clients=4, lsq_rounds=4, lsq_local_steps=3)


@dataclass
class _Context:
    out: Path
    work: Path
    scale: Scale
    seed: int
    progress: bool
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.work / self.scale.name / f"seed{self.seed}"


@dataclass
class _Made:
    """What one figure function hands back for its files and the README."""

    frame: pd.DataFrame
    fig: Any
    configs: dict[str, Any]
    reading: str


# ---- configs and runs -----------------------------------------------------------------------
def _digits_config(algo: str, s: Scale, seed: int) -> dict[str, Any]:
    """The digits federation shared by every digits figure (one run per algorithm)."""
    return {
        "algo": algo, "dataset": "digits", "model": "mlp",
        "model_kwargs": {"hidden": list(s.hidden)},
        "clients": s.clients, "partition": "dirichlet", "dirichlet_alpha": 0.5,
        "rounds": s.rounds, "save_every": s.save_every, "lr": 0.3, "batch_size": 32,
        "local_epochs": 2, "rank": s.rank, "merge_every": 5, "factorize": ["fc1", "fc2"],
        "seed": seed,
    }  # fmt: skip


def _lsq_config(correction: str, s: Scale, seed: int) -> dict[str, Any]:
    return {
        "algo": "fedlrt", "dataset": "lowrank-lsq", "model": "linear", "factorize": ["fc"],
        "clients": s.lsq_clients, "partition": "iid", "rounds": s.lsq_rounds,
        "save_every": s.lsq_rounds, "rank": 8, "correction": correction, "lr": 0.1,
        "local_steps": s.lsq_local_steps, "batch_size": 1000, "trunc_theta": 0.05,
        "seed": seed,
    }  # fmt: skip


def _train(ctx: _Context, config: dict[str, Any], name: str):
    from hessrank.fl import train

    key = f"run:{name}"
    if key not in ctx.cache:
        ctx.cache[key] = train(config, ctx.runs / name, progress=ctx.progress)
    return ctx.cache[key]


def _spectra(ctx: _Context) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Stable ranks of server, clients and subsets at every saved round of the FedLoRU run."""
    from hessrank.analysis.trajectory import analyze

    if "spectra" not in ctx.cache:
        s = ctx.scale
        run = _train(ctx, _digits_config("fedloru", s, ctx.seed), "digits_fedloru")
        subjects = ["server", "clients", *(f"subset:{n}x{s.subset_draws}"
                                           for n in s.subset_sizes)]
        settings = {"run": str(run.path), "subjects": ",".join(subjects),
                    "quantities": "stable-rank", "matvecs": s.matvecs, "seed": ctx.seed,
                    "rounds": "all saved"}
        table = analyze(run.path, subjects=subjects, quantities=("stable-rank",),
                        matvecs=s.matvecs, seed=ctx.seed, out=run.path / "analysis_spectra",
                        progress=ctx.progress)
        _check_errors(table, "stable-rank analysis")
        ctx.cache["spectra"] = (table, settings)
    return ctx.cache["spectra"]


def _check_errors(table: pd.DataFrame, what: str) -> None:
    errors = table.attrs.get("errors") or []
    if errors:
        first = errors[0]
        raise RuntimeError(f"{what}: {len(errors)} unit(s) failed, e.g. round {first['round']}: "
                           f"{first['error']}; see {table.attrs.get('out')}/errors.csv")


# ---- figure 1: client vs server -------------------------------------------------------------
def _client_vs_server(ctx: _Context) -> _Made:
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    table, settings = _spectra(ctx)
    t = table[table["quantity"] == "stable-rank"]
    server = t[t["subject_kind"] == "server"].set_index("round")
    rows = []
    for r, sub in t[t["subject_kind"] == "client"].groupby("round"):
        v = sub["value"].to_numpy()
        k = len(v)
        sv, se_s = float(server.loc[r, "value"]), float(server.loc[r, "stderr"])
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if k > 1 else float("nan")
        se_m = sd / math.sqrt(k)
        ratio = mean / sv
        rows.append({
            "round": int(r), "server": sv, "server_stderr": se_s, "client_mean": mean,
            "client_stderr": se_m, "client_sd": sd, "client_min": float(v.min()),
            "client_max": float(v.max()), "num_clients": k,
            "frac_clients_above": float(np.mean(v > sv)), "ratio": ratio,
            "ratio_stderr": ratio * math.hypot(se_m / mean, se_s / sv),
            "z": (mean - sv) / math.hypot(se_m, se_s),
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["client_vs_server_stable_rank"])

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    ax.fill_between(df["round"], df["client_min"], df["client_max"], color="C0", alpha=0.18,
                    label=f"clients min–max ({int(df['num_clients'].iloc[0])})")
    ax.errorbar(df["round"], df["client_mean"], yerr=df["client_stderr"], color="C0",
                marker="s", ms=3, capsize=2, label="clients mean ± stderr")
    ax.errorbar(df["round"], df["server"], yerr=df["server_stderr"], color="k", marker="o",
                ms=3, capsize=2, label="server ± stderr")
    ax.set_xlabel("round")
    ax.set_ylabel("stable rank ‖H‖²_F / ‖H‖²₂")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    bx.errorbar(df["round"], df["ratio"], yerr=df["ratio_stderr"], color="C0", marker="o",
                ms=3, capsize=2, label="mean client / server")
    bx.fill_between(df["round"], df["client_min"] / df["server"],
                    df["client_max"] / df["server"], color="C0", alpha=0.18,
                    label="min–max client / server")
    bx.axhline(1.0, color="k", lw=0.8, ls=":")
    bx.set_xlabel("round")
    bx.set_ylabel("stable rank ratio client / server")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle("FedLoRU on digits, Dirichlet α=0.5: client vs server Hessian stable rank",
                 fontsize=9)

    n = len(df)
    above = int((df["client_mean"] > df["server"]).sum())
    sig_above, sig_below = int((df["z"] > 2).sum()), int((df["z"] < -2).sum())
    first, last = df.iloc[0], df.iloc[-1]
    reading = (
        f"mean client stable rank exceeds the server's at {above}/{n} saved rounds "
        f"(z > 2 at {sig_above}, z < −2 at {sig_below}); ratio mean client/server "
        f"{first['ratio']:.2f} ± {first['ratio_stderr']:.2f} at round {int(first['round'])} → "
        f"{last['ratio']:.2f} ± {last['ratio_stderr']:.2f} at round {int(last['round'])} "
        f"(range {df['ratio'].min():.2f}–{df['ratio'].max():.2f}); fraction of clients above "
        f"the server per round {df['frac_clients_above'].min():.2f}–"
        f"{df['frac_clients_above'].max():.2f}."
    )
    configs = {"train": _digits_config("fedloru", ctx.scale, ctx.seed), "analyze": settings}
    return _Made(df, fig, configs, reading)


# ---- figure 2: dataset size -----------------------------------------------------------------
def _dataset_size(ctx: _Context) -> _Made:
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    table, settings = _spectra(ctx)
    t = table[(table["quantity"] == "stable-rank")
              & table["subject_kind"].isin(["server", "subset"])]
    rows = []
    for (r, kind, n), sub in t.groupby(["round", "subject_kind", "subject_size"]):
        v = sub["value"].to_numpy()
        if kind == "server":
            sd, se = float("nan"), float(sub["stderr"].iloc[0])
        else:
            sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            se = sd / math.sqrt(len(v))
        rows.append({"round": int(r), "subject": "server" if kind == "server" else "subset",
                     "n": int(n), "mean": float(v.mean()), "stderr": se, "sd": sd,
                     "draws": len(v)})
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["stable_rank_vs_dataset_size"])
    df = df.sort_values(["round", "n"]).reset_index(drop=True)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    sizes = sorted(df["n"].unique())
    for i, n in enumerate(sizes):
        sub = df[df["n"] == n]
        is_server = sub["subject"].iloc[0] == "server"
        label = (f"server (n = N = {n}) ± stderr" if is_server
                 else f"subsets n = {n} (mean ± stderr of {int(sub['draws'].iloc[0])} draws)")
        ax.errorbar(sub["round"], sub["mean"], yerr=sub["stderr"].fillna(0),
                    color="k" if is_server else f"C{i}", marker="o", ms=3, capsize=2,
                    label=label)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("stable rank")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    rounds = sorted(df["round"].unique())
    shown = [rounds[i] for i in sorted({round(i * (len(rounds) - 1) / 5) for i in range(6)})]
    cmap = plt.cm.viridis
    for j, r in enumerate(shown):
        sub = df[df["round"] == r]
        bx.errorbar(sub["n"], sub["mean"], yerr=sub["stderr"].fillna(0), marker="o", ms=3,
                    capsize=2, color=cmap(j / max(len(shown) - 1, 1)), label=f"round {r}")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("number of samples n (server: N)")
    bx.set_ylabel("stable rank")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle("Hessian stable rank of random subsets vs all data (same FedLoRU checkpoints)",
                 fontsize=9)

    mono, spearman = 0, []
    for _, sub in df.groupby("round"):
        m = sub.sort_values("n")["mean"].to_numpy()
        mono += int(np.all(np.diff(m) < 0))
        spearman.append(_spearman(sub["n"].to_numpy(), sub["mean"].to_numpy()))
    smallest = df[df["n"] == sizes[0]].set_index("round")["mean"]
    srv = df[df["subject"] == "server"].set_index("round")["mean"]
    ratio = (smallest / srv).dropna()
    reading = (
        f"stable rank strictly decreases with n (n = {', '.join(map(str, sizes))}) at "
        f"{mono}/{len(rounds)} saved rounds; Spearman ρ(n, stable rank) per round "
        f"{min(spearman):.2f}…{max(spearman):.2f} (mean {np.mean(spearman):.2f}); "
        f"srank(n={sizes[0]})/srank(server) {ratio.min():.2f}–{ratio.max():.2f}."
    )
    configs = {"train": _digits_config("fedloru", ctx.scale, ctx.seed), "analyze": settings}
    return _Made(df, fig, configs, reading)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    import numpy as np
    import pandas as pd

    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


# ---- figure 3: gradient alignment -----------------------------------------------------------
def _alignment(ctx: _Context) -> _Made:
    import matplotlib.pyplot as plt
    import pandas as pd

    from hessrank.analysis.trajectory import analyze

    s = ctx.scale
    run = _train(ctx, _digits_config("fedloru", s, ctx.seed), "digits_fedloru")
    saved = run.rounds()
    rounds = sorted({saved[0], saved[len(saved) // 4], saved[len(saved) // 2], saved[-1]})
    ranks = [*s.alignment_ranks, None]
    table = analyze(run.path, rounds=rounds, subjects="clients", quantities=("alignment",),
                    seed=ctx.seed, out=run.path / "analysis_alignment", progress=ctx.progress,
                    alignment_ranks=ranks)
    _check_errors(table, "alignment analysis")
    t = table[table["quantity"] == "alignment"]
    paired = _paired_alignment(run, rounds, s.alignment_ranks)
    rows = []
    for row in t.itertuples():
        nan = float("nan")
        d = paired.get((int(row.round), row.layer, int(row.k)),
                       dict.fromkeys(CSV_COLUMNS["gradient_alignment"][5:], nan))
        rows.append({"round": int(row.round), "layer": row.layer, "rank": int(row.k),
                     "value": row.value, "stderr": row.stderr, **d})
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["gradient_alignment"])
    df = df.sort_values(["round", "layer", "rank"]).reset_index(drop=True)

    fig, axes = plt.subplots(1, len(rounds), figsize=(3.8 * len(rounds), 3.6), squeeze=False,
                             sharey=True, layout="constrained")
    pos = {k: i for i, k in enumerate(s.alignment_ranks)}
    pos[0] = len(s.alignment_ranks)
    labels = [str(k) for k in s.alignment_ranks] + ["full"]
    for ax, r in zip(axes[0], rounds):
        for i, (layer, sub) in enumerate(df[df["round"] == r].groupby("layer")):
            sub = sub.assign(x=sub["rank"].map(pos)).sort_values("x")
            ax.errorbar(sub["x"], sub["value"], yerr=sub["stderr"].fillna(0), marker="o",
                        ms=3, capsize=2, color=f"C{i}", label=layer)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(f"round {r}", fontsize=9)
        ax.set_xlabel("truncation rank r")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean pairwise cosine across clients")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Alignment of rank-r client gradients vs full gradients (± jackknife over "
                 "clients), FedLoRU on digits", fontsize=9)

    per_rank = []
    for k in s.alignment_ranks:
        sub = df[(df["rank"] == k) & df["minus_full_stderr"].notna()]
        up = int((sub["minus_full"] > 2 * sub["minus_full_stderr"]).sum())
        down = int((sub["minus_full"] < -2 * sub["minus_full_stderr"]).sum())
        per_rank.append(f"r={k}: {up} above / {down} below / {len(sub)}")
    low = df[df["rank"] == min(s.alignment_ranks)]
    r1 = min(s.alignment_ranks)
    reading = (
        f"(round, layer) cases where A_r − A_full is more than 2 jackknife stderr above / below "
        f"zero — {'; '.join(per_rank)}; A_{r1} − A_full ranges {low['minus_full'].min():+.3f}…"
        f"{low['minus_full'].max():+.3f} (mean {low['minus_full'].mean():+.3f}), share of client "
        f"pairs with a higher rank-{r1} cosine {low['pairs_above_full'].mean():.2f} on average; "
        f"full-gradient alignment {df[df['rank'] == 0]['value'].min():.3f}–"
        f"{df[df['rank'] == 0]['value'].max():.3f}."
    )
    configs = {"train": _digits_config("fedloru", s, ctx.seed),
               "analyze": {"run": str(run.path), "rounds": rounds, "subjects": "clients",
                           "quantities": "alignment",
                           "alignment_ranks": [*s.alignment_ranks, "full"]}}
    return _Made(df, fig, configs, reading)


def _jackknife_offdiag(D: np.ndarray) -> tuple[float, float]:
    """Mean of the off-diagonal pairs of a symmetric K×K matrix and its leave-one-client-out
    jackknife stderr (clients are the independent units, pairs are not)."""
    import numpy as np

    K = D.shape[0]

    def mean(keep: np.ndarray) -> float:
        sub = D[np.ix_(keep, keep)]
        return float(np.nanmean(sub[np.triu_indices(len(keep), k=1)]))

    full = mean(np.arange(K))
    if K < 3:
        return full, float("nan")
    loo = np.array([mean(np.delete(np.arange(K), i)) for i in range(K)])
    return full, float(math.sqrt((K - 1) / K * np.sum((loo - loo.mean()) ** 2)))


def _paired_alignment(run, rounds: Sequence[int], ranks: Sequence[int]) -> dict:
    """Per (round, layer, rank): the paired difference A_r − A_full of pairwise cosines, its
    jackknife stderr, the fraction of client pairs whose rank-r cosine exceeds their full one,
    and the 10%/90% quantiles of the per-pair difference."""
    import numpy as np

    from hessrank.analysis.alignment import client_gradients, low_rank, pairwise_cosines

    data, loss_fn = run.client_data(), run.loss_fn()
    out: dict[tuple[int, str, int], dict[str, float]] = {}
    for r in rounds:
        grads = client_gradients(run.load_model(r), loss_fn, data)
        for layer, gs in grads.items():
            mats = [g.reshape(g.shape[0], -1) for g in gs]
            full = pairwise_cosines(mats)
            iu = np.triu_indices(len(mats), k=1)
            for k in (*ranks, 0):
                if k >= min(mats[0].shape):  # the truncation is the identity: nothing to test
                    continue
                D = pairwise_cosines([low_rank(G, k) for G in mats]) - full if k else full * 0
                mean, se = _jackknife_offdiag(D)
                pairs = D[iu]
                out[(int(r), layer, int(k))] = {
                    "minus_full": mean, "minus_full_stderr": se,
                    "pairs_above_full": float(np.nanmean(pairs > 0)),
                    "minus_full_p10": float(np.nanquantile(pairs, 0.1)),
                    "minus_full_p90": float(np.nanquantile(pairs, 0.9)),
                }  # fmt: skip
    return out


# ---- figure 4: FeDLRT on low-rank least squares ---------------------------------------------
def _fedlrt_lsq(ctx: _Context) -> _Made:
    import matplotlib.pyplot as plt
    import pandas as pd

    s = ctx.scale
    rows = []
    for corr in ("full", "simplified", "none"):
        run = _train(ctx, _lsq_config(corr, s, ctx.seed), f"lsq_fedlrt_{corr}")
        for m in run.metrics().to_dict("records"):
            ranks = m.get("ranks") or {}
            rows.append({
                "correction": corr, "round": int(m["round"]), "train_loss": m["train_loss"],
                "test_loss": m["test_loss"], "rank": ranks.get("fc", float("nan")),
                "floats_up": m["floats_up_total"], "floats_down": m["floats_down_total"],
            })  # fmt: skip
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["fedlrt_lowrank_lsq"])
    from hessrank.datasets import load_dataset

    true_rank = int(load_dataset("lowrank-lsq", seed=ctx.seed).meta["true_rank"])

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    styles = {"full": ("C0", "-"), "simplified": ("C1", "--"), "none": ("C2", ":")}
    for corr, sub in df.groupby("correction", sort=False):
        c, ls = styles[corr]
        ax.plot(sub["round"], sub["train_loss"].clip(lower=1e-16), color=c, ls=ls, marker="o",
                ms=2, label=f"correction {corr}")
        r = sub[sub["round"] > 0]
        bx.plot(r["round"], r["rank"], color=c, ls=ls, marker="o", ms=2,
                label=f"correction {corr}")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("global training loss (½ mean squared error)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    bx.axhline(true_rank, color="k", lw=0.8, ls="--", label=f"true rank {true_rank}")
    bx.set_xlabel("round")
    bx.set_ylabel("rank of fc after truncation")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle(f"FeDLRT on lowrank-lsq (linear model, {s.lsq_clients} iid clients, "
                 f"{s.lsq_local_steps} full-batch local steps)", fontsize=9)

    parts = []
    for corr, sub in df.groupby("correction", sort=False):
        last = sub.iloc[-1]
        hit = sub[sub["train_loss"] < 1e-6]
        when = f"round {int(hit['round'].iloc[0])}" if len(hit) else "never"
        parts.append(f"{corr}: final loss {last['train_loss']:.2e}, final rank "
                     f"{last['rank']:.0f}, loss < 1e-6 at {when}")
    reading = f"true rank {true_rank}; " + "; ".join(parts) + "."
    configs = {"train": {c: _lsq_config(c, s, ctx.seed) for c in ("full", "simplified", "none")},
               "notes": "iid clients: lowrank-lsq has real-valued targets, so the Dirichlet "
                        "label split does not apply"}
    return _Made(df, fig, configs, reading)


# ---- figure 5: communication ----------------------------------------------------------------
def _communication(ctx: _Context) -> _Made:
    import matplotlib.pyplot as plt
    import pandas as pd

    s = ctx.scale
    rows, curves = [], {}
    for algo in _ALGOS:
        run = _train(ctx, _digits_config(algo, s, ctx.seed), f"digits_{algo}")
        m = run.metrics()
        m = m[m["round"] > 0]
        per_round = (m["floats_up_total"] + m["floats_down_total"]).astype(float)
        acc = m["test_accuracy"].astype(float)
        curves[algo] = (m["cum_floats"].astype(float).to_numpy(), acc.to_numpy())
        rows.append({"algo": algo, "floats_per_round": float(per_round.mean()),
                     "relative_to_fedavg": float("nan"),
                     "final_test_accuracy": float(acc.dropna().iloc[-1]),
                     "last5_test_accuracy": float(acc.dropna().iloc[-5:].mean()),
                     "last5_test_accuracy_sd": float(acc.dropna().iloc[-5:].std(ddof=1)),
                     "best_test_accuracy": float(acc.max()),
                     "cum_floats": float(m["cum_floats"].iloc[-1]), "rounds": int(len(m))})
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["communication"])
    base = float(df.loc[df["algo"] == "fedavg", "floats_per_round"].iloc[0])
    df["relative_to_fedavg"] = df["floats_per_round"] / base

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for i, row in df.iterrows():
        ax.errorbar(row["relative_to_fedavg"], row["last5_test_accuracy"],
                    yerr=row["last5_test_accuracy_sd"], color=f"C{i}", marker="o", ms=5,
                    capsize=3, zorder=3)
        ax.annotate(row["algo"], (row["relative_to_fedavg"], row["last5_test_accuracy"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
        x, y = curves[row["algo"]]
        bx.plot(x, y, color=f"C{i}", marker="o", ms=2, label=row["algo"])
    ax.set_xlabel("floats communicated per round, relative to FedAvg")
    ax.set_ylabel(f"test accuracy, mean ± sd of rounds {max(s.rounds - 4, 1)}–{s.rounds}")
    ax.grid(alpha=0.3)
    bx.set_xscale("log")
    bx.set_xlabel("cumulative floats communicated (up + down)")
    bx.set_ylabel("test accuracy")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.suptitle(f"Communication vs accuracy on digits ({s.clients} clients, Dirichlet α=0.5, "
                 f"rank {s.rank} on fc1, fc2)", fontsize=9)

    parts = [f"{r.algo} {r.relative_to_fedavg:.2f}× floats, accuracy "
             f"{r.last5_test_accuracy:.3f} ± {r.last5_test_accuracy_sd:.3f}"
             for r in df.itertuples()]
    reading = ("floats per round relative to FedAvg and test accuracy (mean ± sd over the last "
               "5 rounds): " + "; ".join(parts) + ".")
    configs = {"train": {a: _digits_config(a, s, ctx.seed) for a in _ALGOS}}
    return _Made(df, fig, configs, reading)


_MAKERS: dict[str, Callable[[_Context], _Made]] = {
    "client_vs_server_stable_rank": _client_vs_server,
    "stable_rank_vs_dataset_size": _dataset_size,
    "gradient_alignment": _alignment,
    "fedlrt_lowrank_lsq": _fedlrt_lsq,
    "communication": _communication,
}


# ---- driver ---------------------------------------------------------------------------------
def parse_only(only: str | Sequence[str] | None) -> list[str]:
    """Figure names from "a,b" or a sequence (None: all); ValueError naming the valid ones."""
    if only is None:
        return list(FIGURES)
    items = only.split(",") if isinstance(only, str) else list(only)
    names = [n.strip() for n in items if n.strip()]
    bad = [n for n in names if n not in FIGURES]
    if bad or not names:
        what = f"unknown figure(s) {', '.join(map(repr, bad))}" if bad else "no figure given"
        raise ValueError(f"{what}; valid names: {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in names]


def _command(name: str, fast: bool, seed: int, out: Path, work: Path) -> str:
    args = ["hessrank", "figures", "--out", str(out), "--work", str(work), "--only", name,
            "--seed", str(seed)]
    if fast:
        args.append("--fast")
    return shlex.join(args)


def _write_readme(out: Path) -> Path:
    metas = []
    for p in out.glob("*.json"):
        try:
            meta = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if meta.get("figure") in FIGURES:
            metas.append(meta)
    order = list(FIGURES)
    metas.sort(key=lambda m: order.index(m["figure"]))
    lines = [
        "# Paper figures",
        "",
        "Generated by `hessrank figures` (`make figures`) from scratch: federated runs are "
        "trained, analyzed and plotted by code in `hessrank/figures.py`. Each figure has a PNG, "
        "a PDF, the CSV of the numbers drawn and a JSON with the configs. The readings below "
        "are computed from those numbers when the figure is made. Error bars are standard "
        "errors (estimator stderr for single Hessians, spread/√count over clients or subset "
        "draws, leave-one-client-out jackknife for alignment).",
        "",
    ]
    for m in metas:
        files = ", ".join(f"[`{f}`]({f})" for f in m["files"])
        lines += [
            f"## {m['figure']}",
            "",
            f"![{m['figure']}]({m['figure']}.png)",
            "",
            f"{m['description'][0].upper() + m['description'][1:]}.",
            "",
            f"**Reading:** {m['reading']}",
            "",
            f"- files: {files}",
            f"- command: `{m['command']}` (scale `{m['scale']}`, seed {m['seed']}; took "
            f"{m['seconds']:.0f} s here, runs and analysis units found in the work directory "
            "reused)",
            "",
            "<details><summary>config</summary>",
            "",
            "```json",
            json.dumps(m["configs"], indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
            "",
        ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def make_figures(
    out: str | Path = "paper_figures",
    fast: bool = False,
    only: str | Sequence[str] | None = None,
    seed: int = 0,
    *,
    work: str | Path | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> list[Path]:
    """Train, analyze and plot the paper figures (module doc); returns the written paths.

    Args:
        out: figure directory (PNG, PDF, CSV, JSON per figure, and README.md).
        fast: shrink everything for a smoke run (~20 s on two cores).
        only: figure names (comma string or sequence) to make; default all of :data:`FIGURES`.
        seed: seeds training (config ``seed``) and every estimator and subset draw.
        work: where runs and analyses go (default ``runs/figures``, relative to the current
            directory); finished runs and analysis units found there are reused.
        progress: show the trainer's and the analysis' progress bars.
        threads: torch intra-op threads while making the figures (restored afterwards);
            None leaves torch's setting alone.
    Returns:
        Paths of the files written (per figure PNG, PDF, CSV, JSON; then README.md).
    Raises:
        ValueError: an unknown figure name.
    """
    import matplotlib
    import torch

    matplotlib.use("Agg")
    names = parse_only(only)
    out = Path(out)
    work = Path(work) if work is not None else Path("runs") / "figures"
    scale = Scale.fast() if fast else Scale.full()
    ctx = _Context(out=out, work=work, scale=scale, seed=int(seed), progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        written = [_make_one(ctx, name) for name in names]
    finally:
        torch.set_num_threads(before)
    return [p for paths in written for p in paths] + [_write_readme(out)]


def _make_one(ctx: _Context, name: str) -> list[Path]:
    """Make one figure: its PNG, PDF, CSV and JSON (command, configs, timing, reading)."""
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    made = _MAKERS[name](ctx)
    out = ctx.out
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        made.fig.savefig(p, dpi=130 if p.suffix == ".png" else None, bbox_inches="tight")
    plt.close(made.fig)
    csv = out / f"{name}.csv"
    made.frame.to_csv(csv, index=False, float_format="%.6g")
    fast = ctx.scale.name == "fast"
    meta = {
        "figure": name, "description": FIGURES[name], "reading": made.reading,
        "command": _command(name, fast, ctx.seed, out, ctx.work),
        "files": [p.name for p in (*paths, csv)], "scale": ctx.scale.name,
        "sizes": asdict(ctx.scale), "seed": ctx.seed, "configs": made.configs,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    meta_path = out / f"{name}.json"
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    if ctx.progress:
        print(f"[figures] {name}: {meta['seconds']:.0f} s — {made.reading}", flush=True)
    return [*paths, csv, meta_path]


# ---- CLI --------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    paths = make_figures(args.out, fast=args.fast, only=args.only, seed=args.seed,
                         work=args.work, progress=not args.quiet, threads=args.threads)
    for p in paths:
        print(p)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``figures`` subcommand."""
    p = subparsers.add_parser(
        "figures", allow_abbrev=False, help="regenerate the paper figures from scratch",
        description="Train, analyze and plot every paper figure: PNG, PDF, CSV of the numbers "
                    "and a README with the command, config and a reading per figure.",
    )
    p.add_argument("--out", default="paper_figures", help="figure directory")
    p.add_argument("--work", default=str(Path("runs") / "figures"),
                   help="directory for runs and analyses (reused when present)")
    p.add_argument("--fast", action="store_true",
                   help="tiny settings for a smoke run (~20 s on two cores)")
    p.add_argument("--only", default=None,
                   help=f"comma list of figures (default all): {', '.join(FIGURES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: fastest for these small models)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run)
