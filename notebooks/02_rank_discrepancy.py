# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Rank discrepancy: client vs server Hessians, and subsets of n samples
#
# **Hypothesis (a)** (FedLoRU, Park & Klabjan): along training,
# 1. the Hessian of each client's loss L_c (small local data) has a *larger* stable rank
#    srank(H) = ‖H‖_F²/‖H‖₂² than the Hessian of the server loss L = Σ_c (n_c/N) L_c, and
# 2. the Hessian of a random subset of n samples has a larger stable rank for smaller n.
#
# The notebook estimates stable ranks (± estimator stderr) of the server, every client and
# random subsets at every saved round of a run, and tests both parts **per training phase**
# (first / middle / last third of the saved rounds) with bootstrap confidence intervals over
# the independent units (clients for part 1, subset draws for part 2). Rounds of one run are
# not independent evidence: they are averaged within a phase, never counted. The verdict
# can be *supported*, *reversed* or *inconclusive* per phase — "holds early, reverses late"
# is a possible answer (it is what a centralized digits MLP shows).

# %% tags=["parameters"]
RUN_DIR = None  # a run directory (hessrank train); None: train the figures' FedLoRU federation
SIZE = "full"  # "full" or "smoke" (tiny settings: checks that the notebook runs)
SEED = 0

# %%
import warnings

import numpy as np
import torch
from IPython.display import Image, display

import nbtools

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
torch.set_num_threads(1)  # small models: one thread is fastest
nbtools.banner(SIZE, RUN_DIR)
cfg = nbtools.ANALYSIS[SIZE]
run = nbtools.open_run(RUN_DIR, SIZE, SEED)
print(run)
print("client sizes:", [int(y.shape[0]) for _, y in run.client_data()])

# %% [markdown]
# ## 1. Stable ranks of server, clients and subsets at every saved round
#
# One stacked operator per round serves the server and all clients; subsets of n samples come
# in D seeded draws (the same D subsets at every round). Each stable rank carries a
# delta-method standard error from the estimator.

# %%
from hessrank.analysis.trajectory import analyze

sizes, draws = cfg["subset_sizes"], cfg["draws"]
subjects = ["server", "clients", *(f"subset:{n}x{draws}" for n in sizes)]
table = analyze(run.path, subjects=subjects, quantities=["stable-rank"],
                matvecs=cfg["matvecs"], seed=SEED, out=run.path / "analysis_spectra",
                progress=False)
sr = table[table["quantity"] == "stable-rank"].copy()
phase_of = nbtools.phase(sr["round"].unique())
sr["phase"] = sr["round"].map(phase_of)
sr.groupby(["round", "subject_kind"])["value"].mean().unstack().round(2)

# %% [markdown]
# ## 2. Clients vs server, per round
#
# The per-round summary shared with the paper figure and the demo
# (`hessrank.analysis.inference.client_vs_server_summary`): z = (mean
# client srank − server srank) / √(stderr²_client-mean + stderr²_server) with the client-mean
# stderr = spread across clients / √K. Shown for reading; the verdict below uses the
# phase-level bootstrap, not a count of rounds.

# %%
from hessrank.analysis.inference import client_vs_server_summary

per_round = client_vs_server_summary(sr)
per_round.insert(1, "phase", per_round["round"].map(phase_of))
per_round[["round", "phase", "server", "client_mean", "client_min", "client_max",
           "frac_clients_above", "ratio", "z"]].round(3)

# %%
from hessrank.analysis.plotting import plot_ratio, plot_stable_rank

fig_dir = run.path / "nb02_figures"
for path in plot_stable_rank(sr, fig_dir)[:1] + plot_ratio(sr, fig_dir)[:1]:
    display(Image(filename=str(path)))

# %% [markdown]
# ## 3. Subsets: stable rank vs n, per round

# %%
sub = sr[sr.subject_kind.isin(["subset", "server"])]
agg = sub.groupby(["round", "subject_size"])["value"].mean().unstack()
agg.round(2)

# %% [markdown]
# ## 4. Confidence intervals and verdicts per phase (`hessrank.analysis.inference`)
#
# Effects on the log scale (scale-free; a 5 % difference is 0.049), stated before looking:
# minimum effect **log 1.05**.
# - part 1: per client, log srank_c − log srank_server, averaged over the phase's rounds;
#   the clients are the bootstrap units;
# - part 2: log srank of each subset draw, averaged over the phase's rounds, at the smallest
#   and the largest subset size; the draws are the units (a difference of two arms).
#
# `test_hypotheses`: bootstrap over the units (one replicate here: one run), percentile CI,
# Holm adjustment across all (hypothesis × phase) tests, verdict supported / reversed /
# inconclusive against the minimum effect.

# %%
from hessrank.analysis.inference import (
    client_server_units,
    subset_size_units,
    test_hypotheses,
)

MIN_EFFECT = float(np.log(1.05))
small, large = min(sizes), max(sizes)
units = {
    "client > server": client_server_units(sr, transform="log"),
    f"n={small} > n={large}": subset_size_units(sr, small, large, transform="log"),
}
hypotheses = test_hypotheses(units, min_effect=dict.fromkeys(units, MIN_EFFECT), seed=SEED,
                             transform=dict.fromkeys(units, "log"))
hypotheses[["hypothesis", "phase", "num_rounds", "estimate", "ci_low", "ci_high",
            "p_adjusted", "n_units", "verdict"]].round(4)

# %% [markdown]
# ## 5. Verdict (computed from the table above)

# %%
if SIZE == "smoke":
    print("SMOKE RUN: the verdicts below come from tiny settings and are not results.")
for h in hypotheses.itertuples():
    print(f"(a) {h.hypothesis:>18} | {h.phase:>6} ({h.num_rounds} rounds): log-ratio estimate "
          f"{h.estimate:+.3f}, 95% CI [{h.ci_low:+.3f}, {h.ci_high:+.3f}] over {h.n_units} "
          f"units, Holm-adjusted p {h.p_adjusted:.3g} -> {h.verdict}")
