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
# # 04 — Algorithms: FedAvg, FedLoRA, FedLoRU, FeDLRT
#
# The same federation trained by the four algorithms of the built-in trainer: test accuracy,
# floats communicated (up + down, every message counted), and the curvature each leaves
# behind — the stable rank and top eigenvalue of the server Hessian at the last saved round.
# With `RUN_DIR` set, the other three algorithms are trained on that run's configuration next
# to it (`<run>_<algo>`).

# %% tags=["parameters"]
RUN_DIR = None  # a run directory (hessrank train); None: the figures' digits federation
SIZE = "full"  # "full" or "smoke"
SEED = 0

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import hessrank as hr
import nbtools

warnings.filterwarnings("ignore", message="IProgress not found")
torch.set_num_threads(1)
nbtools.banner(SIZE, RUN_DIR)
ALGOS = ("fedavg", "fedlora", "fedloru", "fedlrt")
base = nbtools.open_run(RUN_DIR, SIZE, SEED)
runs = {a: (nbtools.sibling_run(base, a, SIZE, SEED) if RUN_DIR is not None
            else nbtools.open_run(None, SIZE, SEED, algo=a)) for a in ALGOS}
for a, run in runs.items():
    print(f"{a:>8}: {run}")

# %% [markdown]
# ## Accuracy and communication

# %%
rows, curves = [], {}
for a, run in runs.items():
    m = run.metrics()
    m = m[m["round"] > 0]
    acc = m["test_accuracy"].astype(float).dropna()
    curves[a] = m
    rows.append({"algo": a, "floats_per_round": float((m["floats_up_total"]
                                                       + m["floats_down_total"]).mean()),
                 "final_accuracy": float(acc.iloc[-1]),
                 "last5_accuracy": float(acc.iloc[-5:].mean()),
                 "cum_floats": float(m["cum_floats"].iloc[-1])})
summary = pd.DataFrame(rows).set_index("algo")
summary["relative_to_fedavg"] = summary["floats_per_round"] / summary.loc["fedavg",
                                                                          "floats_per_round"]

fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.4))
for i, (a, m) in enumerate(curves.items()):
    ax.plot(m["round"], m["test_accuracy"], marker="o", ms=2, color=f"C{i}", label=a)
    bx.plot(m["cum_floats"], m["test_accuracy"], marker="o", ms=2, color=f"C{i}", label=a)
ax.set_xlabel("round")
ax.set_ylabel("test accuracy")
bx.set_xscale("log")
bx.set_xlabel("cumulative floats communicated")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## The curvature each algorithm leaves behind
#
# Server Hessian (all training data) at the last saved round: stable rank (± estimator
# stderr), ‖H‖₂ and the number of eigenvalues above 10 % of it among the top ones.

# %%
MATVECS = nbtools.ANALYSIS[SIZE]["matvecs"]
curv = []
for a, run in runs.items():
    r = run.rounds()[-1]
    X = torch.cat([x for x, _ in run.client_data()])
    Y = torch.cat([y for _, y in run.client_data()])
    res = hr.stable_rank(hr.HessianOperator(run.load_model(r), run.task(), (X, Y)),
                         num_matvecs=MATVECS, seed=SEED)
    top = np.abs(res.top_eigenvalues[0])
    curv.append({"algo": a, "round": r, "stable_rank": res.value[0],
                 "stable_rank_stderr": res.stderr[0], "spectral_norm": res.spectral_norm[0],
                 "outliers_over_10pct": int(np.sum(top > 0.1 * top.max()))})
summary = summary.join(pd.DataFrame(curv).set_index("algo"))
summary.round(4)

# %%
if SIZE == "smoke":
    print("SMOKE RUN: tiny federation; the comparison below is not a result.")
for a, row in summary.iterrows():
    print(f"{a:>8}: accuracy {row.last5_accuracy:.3f} (mean of the last 5 rounds), "
          f"{row.relative_to_fedavg:.2f}x FedAvg's floats per round, server-Hessian stable rank "
          f"{row.stable_rank:.2f} ± {row.stable_rank_stderr:.2f}, ‖H‖₂ {row.spectral_norm:.3g}")
