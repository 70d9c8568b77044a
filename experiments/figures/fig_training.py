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
    clients (the setting of FedLoRU's Fig. 2b), drawn from the clients benchmark's per-run
    results (``experiments/benchmarks/results/clients.csv``, ``bench_clients.py``; nothing
    is trained here): mean and 95 % t interval over seeds per algorithm and K, Dirichlet(0.5)
    partition, one panel per dataset; K = 100 with client fraction C = 0.1 drawn apart
    (hollow markers, dotted)."""
    from experiments.benchmarks.bench_clients import (
        ALGOS as BENCH_ALGOS,
    )
    from experiments.benchmarks.bench_clients import (
        RESULTS_CSV,
        cell_summary,
        paired_summary,
    )

    runs = pd.read_csv(RESULTS_CSV)
    runs = runs[runs["partition"] == "dirichlet"]
    df = cell_summary(runs)[CSV_COLUMNS["accuracy_vs_clients"]]
    pairs = paired_summary(runs)
    datasets = list(dict.fromkeys(df["dataset"]))
    algos = [a for a in BENCH_ALGOS if a in set(df["algo"])]
    ctx.say(f"accuracy_vs_clients: {len(runs)} Dirichlet runs read from {RESULTS_CSV.name}")

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.0 * len(datasets), 3.9),
                             layout="constrained", squeeze=False)
    offsets = {a: 1.0 + 0.035 * (i - (len(algos) - 1) / 2) for i, a in enumerate(algos)}
    for ax, dataset in zip(axes[0], datasets):
        sub = df[df["dataset"] == dataset]
        for i, algo in enumerate(algos):
            g = sub[sub["algo"] == algo].sort_values("clients")
            full, sampled = g[g["client_fraction"] == 1.0], g[g["client_fraction"] < 1.0]
            for part, style in ((full, {"ls": "-", "mfc": f"C{i}"}),
                                (sampled, {"ls": "none", "mfc": "white"})):
                if part.empty:
                    continue
                x = part["clients"] * offsets[algo]
                yerr = [part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]]
                ax.errorbar(x, part["mean"], yerr=yerr, color=f"C{i}", marker="o", ms=4,
                            capsize=2, label=algo if part is full else None, **style)
            for r in g[g["diverged"] > 0].itertuples():  # seeds left out of the mean
                ax.annotate(f"† {r.diverged}/{r.seeds} diverged", (r.clients * offsets[algo],
                            r.mean), textcoords="offset points", xytext=(4, -10), fontsize=6,
                            color=f"C{i}")
            if not full.empty and not sampled.empty:  # dotted link to the sampled setting
                last, pt = full.iloc[-1], sampled.iloc[0]
                ax.plot([last["clients"] * offsets[algo], pt["clients"] * offsets[algo]],
                        [last["mean"], pt["mean"]], color=f"C{i}", ls=":", lw=1)
        ks = sorted(set(sub["clients"]))
        labels = [f"{k}\nC = {c:g}" if c < 1 else f"{k}"
                  for k, c in sorted(set(zip(sub["clients"], sub["client_fraction"])))]
        if (sub["client_fraction"] < 1).any():
            ax.plot([], [], color="0.4", marker="o", mfc="white", ls=":",
                    label="hollow: a fraction C of the K clients per round")
        # accuracy lies in [0, 1]: a t interval of 2 seeds may reach past it (the CSV has it)
        ax.set_ylim(max(0.0, float(sub["ci_low"].min()) - 0.02), 1.0)
        ax.set_xscale("log")
        ax.set_xticks(ks, labels)
        ax.minorticks_off()
        ax.set_xlabel("number of clients K (C: fraction sampled per round; else all)")
        ax.set_ylabel("final test accuracy, mean ± 95 % CI over seeds")
        seeds = int(sub["seeds"].max())
        ax.set_title(f"{dataset}, Dirichlet α = 0.5, {seeds} seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    rounds = sorted(set(runs["rounds"][~runs["diverged"].astype(bool)]))
    fig.suptitle("Accuracy vs number of clients (lr tuned per algorithm and dataset; "
                 f"{'/'.join(map(str, rounds))} rounds; from bench_clients.py)", fontsize=9)

    parts = []
    for dataset in datasets:
        p = pairs[(pairs["dataset"] == dataset) & (pairs["partition"] == "dirichlet")]
        diffs = ", ".join(
            f"{r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] at K = {r.clients}"
            + (f" (C = {r.client_fraction:g})" if r.client_fraction < 1 else "")
            for r in p.itertuples())
        above = int((p["ci_low"] > 0).sum())
        below = int((p["ci_high"] < 0).sum())
        parts.append(f"{dataset}: FedLoRU − FedAvg {diffs}; the 95 % CI lies above 0 at "
                     f"{above}, below 0 at {below} and covers 0 at {len(p) - above - below} "
                     f"of {len(p)} settings")
    reading = ("final test accuracy, paired difference over seeds with its 95 % t interval, "
               "Dirichlet(0.5): " + "; ".join(parts) + ".")
    lrs = {d: {a: float(runs.loc[(runs["dataset"] == d) & (runs["algo"] == a), "lr"].iloc[0])
               for a in algos} for d in datasets}
    configs = {"source": "experiments/benchmarks/results/clients.csv (bench_clients.py; "
                         "its clients.md has the command, machine and the lr sweep)",
               "runs": int(len(runs)), "partition": "dirichlet", "lr": lrs,
               "settings": sorted({f"K={k}, C={c:g}" for k, c in
                                   zip(runs["clients"], runs["client_fraction"])}),
               "seeds": sorted(int(x) for x in set(runs["seed"]))}
    return Made(df, fig, configs, reading)
