"""Figures 4–5: FeDLRT on low-rank least squares, and communication vs accuracy."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from experiments.figures.common import (
    ALGOS,
    CSV_COLUMNS,
    Context,
    Made,
    digits_config,
    lsq_config,
    train_run,
)


# ---- figure 4: FeDLRT on low-rank least squares ---------------------------------------------
def fedlrt_lsq(ctx: Context) -> Made:
    s = ctx.scale
    rows = []
    for corr in ("full", "simplified", "none"):
        run = train_run(ctx, lsq_config(corr, s, ctx.seed), f"lsq_fedlrt_{corr}")
        for m in run.metrics().to_dict("records"):
            ranks = m.get("ranks") or {}
            rows.append({
                "correction": corr, "round": int(m["round"]), "train_loss": m["train_loss"],
                "test_loss": m["test_loss"], "rank": ranks.get("fc", float("nan")),
                "floats_up": m["floats_up_total"], "floats_down": m["floats_down_total"],
            })  # fmt: skip
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["fedlrt_lowrank_lsq"])
    from hessrank.data.datasets import load_dataset

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
    configs = {"train": {c: lsq_config(c, s, ctx.seed) for c in ("full", "simplified", "none")},
               "notes": "iid clients: lowrank-lsq has real-valued targets, so the Dirichlet "
                        "label split does not apply"}
    return Made(df, fig, configs, reading)


# ---- figure 5: communication ----------------------------------------------------------------
def communication(ctx: Context) -> Made:
    s = ctx.scale
    rows, curves = [], {}
    for algo in ALGOS:
        run = train_run(ctx, digits_config(algo, s, ctx.seed), f"digits_{algo}")
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
    configs = {"train": {a: digits_config(a, s, ctx.seed) for a in ALGOS}}
    return Made(df, fig, configs, reading)



# ---- figure 7: accuracy vs number of clients ------------------------------------------------
def accuracy_vs_clients(ctx: Context) -> Made:
    """Test accuracy of the four algorithms as the same training data is split over more
    clients (the setting of FedLoRU's Fig. 2b, on digits): every other setting fixed."""
    s = ctx.scale
    rows = []
    for k in s.client_counts:
        for algo in ALGOS:
            cfg = {**digits_config(algo, s, ctx.seed), "clients": int(k)}
            name = f"digits_{algo}" if k == s.clients else f"digits_{algo}_K{k}"
            m = train_run(ctx, cfg, name).metrics()
            m = m[m["round"] > 0]
            acc = m["test_accuracy"].astype(float).dropna()
            rows.append({"algo": algo, "clients": int(k),
                         "last5_test_accuracy": float(acc.iloc[-5:].mean()),
                         "last5_test_accuracy_sd": float(acc.iloc[-5:].std(ddof=1)),
                         "final_test_accuracy": float(acc.iloc[-1]),
                         "floats_per_round": float((m["floats_up_total"]
                                                    + m["floats_down_total"]).mean())})
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["accuracy_vs_clients"])

    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for i, (algo, sub) in enumerate(df.groupby("algo", sort=False)):
        ax.errorbar(sub["clients"], sub["last5_test_accuracy"],
                    yerr=sub["last5_test_accuracy_sd"], color=f"C{i}", marker="o", ms=4,
                    capsize=2, label=algo)
    ax.set_xscale("log")
    ax.set_xticks(list(s.client_counts), [str(k) for k in s.client_counts])
    ax.minorticks_off()
    ax.set_xlabel("number of clients K (same training data, split Dirichlet α=0.5)")
    ax.set_ylabel(f"test accuracy, mean ± sd of the last 5 of {s.rounds} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Accuracy vs number of clients on digits (rank {s.rank} on fc1, fc2)",
                 fontsize=9)

    parts = []
    for algo, sub in df.groupby("algo", sort=False):
        first, last = sub.iloc[0], sub.iloc[-1]
        parts.append(f"{algo} {first['last5_test_accuracy']:.3f} at K = {first['clients']} → "
                     f"{last['last5_test_accuracy']:.3f} at K = {last['clients']}")
    reading = ("test accuracy (mean of the last 5 rounds) as the clients multiply: "
               + "; ".join(parts) + ".")
    configs = {"train": {a: digits_config(a, s, ctx.seed) for a in ALGOS},
               "clients": list(s.client_counts)}
    return Made(df, fig, configs, reading)
