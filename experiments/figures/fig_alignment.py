"""Figure 3: alignment of rank-r client gradients vs full gradients (± client jackknife)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from experiments.figures.common import (
    CSV_COLUMNS,
    Context,
    Made,
    check_errors,
    digits_config,
    train_run,
)


# ---- figure 3: gradient alignment -----------------------------------------------------------
def alignment(ctx: Context) -> Made:
    from hessrank.analysis.trajectory import analyze

    s = ctx.scale
    run = train_run(ctx, digits_config("fedloru", s, ctx.seed), "digits_fedloru")
    saved = run.rounds()
    rounds = sorted({saved[0], saved[len(saved) // 4], saved[len(saved) // 2], saved[-1]})
    ranks = [*s.alignment_ranks, None]
    ctx.say(f"analyzing {ctx.shown(run.path)}: gradient alignment at rounds {rounds}")
    table = analyze(run.path, rounds=rounds, subjects="clients", quantities=("alignment",),
                    seed=ctx.seed, out=run.path / "analysis_alignment", progress=ctx.progress,
                    alignment_ranks=ranks)
    check_errors(table, "alignment analysis")
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
    configs = {"train": digits_config("fedloru", s, ctx.seed),
               "analyze": {"run": ctx.shown(run.path), "rounds": rounds, "subjects": "clients",
                           "quantities": "alignment",
                           "alignment_ranks": [*s.alignment_ranks, "full"]}}
    return Made(df, fig, configs, reading)


def _paired_alignment(run, rounds: Sequence[int], ranks: Sequence[int]) -> dict:
    """Per (round, layer, rank): the paired difference A_r − A_full of pairwise cosines, its
    jackknife stderr, the fraction of client pairs whose rank-r cosine exceeds their full one,
    and the 10%/90% quantiles of the per-pair difference."""
    from hessrank.analysis.alignment import client_gradients, low_rank, pairwise_cosines
    from hessrank.analysis.inference import offdiag_mean_jackknife

    data, loss_fn = run.client_data(), run.task()
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
                mean, se = offdiag_mean_jackknife(D)
                pairs = D[iu]
                out[(int(r), layer, int(k))] = {
                    "minus_full": mean, "minus_full_stderr": se,
                    "pairs_above_full": float(np.nanmean(pairs > 0)),
                    "minus_full_p10": float(np.nanquantile(pairs, 0.1)),
                    "minus_full_p90": float(np.nanquantile(pairs, 0.9)),
                }  # fmt: skip
    return out

