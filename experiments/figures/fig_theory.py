"""Figure 6: the spiked random-matrix model — Monte Carlo stable rank vs n against the large-p
prediction, for an initial-like spectrum, a trained one, and a trained one with sampling noise
inside the outlier subspace (the only case whose small-n stable rank falls below the large-n
one; see :mod:`hessrank.analysis.theory`)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from experiments.figures.common import CSV_COLUMNS, Context, Made

TRAINED = tuple(float(t) for t in np.linspace(1.0, 0.55, 10))
MODELS: dict[str, dict] = {
    "initial-like (1 outlier, large bulk)": {"theta": (1.0,), "sigma": 4.0, "tau": 0.0},
    "trained (10 outliers, small bulk)": {"theta": TRAINED, "sigma": 0.1, "tau": 0.0},
    "trained + in-subspace noise τ=0.25": {"theta": TRAINED, "sigma": 0.1, "tau": 0.25},
}
"""Name → SpikedModel parameters (dim from the scale); the docstring table of the theory."""


def theory(ctx: Context) -> Made:
    from hessrank.analysis.theory import (
        SpikedModel,
        monte_carlo_stable_rank,
        predict_stable_rank,
    )

    s = ctx.scale
    rows = []
    for i, (name, params) in enumerate(MODELS.items()):
        model = SpikedModel(dim=s.theory_dim, **params)
        parts = []
        for j, n in enumerate(s.theory_ns):  # draws are keyed by (seed, n, draw): per n alike
            ctx.say(f"theory_model: model {i + 1}/{len(MODELS)} ({name}), n = {n} "
                    f"({j + 1}/{len(s.theory_ns)}): {s.theory_draws} dense eigensolves of "
                    f"p = {s.theory_dim}")
            parts.append(monte_carlo_stable_rank(model, [n], draws=s.theory_draws,
                                                 seed=ctx.seed))
        mc = pd.concat(parts, ignore_index=True)
        for n, sub in mc.groupby("n"):
            v = sub["stable_rank"].to_numpy()
            rows.append({"model": name, "n": int(n), "source": "monte carlo",
                         "stable_rank": float(v.mean()),
                         "stderr": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1
                         else float("nan"), "draws": len(v)})
        pred = predict_stable_rank(model, s.theory_ns, seed=ctx.seed)
        for r in pred.itertuples():
            rows.append({"model": name, "n": int(r.n), "source": "prediction",
                         "stable_rank": float(r.stable_rank), "stderr": float("nan"),
                         "draws": 0})
    df = pd.DataFrame(rows, columns=CSV_COLUMNS["theory_model"])

    fig, axes = plt.subplots(1, len(MODELS), figsize=(4 * len(MODELS), 3.6),
                             layout="constrained")
    parts = []
    for i, (ax, name) in enumerate(zip(axes, MODELS)):
        mc = df[(df["model"] == name) & (df["source"] == "monte carlo")]
        pr = df[(df["model"] == name) & (df["source"] == "prediction")]
        ax.plot(pr["n"], pr["stable_rank"], color=f"C{i}", lw=1.5, label="large-p prediction")
        ax.errorbar(mc["n"], mc["stable_rank"], yerr=mc["stderr"].fillna(0), color="k",
                    marker="o", ms=3, ls="none", capsize=2,
                    label=f"Monte Carlo, p = {s.theory_dim} (mean ± stderr)")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("number of samples n")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        rel = np.abs(mc["stable_rank"].to_numpy() / pr["stable_rank"].to_numpy() - 1).max()
        lo, hi = pr.iloc[0], pr.iloc[-1]
        side = "BELOW" if lo["stable_rank"] < hi["stable_rank"] else "above"
        parts.append(f"{name}: predicted srank {lo['stable_rank']:.2f} at n = {lo['n']} vs "
                     f"{hi['stable_rank']:.2f} at n = {hi['n']} (small n {side} large n); "
                     f"max |MC/prediction − 1| = {rel:.3f}")
    axes[0].set_ylabel("stable rank of H_n")
    fig.suptitle("Spiked Wigner model H_n = Σθ uuᵀ + (τ/√n)UGUᵀ + (σ/√n)W: Monte Carlo vs "
                 "BBP prediction", fontsize=9)
    reading = "; ".join(parts) + "."
    configs = {"models": MODELS, "dim": s.theory_dim, "ns": list(s.theory_ns),
               "draws": s.theory_draws}
    return Made(df, fig, configs, reading)
