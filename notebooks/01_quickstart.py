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
# # 01 — Quickstart: spectrum, stable rank and density of a small model, against the dense Hessian
#
# hessrank estimates Hessian quantities matrix-free, from Hessian-vector products:
# the stable rank srank(H) = ‖H‖_F²/‖H‖₂² (Lanczos for ‖H‖₂ and the outliers, a deflated
# Hutchinson estimate for the rest of ‖H‖_F², with a standard error), the top eigenvalues, and
# the spectral density (stochastic Lanczos quadrature). On a model small enough to form the
# Hessian densely, every estimate can be checked against the exact eigenvalues. Here: the
# server loss (all training data) at the last saved round of a run.

# %% tags=["parameters"]
RUN_DIR = None  # a run directory (hessrank train); None: train a small digits MLP here
SIZE = "full"  # "full" or "smoke"
SEED = 0

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

import hessrank as hr
import nbtools

warnings.filterwarnings("ignore", message="IProgress not found")
torch.set_num_threads(1)
nbtools.banner(SIZE, RUN_DIR)
if RUN_DIR is None:
    from hessrank.fl import train

    cfg = nbtools.federation_config("fedavg", SIZE, SEED)
    cfg.update(model_kwargs={"hidden": [16] if SIZE == "full" else [4]}, factorize=[],
               rounds=10 if SIZE == "full" else 2, save_every=10 if SIZE == "full" else 2)
    run = train(cfg, nbtools.work_dir(SIZE, SEED) / "quickstart_mlp", progress=False)
else:
    from hessrank.fl.rundir import RunDir

    run = RunDir(RUN_DIR)
r = run.rounds()[-1]
model, loss_fn = run.load_model(r), run.task()
X = torch.cat([x for x, _ in run.client_data()])
Y = torch.cat([y for _, y in run.client_data()])
op = hr.HessianOperator(model, loss_fn, (X, Y))
p = op.shape[-1]
print(run, "| round", r, "| parameters p =", p, "| samples N =", len(Y))

# %% [markdown]
# ## 1. Matrix-free estimates (40 Hessian-vector products for the stable rank)

# %%
MATVECS = 40 if SIZE == "full" else 16
res = hr.stable_rank(op, num_matvecs=MATVECS, seed=SEED)
dens = hr.spectral_density(op, num_probes=8 if SIZE == "full" else 2,
                           lanczos_steps=40 if SIZE == "full" else 12, seed=SEED)
print(f"stable rank {res.value[0]:.3f} ± {res.stderr[0]:.3f} (stderr), ‖H‖₂ = "
      f"{res.spectral_norm[0]:.4g}, ‖H‖_F² = {res.frobenius_sq[0]:.4g} ± "
      f"{res.frobenius_sq_stderr[0]:.2g}; {res.num_matvecs} matvecs")

# %% [markdown]
# ## 2. The dense Hessian (p × p, only for small models) and the comparison

# %%
DENSE_LIMIT = 3000
if p <= DENSE_LIMIT:
    H = hr.dense_hessian(model, loss_fn, (X, Y)).double()
    lam = torch.linalg.eigvalsh(H).numpy()
    exact = float(np.sum(lam**2) / np.max(np.abs(lam)) ** 2)
    top = lam[np.argsort(-np.abs(lam))[:5]]
    est_top = res.top_eigenvalues[0][:5]
    print(f"exact stable rank {exact:.3f}; estimate {res.value[0]:.3f} ± {res.stderr[0]:.3f} "
          f"(error {res.value[0] - exact:+.3f} = {(res.value[0] - exact) / res.stderr[0]:+.1f} "
          f"stderr)")
    display(pd.DataFrame({"exact": top, "lanczos": est_top[:len(top)]}).round(6))
else:
    lam = None
    print(f"p = {p} > {DENSE_LIMIT}: no dense comparison for this model")

# %%
grid, d = dens.smoothed(num_points=400)
fig, ax = plt.subplots(figsize=(6, 3.2))
if lam is not None:
    ax.hist(lam, bins=80, density=True, alpha=0.4, color="k", label="exact eigenvalues")
ax.plot(grid, d[0], color="C1", label="SLQ density (smoothed)")
ax.set_yscale("log")
ax.set_ylim(bottom=1e-4)
ax.set_xlabel("eigenvalue")
ax.set_ylabel("density")
ax.legend(fontsize=8)
plt.show()

# %%
if SIZE == "smoke":
    print("SMOKE RUN: tiny model and budgets; the numbers above only show that it runs.")
