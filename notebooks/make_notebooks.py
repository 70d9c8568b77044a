"""Generate the research notebooks from code, so they are reviewable as a diff.

    .venv/bin/python notebooks/make_notebooks.py            # write the .ipynb files
    .venv/bin/python notebooks/make_notebooks.py --execute  # ... and run them in place

Each notebook reads ``HESSRANK_FAST=1`` to shrink itself (tests use it). The verdict cells
compute their conclusion from the numbers; nothing in them is a hand-written claim.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
torch.set_num_threads(1)  # small models: one thread is fastest (see hessrank/figures.py)
FAST = os.environ.get("HESSRANK_FAST") == "1"
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
WORK = Path(os.environ.get("HESSRANK_WORK", ROOT / "runs" / "notebooks"))
SEED = 0
print("fast mode" if FAST else "full settings", "| work dir:", WORK)'''

TRAIN = '''\
from hessrank.fl import train

config = {
    "algo": "fedloru", "dataset": "digits", "model": "mlp",
    "model_kwargs": {"hidden": [16, 16] if FAST else [64, 64]},
    "clients": 4 if FAST else 20, "partition": "dirichlet", "dirichlet_alpha": 0.5,
    "rounds": 4 if FAST else 40, "save_every": 2, "lr": 0.3, "batch_size": 32,
    "local_epochs": 2, "rank": 4 if FAST else 8, "merge_every": 5,
    "factorize": ["fc1", "fc2"], "seed": SEED,
}
# The same config as `hessrank figures` uses, so a finished figures run is reused when present.
scale = "fast" if FAST else "full"
figures_run = ROOT / "runs" / "figures" / scale / f"seed{SEED}" / "digits_fedloru"
run_dir = figures_run if figures_run.is_dir() else WORK / scale / "digits_fedloru"
run = train(config, run_dir, progress=False)  # returns at once if the run is already finished
m = run.metrics()
print(run)
print("test accuracy at the last round:", m["test_accuracy"].iloc[-1])
print("client sizes:", [int(y.shape[0]) for _, y in run.client_data()])'''


def notebook_rank_discrepancy() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 01 — Rank discrepancy: client vs server Hessians\n\n"
            "**Hypothesis (a)** (FedLoRU, Park & Klabjan): along the whole training trajectory,\n"
            "1. the Hessian of each client's loss L_c (small local data) has a *larger* stable "
            "rank srank(H) = ‖H‖_F²/‖H‖₂² than the Hessian of the server loss L = Σ_c (n_c/N) "
            "L_c, and\n"
            "2. the Hessian of a random subset of n samples has a larger stable rank for "
            "smaller n.\n\n"
            "We train FedLoRU on the embedded digits data (Dirichlet α = 0.5 label skew), "
            "estimate stable ranks with error bars at every saved round, and *test* both parts "
            "with numbers. The toolkit can refute as well as confirm; the verdict at the end is "
            "computed from the table. Set `HESSRANK_FAST=1` for a seconds-long smoke version."
        ),
        new_code_cell(SETUP),
        new_markdown_cell("## 1. Train (or reuse) a small federation"),
        new_code_cell(TRAIN),
        new_markdown_cell(
            "## 2. Analyze: server, every client, random subsets\n\n"
            "One stacked operator per round serves the server and all clients (one data pass); "
            "subsets of n samples come in D seeded draws. Each stable rank carries a "
            "delta-method standard error from the estimator."
        ),
        new_code_cell('''\
from hessrank.analysis.trajectory import analyze

sizes = [50, 200] if FAST else [25, 50, 100, 200, 400, 800]
draws = 2 if FAST else 5
subjects = ["server", "clients", *(f"subset:{n}x{draws}" for n in sizes)]
table = analyze(run.path, subjects=subjects, quantities=["stable-rank"],
                matvecs=12 if FAST else 40, seed=SEED,
                out=run.path / "analysis_spectra", progress=False)
sr = table[table["quantity"] == "stable-rank"]
sr.groupby(["round", "subject_kind"])["value"].mean().unstack().round(2)'''),
        new_markdown_cell(
            "## 3. Test part 1: clients vs server, per round\n\n"
            "z = (mean client srank − server srank) / √(stderr²_client-mean + stderr²_server), "
            "where the client-mean stderr is the spread across clients / √K (it contains the "
            "estimator noise). We also count the clients whose own srank exceeds the server's "
            "by more than 2 combined stderr (paired, per client)."
        ),
        new_code_cell('''\
server = sr[sr.subject_kind == "server"].set_index("round")
rows = []
for r, cl in sr[sr.subject_kind == "client"].groupby("round"):
    v, se = cl["value"].to_numpy(), cl["stderr"].to_numpy()
    s, s_se = server.loc[r, "value"], server.loc[r, "stderr"]
    mean, se_mean = v.mean(), v.std(ddof=1) / np.sqrt(len(v))
    rows.append({
        "round": r, "server": s, "client_mean": mean, "ratio": mean / s,
        "z": (mean - s) / np.hypot(se_mean, s_se),
        "clients_sig_above": np.mean(v - s > 2 * np.hypot(se, s_se)),
        "clients_sig_below": np.mean(s - v > 2 * np.hypot(se, s_se)),
    })
per_round = pd.DataFrame(rows)
per_round.round(3)'''),
        new_code_cell('''\
from hessrank.plotting import plot_ratio, plot_stable_rank
from IPython.display import Image, display

fig_dir = WORK / "nb01_figures"
for path in plot_stable_rank(sr, fig_dir)[:1] + plot_ratio(sr, fig_dir)[:1]:
    display(Image(filename=str(path)))'''),
        new_markdown_cell(
            "## 4. Test part 2: monotonicity in the subset size n\n\n"
            "Per round: the mean srank over the D draws for each n, and the server (n = N). "
            "Monotone means strictly decreasing in n; the Spearman correlation ρ(n, srank) "
            "is −1 for a perfectly decreasing curve. A step n → n' counts as significant if "
            "the drop exceeds 2 combined stderr (spread over draws / √D)."
        ),
        new_code_cell('''\
sub = sr[sr.subject_kind.isin(["subset", "server"])]
agg = sub.groupby(["round", "subject_size"])["value"].agg(["mean", "std", "count"]).reset_index()
agg["stderr"] = np.where(agg["count"] > 1, agg["std"] / np.sqrt(agg["count"]),
                         sub.groupby(["round", "subject_size"])["stderr"].first().to_numpy())
mono = []
for r, g in agg.groupby("round"):
    g = g.sort_values("subject_size")
    diffs = -np.diff(g["mean"].to_numpy())               # > 0: srank drops as n grows
    se = np.hypot(g["stderr"].to_numpy()[:-1], g["stderr"].to_numpy()[1:])
    mono.append({"round": r, "strictly_decreasing": bool(np.all(diffs > 0)),
                 "spearman": g["subject_size"].rank().corr(g["mean"].rank()),
                 "sig_drops": int(np.sum(diffs > 2 * se)),
                 "sig_rises": int(np.sum(-diffs > 2 * se)),
                 "steps": len(diffs)})
mono = pd.DataFrame(mono)
display(agg.pivot(index="round", columns="subject_size", values="mean").round(2))
mono'''),
        new_markdown_cell(
            "## 5. Verdict (computed)\n\n"
            "Rule: part 1 is **confirmed** if z > 2 at ≥ 90% of the saved rounds and "
            "**refuted** if z < −2 at ≥ 50% of them; part 2 is **confirmed** if at ≥ 90% of "
            "the rounds ρ(n, srank) < 0 with no significant rise between consecutive sizes, "
            "and **refuted** if at ≥ 50% ρ > 0 with no significant drop; anything else is "
            "**inconclusive**. "
            "\"Along the whole trajectory\" is the strict reading, so a minority of rounds that "
            "go the other way is reported."
        ),
        new_code_cell('''\
def verdict(frac_hold, frac_opposite):
    if frac_hold >= 0.9:
        return "CONFIRMS"
    if frac_opposite >= 0.5:
        return "REFUTES"
    return "INCONCLUSIVE"

n = len(per_round)
hold_a1 = float(np.mean(per_round["z"] > 2))
opp_a1 = float(np.mean(per_round["z"] < -2))
hold_a2 = float(np.mean((mono["spearman"] < 0) & (mono["sig_rises"] == 0)))
opp_a2 = float(np.mean((mono["spearman"] > 0) & (mono["sig_drops"] == 0)))
against = per_round.loc[per_round["z"] < -2, "round"].tolist()
print(f"(a.1) clients > server: significant at {hold_a1:.0%} of {n} rounds, "
      f"opposite (server > clients) at {opp_a1:.0%} (rounds {against}); "
      f"ratio mean client/server {per_round['ratio'].min():.2f}–{per_round['ratio'].max():.2f} "
      f"-> {verdict(hold_a1, opp_a1)}")
print(f"(a.2) srank decreasing in n: at {hold_a2:.0%} of rounds (ρ < 0, no significant rise); "
      f"strictly monotone at {mono['strictly_decreasing'].mean():.0%}; mean ρ "
      f"{mono['spearman'].mean():.2f}; opposite at {opp_a2:.0%} -> {verdict(hold_a2, opp_a2)}")
parts = [verdict(hold_a1, opp_a1), verdict(hold_a2, opp_a2)]
overall = ("CONFIRMED" if parts == ["CONFIRMS"] * 2 else
           "REFUTED" if "REFUTES" in parts else "INCONCLUSIVE")
print(f"Hypothesis (a) on this federation: {overall} (part 1 {parts[0]}, part 2 {parts[1]}); "
      f"it holds at every saved round: {min(hold_a1, hold_a2) == 1.0}")'''),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def notebook_gradient_alignment() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# 02 — Gradient alignment: rank-r vs full client gradients\n\n"
            "**Hypothesis (b)** (FedLoRU): the best rank-r approximations [G_c]_r of the "
            "client gradients G_c = ∇_W L_c (per weight matrix) are *more similar across "
            "clients* than the full gradients, i.e. A_r > A_full with A the mean pairwise "
            "cosine similarity over client pairs.\n\n"
            "We measure, at several rounds of a FedLoRU run on digits (Dirichlet α = 0.5), the "
            "paired difference A_r − A_full per layer with a leave-one-client-out jackknife "
            "stderr and the spread over client pairs, and compute a verdict from those numbers. "
            "Set `HESSRANK_FAST=1` for a smoke version."
        ),
        new_code_cell(SETUP),
        new_markdown_cell("## 1. Train (or reuse) a small federation"),
        new_code_cell(TRAIN),
        new_markdown_cell(
            "## 2. Client gradients at the global weights and pairwise cosines\n\n"
            "For each saved round in the selection, each client's full-batch gradient of each "
            "weight matrix; then the K×K cosine matrices C_r for each truncation rank r and "
            "C_full. D = C_r − C_full is the per-pair change; its off-diagonal mean is "
            "A_r − A_full. Clients, not pairs, are the independent units, so the error bar is "
            "the jackknife that leaves one client out."
        ),
        new_code_cell('''\
from hessrank.analysis.alignment import client_gradients, low_rank, pairwise_cosines

ranks = [1, 2, 4] if FAST else [1, 2, 4, 8, 16]
saved = run.rounds()
rounds = sorted({saved[0], saved[len(saved) // 4], saved[len(saved) // 2], saved[-1]})


def offdiag_mean_jackknife(D):
    K = D.shape[0]
    def mean(keep):
        sub = D[np.ix_(keep, keep)]
        return np.nanmean(sub[np.triu_indices(len(keep), k=1)])
    loo = np.array([mean(np.delete(np.arange(K), i)) for i in range(K)])
    return mean(np.arange(K)), np.sqrt((K - 1) / K * np.sum((loo - loo.mean()) ** 2))


rows = []
data, loss_fn = run.client_data(), run.loss_fn()
for r in rounds:
    grads = client_gradients(run.load_model(r), loss_fn, data)
    for layer, gs in grads.items():
        mats = [g.reshape(g.shape[0], -1) for g in gs]
        full = pairwise_cosines(mats)
        a_full, _ = offdiag_mean_jackknife(full)
        iu = np.triu_indices(len(mats), k=1)
        for k in ranks:
            D = pairwise_cosines([low_rank(G, k) for G in mats]) - full
            diff, se = offdiag_mean_jackknife(D)
            rows.append({"round": r, "layer": layer, "shape": "x".join(map(str, mats[0].shape)),
                         "rank": k, "A_full": a_full, "A_r": a_full + diff, "diff": diff,
                         "stderr": se, "z": diff / se,
                         "pairs_above": np.mean(D[iu] > 0),
                         "pair_p10": np.quantile(D[iu], 0.1), "pair_p90": np.quantile(D[iu], 0.9)})
align = pd.DataFrame(rows)
align.round(3)'''),
        new_code_cell('''\
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, len(rounds), figsize=(3.6 * len(rounds), 3.2), sharey=True,
                         squeeze=False)
for ax, r in zip(axes[0], rounds):
    for i, (layer, g) in enumerate(align[align["round"] == r].groupby("layer")):
        ax.errorbar(g["rank"], g["diff"], yerr=2 * g["stderr"], marker="o", ms=3, capsize=2,
                    color=f"C{i}", label=layer)
        ax.fill_between(g["rank"], g["pair_p10"], g["pair_p90"], color=f"C{i}", alpha=0.1)
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_title(f"round {r}", fontsize=9)
    ax.set_xlabel("rank r")
axes[0][0].set_ylabel("A_r − A_full (± 2 jackknife stderr;\\nband: 10–90% of client pairs)")
axes[0][-1].legend(fontsize=7)
plt.tight_layout()
plt.show()'''),
        new_markdown_cell(
            "## 3. Verdict (computed)\n\n"
            "Over all (round, layer) cases at the smallest rank r = 1 and at every rank: "
            "**confirmed** if A_r − A_full > 2 stderr in ≥ 90% of the cases, **refuted** if "
            "A_r − A_full < −2 stderr in ≥ 50%, else **inconclusive**. Matrices whose smaller "
            "side is ≤ r are left out at that r (there the truncation is the identity)."
        ),
        new_code_cell('''\
def verdict(frac_hold, frac_opposite):
    if frac_hold >= 0.9:
        return "CONFIRMS"
    if frac_opposite >= 0.5:
        return "REFUTES"
    return "INCONCLUSIVE"

small_side = align["shape"].map(lambda s: min(int(t) for t in s.split("x")))
cases = align[small_side > align["rank"]]
summary = cases.groupby("rank").apply(
    lambda g: pd.Series({"cases": len(g), "frac_above": np.mean(g["z"] > 2),
                         "frac_below": np.mean(g["z"] < -2), "mean_diff": g["diff"].mean(),
                         "pairs_above": g["pairs_above"].mean()}),
    include_groups=False)
display(summary.round(3))
r1 = cases[cases["rank"] == min(ranks)]
hold, opp = float(np.mean(r1["z"] > 2)), float(np.mean(r1["z"] < -2))
allr_hold, allr_opp = float(np.mean(cases["z"] > 2)), float(np.mean(cases["z"] < -2))
print(f"rank {min(ranks)}: A_r > A_full significantly in {hold:.0%} of {len(r1)} (round, layer) "
      f"cases, below in {opp:.0%}; mean A_r − A_full {r1['diff'].mean():+.3f}; share of client "
      f"pairs whose cosine rises {r1['pairs_above'].mean():.2f} -> {verdict(hold, opp)}")
print(f"all ranks: above in {allr_hold:.0%}, below in {allr_opp:.0%} of {len(cases)} cases "
      f"-> {verdict(allr_hold, allr_opp)}")
v1, vall = verdict(hold, opp), verdict(allr_hold, allr_opp)
overall = v1 if v1 == vall else ("REFUTED" if "REFUTES" in (v1, vall) else "INCONCLUSIVE")
overall = {"CONFIRMS": "CONFIRMED", "REFUTES": "REFUTED"}.get(overall, overall)
print(f"Hypothesis (b) on this federation: {overall} "
      f"(rank {min(ranks)}: {v1}, all ranks: {vall})")'''),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
    return {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}}


NOTEBOOKS = {
    "01_rank_discrepancy.ipynb": notebook_rank_discrepancy,
    "02_gradient_alignment.ipynb": notebook_gradient_alignment,
}


def write(directory: Path = HERE) -> list[Path]:
    paths = []
    for name, build in NOTEBOOKS.items():
        path = directory / name
        nbformat.write(build(), path)
        paths.append(path)
    return paths


def execute(path: Path, *, fast: bool = False, timeout: int = 1200) -> None:
    """Run a notebook in place (cwd = notebooks/), with HESSRANK_FAST set as asked."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("HESSRANK_FAST")
    os.environ["HESSRANK_FAST"] = "1" if fast else "0"
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("HESSRANK_FAST", None)
        else:
            os.environ["HESSRANK_FAST"] = old
    nbformat.write(nb, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run them in place afterwards")
    parser.add_argument("--fast", action="store_true", help="execute with HESSRANK_FAST=1")
    args = parser.parse_args()
    for path in write():
        print(path)
        if args.execute:
            execute(path, fast=args.fast)


if __name__ == "__main__":
    main()
