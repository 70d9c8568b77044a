"""Figures from a synthetic tidy table and stored SLQ tridiagonals: files exist, errors help."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hessrank.analysis.plotting import (
    KIND_COLORS,
    consistent,
    eigenvalue_figure,
    load_table,
    plot_all,
    plot_ratio,
    plot_stable_rank,
    stable_rank_figure,
)
from hessrank.analysis.store import COLUMNS, Store
from hessrank.linalg import spectral_density


def _row(r, subject, kind, q, value, k=0, layer="", size=10, unit="u", settings="s"):
    return {"round": r, "subject": subject, "subject_kind": kind, "subject_size": size,
            "quantity": q, "k": k, "layer": layer, "value": value, "stderr": 0.1 * value,
            "matvecs": 8, "seconds": 0.1, "seed": 0, "data_seed": -1, "curvature": "hessian",
            "rtol": float("nan"), "checkpoint": "c", "data": "d", "settings": settings,
            "unit": unit, "route": "{}"}


@pytest.fixture
def analysis_dir(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for r in (0, 5, 10):
        rows.append(_row(r, "server", "server", "stable-rank", 10.0 + r, size=30))
        for c in range(3):
            rows.append(_row(r, f"client{c}", "client", "stable-rank", 20 + r + c))
            rows.append(_row(r, f"client{c}", "client", "top-eig", 5.0, k=1))
        for d in range(2):
            rows.append(_row(r, f"subset5_{d}", "subset", "stable-rank", 25 + d, size=5))
        rows.append(_row(r, "test", "test", "stable-rank", 12.0))
        for k in range(1, 4):
            rows.append(_row(r, "server", "server", "top-eig", 4.0 / k, k=k, size=30))
        for layer in ("fc1.weight", "out.weight"):
            for rank, v in ((1, 0.9), (2, 0.7), (0, 0.4)):
                rows.append(_row(r, "clients", "client", "alignment", v, k=rank, layer=layer))
    store = Store(tmp_path)
    store.merge([pd.DataFrame(rows, columns=COLUMNS)])
    A = torch.diag(torch.as_tensor(rng.normal(size=40)))
    dens = spectral_density(A, num_probes=3, lanczos_steps=10, seed=0)
    for r in (0, 5, 10):
        names = {"server": "server", "client0": "client", "subset5_0": "subset"}
        frame = pd.DataFrame([_row(r, n, kind, "effective-rank", 3.0, unit=f"d{r}",
                                   settings="sd") for n, kind in names.items()],
                             columns=COLUMNS)
        store.commit(f"d{r}", frame, frame,
                     {n: (dens.alpha[0], dens.beta[0], dens.dim, dens.num_matvecs, 0)
                      for n in names})
    store.export()
    return tmp_path


@pytest.mark.slow
def test_plot_all_writes_png_and_pdf(analysis_dir, tmp_path):
    paths = plot_all(analysis_dir, out=tmp_path / "figs", rounds="0:10:10")
    names = {p.name for p in paths}
    for stem in ("stable_rank_vs_round", "stable_rank_ratio", "densities", "top_eigenvalues",
                 "alignment_vs_rank"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


def test_csv_fallback_and_missing_table(analysis_dir, tmp_path):
    t = load_table(analysis_dir)
    only_csv = tmp_path / "csv"
    only_csv.mkdir()
    t.to_csv(only_csv / "results.csv", index=False)
    assert len(load_table(only_csv)) == len(t)
    with pytest.raises(FileNotFoundError, match="hessrank analyze"):
        load_table(tmp_path / "nowhere")


def test_truncated_or_all_nan_tables_are_refused_in_one_line(analysis_dir, tmp_path, capsys):
    """Issue 19.6: plots were drawn from truncated or all-NaN tables with exit 0."""
    from hessrank.cli import main

    copy = tmp_path / "copy"
    copy.mkdir()
    blob = (analysis_dir / "results.parquet").read_bytes()
    (copy / "results.parquet").write_bytes(blob[: len(blob) // 2])  # a torn copy
    assert main(["plot", str(copy), "--out", str(tmp_path / "f1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err, err
    assert not (tmp_path / "f1").exists()
    nan = load_table(analysis_dir).assign(value=float("nan"))
    (copy / "results.parquet").unlink()
    nan.to_parquet(copy / "results.parquet")
    assert main(["plot", str(copy), "--out", str(tmp_path / "f2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN" in err, err
    assert not list((tmp_path / "f2").glob("*.png"))
    short = load_table(analysis_dir).drop(columns=["value", "stderr"])
    short.to_parquet(copy / "results.parquet")
    assert main(["plot", str(copy), "--out", str(tmp_path / "f3")]) == 2
    assert "lacks columns ['value', 'stderr']" in capsys.readouterr().err


def test_plots_say_what_is_missing(analysis_dir, tmp_path):
    t = load_table(analysis_dir)
    with pytest.raises(ValueError, match="--quantities trace"):
        plot_stable_rank(t, tmp_path, quantity="trace")
    with pytest.raises(ValueError, match="--subjects server,clients"):
        plot_ratio(t[t["subject_kind"] != "server"], tmp_path)


def test_wide_stable_ranks_get_a_log_axis_and_kinds_their_own_colours(analysis_dir):
    from matplotlib.colors import to_hex

    t = load_table(analysis_dir)
    fig = stable_rank_figure(t)
    assert fig.axes[0].get_yscale() == "linear"  # 10 .. 27: within 10x
    wide = t.copy()
    wide.loc[(wide["subject"] == "server") & (wide["quantity"] == "stable-rank"), "value"] = 1.5
    wide.loc[wide["subject_kind"] == "client", "value"] *= 10
    fig = stable_rank_figure(wide)
    assert fig.axes[0].get_yscale() == "log"
    colours = {}
    for handle, label in zip(*fig.axes[0].get_legend_handles_labels()):
        line = handle.lines[0] if hasattr(handle, "lines") else handle  # errorbar containers
        colours[label.split()[0]] = to_hex(line.get_color())
    assert len(set(colours.values())) == len(colours) >= 4  # server, clients, subsets, test
    assert colours["test"] == to_hex(KIND_COLORS["test"]) != colours["server"]


def test_eigenvalue_lines_do_not_jump_sign(analysis_dir):
    t = load_table(analysis_dir)
    flip = (t["quantity"] == "top-eig") & (t["subject"] == "server") & (t["k"] == 1) & (
        t["round"] == 5)
    t.loc[flip, "value"] = -4.0  # λ1 by magnitude turned negative at round 5
    fig = eigenvalue_figure(t)
    ax = fig.axes[0]
    assert "|λ" in ax.get_ylabel()
    lam1 = next(ln for ln in ax.get_lines() if ln.get_label() == "|λ1|")
    assert (lam1.get_ydata() > 0).all()


def test_plot_uses_one_settings_per_quantity(analysis_dir, tmp_path):
    t = load_table(analysis_dir)
    other = t[t["quantity"] == "stable-rank"].assign(settings="s2", value=1000.0)
    Store(analysis_dir).merge([other])
    Store(analysis_dir).export()
    table, notes = consistent(load_table(analysis_dir))
    sr = table[table["quantity"] == "stable-rank"]
    assert sr["settings"].nunique() == 1 and len(notes) == 1
    assert not sr.duplicated(["round", "subject"]).any()
