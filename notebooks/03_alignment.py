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
# # 03 — Alignment: rank-r vs full client gradients (and updates, when recorded)
#
# **Hypothesis (b)** (FedLoRU): the best rank-r approximations [G_c]_r of the client gradients
# G_c = ∇_W L_c (per weight matrix) are *more similar across clients* than the full
# gradients: A_r > A_full, with A the mean pairwise cosine over client pairs.
#
# At every saved round, each client's full-batch gradient of each weight matrix at the global
# weights; D = C_r − C_full, the per-pair change of cosines. Clients are the independent
# units, not pairs: each client's value is the mean of D over its pairs, averaged over the
# rounds of a phase and over layers; the bootstrap resamples clients.

# %% tags=["parameters"]
RUN_DIR = None  # a run directory (hessrank train); None: train the figures' FedLoRU federation
SIZE = "full"  # "full" or "smoke"
SEED = 0

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

import nbtools
from hessrank.analysis.alignment import client_gradients, low_rank, pairwise_cosines

warnings.filterwarnings("ignore", message="IProgress not found")
torch.set_num_threads(1)
nbtools.banner(SIZE, RUN_DIR)
run = nbtools.open_run(RUN_DIR, SIZE, SEED)
ranks = nbtools.ANALYSIS[SIZE]["alignment_ranks"]
rounds = run.rounds()
phase_of = nbtools.phase(rounds)
print(run)

# %%
rows, per_client = [], []
data, loss_fn = run.client_data(), run.task()
for r in rounds:
    grads = client_gradients(run.load_model(r), loss_fn, data)
    for layer, gs in grads.items():
        mats = [g.reshape(g.shape[0], -1) for g in gs]
        K = len(mats)
        full = pairwise_cosines(mats)
        off = ~np.eye(K, dtype=bool)
        for k in ranks:
            if k >= min(mats[0].shape):  # the truncation is the identity
                continue
            D = pairwise_cosines([low_rank(G, k) for G in mats]) - full
            rows.append({"round": r, "phase": phase_of[r], "layer": layer, "rank": k,
                         "A_full": full[off].mean(), "A_r": full[off].mean() + D[off].mean(),
                         "diff": D[off].mean(), "pairs_above": float(np.mean(D[off] > 0))})
            for c in range(K):
                per_client.append({"round": r, "phase": phase_of[r], "layer": layer,
                                   "rank": k, "client": c,
                                   "diff": float(np.mean(np.delete(D[c], c)))})
align, per_client = pd.DataFrame(rows), pd.DataFrame(per_client)
align.groupby(["phase", "rank"])[["A_full", "A_r", "diff", "pairs_above"]].mean().round(3)

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for i, (layer, g) in enumerate(align[align["rank"] == min(ranks)].groupby("layer")):
    ax.plot(g["round"], g["diff"], marker="o", ms=3, color=f"C{i}", label=layer)
ax.axhline(0, color="k", lw=0.8, ls=":")
ax.set_xlabel("round")
ax.set_ylabel(f"A_{min(ranks)} − A_full")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Confidence intervals and verdict per phase (`hessrank.analysis.inference`)
#
# Minimum effect stated up front: **0.01** in mean cosine. Units frame: per (round, client)
# the client's mean change of cosine over its pairs, averaged over layers; `test_hypotheses`
# averages each client over the rounds of a phase, bootstraps over clients, adjusts the
# p-values (Holm) across all (rank × phase) tests and decides.

# %%
from hessrank.analysis.inference import test_hypotheses

MIN_EFFECT = 0.01
units = {}
for k, g in per_client.groupby("rank"):
    u = g.groupby(["round", "client"], as_index=False)["diff"].mean()
    units[f"A_{k} > A_full"] = pd.DataFrame({"replicate": 0, "round": u["round"], "arm": "a",
                                            "unit": u["client"], "value": u["diff"]})
hypotheses = test_hypotheses(units, min_effect=dict.fromkeys(units, MIN_EFFECT), seed=SEED)
if SIZE == "smoke":
    print("SMOKE RUN: the verdicts below come from tiny settings and are not results.")
for h in hypotheses.itertuples():
    print(f"(b) {h.hypothesis:>14} | {h.phase:>6}: estimate {h.estimate:+.4f}, 95% CI "
          f"[{h.ci_low:+.4f}, {h.ci_high:+.4f}] over {h.n_units} clients, Holm-adjusted p "
          f"{h.p_adjusted:.3g} -> {h.verdict}")

# %% [markdown]
# ## Client updates
#
# FedLoRU's claim concerns client *updates* after local training (full update vs B·A). When
# the run recorded them (`updates/round_RRRR.safetensors`, read by
# `hessrank.analysis.update_alignment`), the rank-r alignment of the updates and the overlap
# of clients' top-r singular subspaces are computed per recorded round, each against its
# null baseline (rotated updates; random subspaces).

# %%
updates = run.path / "updates"
recorded = sorted(int(f.stem.split("_")[-1]) for f in updates.glob("round_*.safetensors"))
if recorded:
    from hessrank.analysis.update_alignment import (
        load_client_updates,
        rank_alignment,
        subspace_overlap,
    )

    frames = []
    for r in recorded:
        ups = load_client_updates(run.path, r)
        for metric in (rank_alignment, subspace_overlap):
            frames.append(metric(ups, ranks=ranks, null_draws=5 if SIZE == "smoke" else 20,
                                 seed=SEED).assign(round=r))
    upd = pd.concat(frames, ignore_index=True)
    display(upd.groupby(["metric", "rank"])[["value", "null_mean", "z"]].mean().round(4))
    print(f"client updates of {len(recorded)} recorded rounds analyzed")
else:
    print("this run has no recorded client updates: update alignment not computed")
