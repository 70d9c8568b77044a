"""Figures 1–2: stable rank of client vs server Hessians, and of random subsets vs n."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from experiments.figures.common import CSV_COLUMNS, Context, Made, digits_config, spectra

ONE_RUN = ("A description of one training run: its rounds are not independent evidence; the "
           "replicated verdicts per training phase are in experiments/results/FINDINGS.md.")
"""Appended to the readings of the per-round figures."""


# ---- figure 1: client vs server -------------------------------------------------------------
def client_vs_server(ctx: Context) -> Made:
    from hessrank.analysis.inference import client_vs_server_summary

    table, settings = spectra(ctx)
    df = client_vs_server_summary(table)[CSV_COLUMNS["client_vs_server_stable_rank"]]

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
        f"{df['frac_clients_above'].max():.2f}. {ONE_RUN}"
    )
    configs = {"train": digits_config("fedloru", ctx.scale, ctx.seed), "analyze": settings}
    return Made(df, fig, configs, reading)


# ---- figure 2: dataset size -----------------------------------------------------------------
def dataset_size(ctx: Context) -> Made:
    table, settings = spectra(ctx)
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
        f"srank(n={sizes[0]})/srank(server) {ratio.min():.2f}–{ratio.max():.2f}. {ONE_RUN}"
    )
    configs = {"train": digits_config("fedloru", ctx.scale, ctx.seed), "analyze": settings}
    return Made(df, fig, configs, reading)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])

