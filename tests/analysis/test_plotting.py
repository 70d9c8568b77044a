"""Figures from a synthetic tidy table and stored SLQ tridiagonals: files exist, errors help."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from hessrank.analysis.trajectory import COLUMNS
from hessrank.linalg import spectral_density
from hessrank.plotting import load_table, plot_all, plot_ratio, plot_stable_rank


def _row(r, subject, kind, q, value, k=0, layer="", size=10):
    return {"round": r, "subject": subject, "subject_kind": kind, "subject_size": size,
            "quantity": q, "k": k, "layer": layer, "value": value, "stderr": 0.1 * value,
            "matvecs": 8, "seconds": 0.1, "seed": 0, "data_seed": -1}


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
        rows.append(_row(r, "server", "server", "effective-rank", 3.0))
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.to_parquet(tmp_path / "results.parquet", index=False)
    A = torch.diag(torch.as_tensor(rng.normal(size=40)))
    dens = spectral_density(A, num_probes=3, lanczos_steps=10, seed=0)
    (tmp_path / "densities").mkdir()
    for r in (0, 5, 10):
        for name in ("server", "client0", "subset5_0"):
            buf = io.BytesIO()
            np.savez(buf, alpha=dens.alpha[0], beta=dens.beta[0], dim=dens.dim,
                     num_matvecs=dens.num_matvecs, seed=0)
            (tmp_path / "densities" / f"round_{r:05d}_{name}.npz").write_bytes(buf.getvalue())
    return tmp_path


def test_plot_all_writes_png_and_pdf(analysis_dir, tmp_path):
    paths = plot_all(analysis_dir, out=tmp_path / "figs", rounds="0:10:10")
    names = {p.name for p in paths}
    for stem in ("stable_rank_vs_round", "stable_rank_ratio", "densities", "top_eigenvalues",
                 "alignment_vs_rank"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


def test_csv_fallback_and_missing_table(analysis_dir, tmp_path):
    t = load_table(analysis_dir)
    (analysis_dir / "results.parquet").unlink()
    t.to_csv(analysis_dir / "results.csv", index=False)
    assert len(load_table(analysis_dir)) == len(t)
    with pytest.raises(FileNotFoundError, match="hessrank analyze"):
        load_table(tmp_path / "nowhere")


def test_plots_say_what_is_missing(analysis_dir, tmp_path):
    t = load_table(analysis_dir)
    with pytest.raises(ValueError, match="--quantities trace"):
        plot_stable_rank(t, tmp_path, quantity="trace")
    with pytest.raises(ValueError, match="--subjects server,clients"):
        plot_ratio(t[t["subject_kind"] != "server"], tmp_path)
