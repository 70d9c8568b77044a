"""Figures from an analysis directory (the table of :mod:`hessrank.analysis.store`).

- stable rank vs round: the server as a line with ±stderr bars, the clients as their mean with
  a min–max band (the spread across clients, not an error bar), each subset size as the mean
  over its draws with ±1 standard deviation across draws, the test set as a dashed line; one
  colour per subject kind (:data:`KIND_COLORS`, subset sizes in shades of orange); log-scale y
  when the values span more than 10×;
- the ratio (mean client stable rank) / (server stable rank) vs round, band min/server–max/server;
- SLQ spectral densities at chosen rounds (log-scale y), from the raw tridiagonals stored with
  the table rows' units (never from other settings than the rows');
- magnitudes |λk| of the top eigenvalues vs round (server, and the client mean of |λ₁|);
- gradient alignment vs truncation rank per weight matrix (last round), ± jackknife stderr.

Where the table holds a quantity under several settings, the latest call's are drawn
(:func:`consistent`). Every figure is saved as PNG and PDF; functions return the paths.
Matplotlib runs headless (Agg backend). A table that cannot be read (a truncated file), lacks
columns, or whose drawn values are all NaN is refused with one line, never drawn.

Part of the analysis layer: it reads the store and the table (:mod:`hessrank.analysis.store`)
and imports nothing above it.

Example:
    >>> paths = plot_all("runs/x/analysis")       # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hessrank.analysis.sources import select_rounds  # noqa: E402
from hessrank.analysis.store import COLUMNS, Store  # noqa: E402

__all__ = [
    "KIND_COLORS",
    "consistent",
    "eigenvalue_figure",
    "load_table",
    "plot_alignment",
    "plot_all",
    "plot_densities",
    "plot_eigenvalues",
    "plot_ratio",
    "plot_stable_rank",
    "stable_rank_figure",
]


def load_table(analysis_dir: str | Path) -> pd.DataFrame:
    """The table of an analysis directory: from its store (``store.sqlite``, always current),
    else ``results.parquet``, else ``results.csv``. ValueError in one line for a table that
    cannot be read (a truncated file) or lacks columns; FileNotFoundError when there is none."""
    d = Path(analysis_dir)
    if (d / "store.sqlite").is_file():
        table = Store(d).table()
        if len(table):
            return table
    if (d / "results.parquet").is_file():
        path = d / "results.parquet"
        try:
            table = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path} cannot be read ({first}): it is truncated or damaged; "
                             f"rerun `hessrank analyze RUN_DIR --out {d}` to rewrite it") from None
    elif (d / "results.csv").is_file():
        path = d / "results.csv"
        try:
            table = pd.read_csv(path, keep_default_na=True).fillna({"layer": ""})
        except Exception as err:  # pandas' parser errors
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path} cannot be read ({first}); rerun `hessrank analyze "
                             f"RUN_DIR --out {d}` to rewrite it") from None
    else:
        raise FileNotFoundError(
            f"{d} has no results.parquet or results.csv; run `hessrank analyze RUN_DIR --out {d}`"
        )
    missing = [c for c in ("round", "subject", "subject_kind", "subject_size", "quantity", "k",
                           "layer", "value", "stderr") if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing} (a table has {', '.join(COLUMNS)}): "
                         f"it is truncated or not an analysis table; rerun `hessrank analyze "
                         f"RUN_DIR --out {d}`")
    return table


def _values(t: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """Rows of ``quantity``; ValueError when there are none or their values are all NaN."""
    rows = t[t["quantity"] == quantity]
    if rows.empty:
        raise ValueError(f"the table has no {quantity!r} rows; analyze with --quantities "
                         f"{_flag(quantity)}")
    if not np.isfinite(rows["value"].to_numpy(dtype=float)).any():
        raise ValueError(f"every {quantity!r} value in the table is NaN or infinite "
                         f"({len(rows)} rows): nothing to draw; check the analysis "
                         "(errors.csv) and rerun it")
    return rows


def _flag(quantity: str) -> str:
    return {"effective-rank": "density", "top-k-stable-rank": "stable-rank",
            "intrinsic-dimension": "stable-rank"}.get(quantity, quantity)


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _client_stats(sub: pd.DataFrame) -> pd.DataFrame:
    return sub.groupby("round")["value"].agg(["mean", "min", "max", "std"]).reset_index()


KIND_COLORS = {"server": "black", "client": "tab:blue", "test": "tab:red"}
"""Colour of each subject kind; subset sizes get shades of a sequential map (oranges) that
none of these share."""


def _subset_colors(sizes: Sequence[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("Oranges")
    n = len(sizes)
    return {s: cmap(0.45 + 0.5 * i / max(n - 1, 1)) for i, s in enumerate(sorted(sizes))}


def _log_if_wide(ax, values) -> None:
    """Log-scale y when the positive values span more than a factor 10."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() > 10 * v.min():
        ax.set_yscale("log")


def stable_rank_figure(table: pd.DataFrame, quantity: str = "stable-rank"):
    """The figure of :func:`plot_stable_rank` (returned, not saved)."""
    t = _values(table, quantity)
    fig, ax = plt.subplots(figsize=(6, 4))
    server = t[t["subject_kind"] == "server"].sort_values("round")
    if not server.empty:
        ax.errorbar(server["round"], server["value"], yerr=server["stderr"],
                    color=KIND_COLORS["server"], marker="o", ms=3, capsize=2,
                    label="server (± stderr)")
    clients = t[t["subject_kind"] == "client"]
    if not clients.empty:
        cs = _client_stats(clients)
        c = KIND_COLORS["client"]
        ax.plot(cs["round"], cs["mean"], color=c, marker="s", ms=3,
                label=f"clients mean (band: min–max of {clients['subject'].nunique()})")
        ax.fill_between(cs["round"], cs["min"], cs["max"], color=c, alpha=0.2)
    subsets = t[t["subject_kind"] == "subset"]
    colors = _subset_colors(list(subsets["subject_size"].unique()))
    for n, sub in sorted(subsets.groupby("subject_size"), key=lambda x: x[0]):
        st = _client_stats(sub)
        ax.errorbar(st["round"], st["mean"], yerr=st["std"].fillna(0), color=colors[n],
                    marker="^", ms=3, capsize=2,
                    label=f"subsets n={n} (mean ± sd of {sub['subject'].nunique()} draws)")
    test = t[t["subject_kind"] == "test"].sort_values("round")
    if not test.empty:
        ax.plot(test["round"], test["value"], ls="--", color=KIND_COLORS["test"],
                label="test set")
    _log_if_wide(ax, t["value"])
    ax.set_xlabel("round")
    ax.set_ylabel(quantity + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_stable_rank(table: pd.DataFrame, out: str | Path,
                     quantity: str = "stable-rank") -> list[Path]:
    """``quantity`` vs round: server line, client mean with min–max band, subsets by size, the
    test set; log-scale y when the values span more than 10×."""
    fig = stable_rank_figure(table, quantity)
    return _save(fig, Path(out), quantity.replace("-", "_") + "_vs_round")


def plot_ratio(table: pd.DataFrame, out: str | Path, quantity: str = "stable-rank") -> list[Path]:
    """(mean client ``quantity``) / (server ``quantity``) vs round, band min/server–max/server."""
    t = _values(table, quantity)
    server = t[t["subject_kind"] == "server"].set_index("round")["value"]
    clients = t[t["subject_kind"] == "client"]
    if server.empty or clients.empty:
        raise ValueError(f"the ratio needs {quantity!r} rows of the server and the clients; "
                         "analyze with --subjects server,clients")
    cs = _client_stats(clients).set_index("round").join(server.rename("server"), how="inner")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cs.index, cs["mean"] / cs["server"], color="C0", marker="o", ms=3,
            label="mean client / server")
    ax.fill_between(cs.index, cs["min"] / cs["server"], cs["max"] / cs["server"], color="C0",
                    alpha=0.2, label="min–max client / server")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{quantity} ratio client / server")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, Path(out), quantity.replace("-", "_") + "_ratio")


def _density_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["quantity"] == "effective-rank"]


def _pick_rounds(available: Sequence[int], rounds) -> list[int]:
    if rounds is not None:
        return select_rounds(rounds, available)
    a = sorted(available)
    return sorted({a[0], a[len(a) // 2], a[-1]})


def plot_densities(analysis_dir: str | Path, out: str | Path,
                   rounds: str | Sequence[int] | None = None,
                   num_points: int = 400, table: pd.DataFrame | None = None) -> list[Path]:
    """Smoothed SLQ densities (server, clients, subsets, test) at chosen rounds, log-scale y.

    The densities are those of the table's ``effective-rank`` rows (each row names its unit
    in the store), so they always match the table's settings.
    """
    analysis_dir = Path(analysis_dir)
    table = consistent(load_table(analysis_dir), analysis_dir)[0] if table is None else table
    if _density_rows(table).empty:
        raise ValueError(f"{analysis_dir} has no densities; analyze with --quantities density")
    rows = _values(table, "effective-rank")
    store = Store(analysis_dir)
    chosen = _pick_rounds(sorted(set(int(r) for r in rows["round"])), rounds)
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.5), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        at = rows[rows["round"] == r]
        res = {row.subject: (row.subject_kind, store.density(row.unit, row.subject))
               for row in at.itertuples()}
        lo = min(float(d.nodes.min()) for _, d in res.values())
        hi = max(float(d.nodes.max()) for _, d in res.values())
        sigma = 0.01 * max(hi - lo, 1e-12)
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
        first_client, peak = True, 0.0
        sizes = sorted({int(x) for x in at.loc[at["subject_kind"] == "subset", "subject_size"]})
        subset_colors = _subset_colors(sizes)
        for name, (kind, d) in sorted(res.items()):
            _, dens = d.smoothed(grid, sigma=sigma)
            y = np.maximum(dens[0], 1e-300)
            peak = max(peak, float(y.max()))
            if kind == "client":
                ax.plot(grid, y, color=KIND_COLORS["client"], lw=0.7, alpha=0.6,
                        label="clients" if first_client else None)
                first_client = False
            elif kind == "subset":
                size = int(at.loc[at["subject"] == name, "subject_size"].iloc[0])
                ax.plot(grid, y, lw=0.9, color=subset_colors[size], label=name)
            else:
                ax.plot(grid, y, color=KIND_COLORS.get(kind, "gray"),
                        lw=1.5 if kind == "server" else 0.9, label=name)
        ax.set_yscale("log")
        ax.set_ylim(peak * 1e-7, peak * 3)  # tails below 1e-7 of the peak: smoothing artefacts
        ax.set_title(f"round {r}")
        ax.set_xlabel("eigenvalue")
    axes[0][0].set_ylabel("density (σ = 1% of range)")
    axes[0][-1].legend(fontsize=6)
    return _save(fig, Path(out), "densities")


def eigenvalue_figure(table: pd.DataFrame):
    """The figure of :func:`plot_eigenvalues` (returned, not saved)."""
    t = _values(table, "top-eig")
    fig, ax = plt.subplots(figsize=(6, 4))
    server = t[t["subject_kind"] == "server"]
    base = server if not server.empty else t[t["subject_kind"] == t["subject_kind"].iloc[0]]
    base = base[base["subject"] == base["subject"].iloc[0]]
    kmax = int(base["k"].max())
    for k, sub in base.groupby("k"):
        sub = sub.sort_values("round")
        ax.plot(sub["round"], sub["value"].abs(), color=plt.cm.viridis(k / (kmax + 1)),
                lw=1.2 if k == 1 else 0.7, label=f"|λ{k}|" if k <= 3 else None)
    clients = t[(t["subject_kind"] == "client") & (t["k"] == 1)]
    if not clients.empty:
        cs = _client_stats(clients.assign(value=clients["value"].abs()))
        ax.plot(cs["round"], cs["mean"], ls="--", color=KIND_COLORS["client"],
                label="clients mean |λ1|")
    _log_if_wide(ax, base["value"].abs())
    ax.set_xlabel("round")
    ax.set_ylabel(f"|λk|, top eigenvalues by magnitude ({base['subject'].iloc[0]})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_eigenvalues(table: pd.DataFrame, out: str | Path) -> list[Path]:
    """Magnitudes |λk| of the top Ritz values (by magnitude) of the server vs round, so a line
    never jumps between signs; client mean of |λ1| dashed."""
    return _save(eigenvalue_figure(table), Path(out), "top_eigenvalues")


def plot_alignment(table: pd.DataFrame, out: str | Path, round: int | None = None) -> list[Path]:
    """Mean pairwise client-gradient cosine vs truncation rank, one line per weight matrix."""
    t = _values(table, "alignment")
    r = int(t["round"].max()) if round is None else int(round)
    t = t[t["round"] == r]
    ranks = sorted(k for k in t["k"].unique() if k > 0)
    pos = {k: i for i, k in enumerate(ranks)}
    pos[0] = len(ranks)  # the full gradient sits at the right
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, sub in t.groupby("layer"):
        sub = sub.assign(x=sub["k"].map(pos)).sort_values("x")
        ax.errorbar(sub["x"], sub["value"], yerr=sub["stderr"].fillna(0), marker="o", ms=3,
                    capsize=2, label=layer)
    ax.set_xticks(range(len(ranks) + 1), [str(k) for k in ranks] + ["full"])
    ax.set_xlabel("truncation rank r")
    ax.set_ylabel("mean pairwise cosine of client gradients")
    ax.set_title(f"round {r} (± jackknife stderr over clients)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, Path(out), "alignment_vs_rank")


def consistent(table: pd.DataFrame, analysis_dir: str | Path | None = None
               ) -> tuple[pd.DataFrame, list[str]]:
    """One settings per quantity: where the table holds a quantity under several settings
    (``settings`` column), keep those of the latest analysis call that computed it, else the
    most common; returns the rows and a note per quantity that had others."""
    if "settings" not in table.columns or table.empty:
        return table, []
    preferred: list[str] = []
    meta = Path(analysis_dir) / "analysis.json" if analysis_dir is not None else None
    if meta is not None and meta.is_file():
        try:
            calls = json.loads(meta.read_text()).get("calls", [])
        except (json.JSONDecodeError, UnicodeDecodeError):
            calls = []  # a damaged record: fall back to the most common settings
        for call in reversed(calls):
            preferred.extend(call.get("settings_hashes", {}).values())
    keep, notes = [], []
    for q, sub in table.groupby("quantity", sort=False):
        hashes = list(sub["settings"].unique())
        if len(hashes) > 1:
            pick = next((h for h in preferred if h in hashes),
                        sub["settings"].value_counts().index[0])
            notes.append(f"{q}: plotting settings {pick} of {len(hashes)} in the table")
            sub = sub[sub["settings"] == pick]
        keep.append(sub)
    return pd.concat(keep).sort_index(), notes


def plot_all(analysis_dir: str | Path, out: str | Path | None = None,
             rounds: str | Sequence[int] | None = None) -> list[Path]:
    """Every figure the analysis directory has data for; returns the saved paths."""
    analysis_dir = Path(analysis_dir)
    table, notes = consistent(load_table(analysis_dir), analysis_dir)
    for note in notes:
        print(f"hessrank plot: {note}", file=sys.stderr)
    out = Path(out) if out is not None else analysis_dir / "figures"
    qs = set(table["quantity"])
    kinds = set(table["subject_kind"])
    paths: list[Path] = []
    if "stable-rank" in qs:
        paths += plot_stable_rank(table, out)
        if {"server", "client"} <= kinds:
            paths += plot_ratio(table, out)
    if "effective-rank" in qs:
        paths += plot_densities(analysis_dir, out, rounds, table=table)
    if "top-eig" in qs:
        paths += plot_eigenvalues(table, out)
    if "alignment" in qs:
        paths += plot_alignment(table, out)
    if not paths:
        raise ValueError(f"nothing to plot in {analysis_dir}: the table has quantities "
                         f"{sorted(qs)}")
    return paths
