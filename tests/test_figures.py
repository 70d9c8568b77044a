"""The paper-figure pipeline (experiments/figures): every figure's files from a fast run,
--only, bad names, and the `hessrank figures` wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.figures.make_figures import (
    CSV_COLUMNS,
    FIGURES,
    make_figures,
    parse_only,
)
from experiments.figures.make_figures import (
    main as script_main,
)
from hessrank.cli import main


@pytest.fixture(scope="module")
def fast_figures(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    out = root / "out"
    paths = make_figures(out, fast=True, work=root / "work")
    return out, root / "work", paths


@pytest.mark.slow
def test_fast_run_writes_every_file(fast_figures):
    out, work, paths = fast_figures
    for name in FIGURES:
        for suffix in (".png", ".pdf", ".csv", ".json"):
            path = out / f"{name}{suffix}"
            assert path in paths, path
            assert path.stat().st_size > 0, path
        frame = pd.read_csv(out / f"{name}.csv")
        assert list(frame.columns) == CSV_COLUMNS[name]
        assert len(frame) > 0
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["reading"]
        assert meta["command"].startswith("python experiments/figures/make_figures.py")
        assert "--fast" in meta["command"]
    assert (out / "README.md") in paths
    readme = (out / "README.md").read_text()
    for name in FIGURES:
        assert f"## {name}" in readme
    # checkpoints stay in the work directory, not next to the figures
    assert not list(out.rglob("*.safetensors"))
    assert list(work.rglob("*.safetensors"))


@pytest.mark.slow
def test_only_reuses_runs_and_keeps_readme(fast_figures, tmp_path):
    _, work, _ = fast_figures
    out = tmp_path / "only"
    paths = make_figures(out, fast=True, only="communication,fedlrt_lowrank_lsq", work=work)
    names = {p.stem for p in paths if p.suffix == ".png"}
    assert names == {"communication", "fedlrt_lowrank_lsq"}
    readme = (out / "README.md").read_text()
    assert "## communication" in readme and "## client_vs_server_stable_rank" not in readme
    comm = pd.read_csv(out / "communication.csv")
    assert comm.loc[comm["algo"] == "fedavg", "relative_to_fedavg"].item() == pytest.approx(1.0)


def test_parse_only():
    assert parse_only(None) == list(FIGURES)
    assert parse_only("communication, gradient_alignment") == ["gradient_alignment",
                                                                "communication"]
    with pytest.raises(ValueError, match="unknown figure.*'nope'.*valid names"):
        parse_only("communication,nope")


def test_cli_unknown_figure_exits_2(tmp_path, capsys):
    rc = main(["figures", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
               "--only", "nope", "--fast", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown figure" in err and "client_vs_server_stable_rank" in err
    assert not (tmp_path / "w").exists()  # failed before any training


def test_script_unknown_figure_exits_2(tmp_path, capsys):
    rc = script_main(["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
                      "--only", "theory_model,nope", "--fast", "--quiet"])
    assert rc == 2
    assert "unknown figure" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_theory_figure_fast(tmp_path):
    """The theory figure needs no training: MC and prediction rows for every model and n."""
    paths = make_figures(tmp_path / "o", fast=True, only="theory_model", work=tmp_path / "w")
    frame = pd.read_csv(tmp_path / "o" / "theory_model.csv")
    assert set(frame["source"]) == {"monte carlo", "prediction"}
    assert frame.groupby(["model", "source"]).size().nunique() == 1
    assert (tmp_path / "o" / "theory_model.png") in paths
    assert not list((tmp_path / "w").rglob("*.safetensors"))  # no training


def test_wrapper_without_checkout_says_where_the_pipeline_is(tmp_path, monkeypatch, capsys):
    import hessrank.figures as wrapper

    monkeypatch.setattr(wrapper, "pipeline_root", lambda: tmp_path)
    rc = main(["figures", "--fast", "--only", "communication"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "experiments/figures/" in err and "source checkout" in err


def test_fast_run_never_overwrites_the_committed_figures(tmp_path, monkeypatch, capsys):
    """Issue 19.6: `hessrank figures --fast` wrote its smoke figures into paper_figures/."""
    from experiments.figures.make_figures import _ROOT, default_out

    committed = _ROOT / "paper_figures"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    rc = main(["figures", "--fast", "--only", "theory_model", "--out", str(committed),
               "--work", str(tmp_path / "w"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before
    assert default_out(True) == Path("runs") / "paper_figures_fast"
    monkeypatch.chdir(tmp_path)  # without --out, a fast run goes to the gitignored runs/
    paths = make_figures(fast=True, only="theory_model", work=tmp_path / "w")
    assert all(p.is_relative_to(Path("runs") / "paper_figures_fast") for p in paths)


def test_unchanged_figures_are_not_rewritten_and_paths_are_relative(tmp_path, capsys):
    """Issue 19.6: make figures rewrote tracked files whose content had not changed (timings,
    PDF dates) and its README carried the absolute paths of the machine that made it; it
    was silent for minutes in theory_model."""
    out, work = tmp_path / "o", tmp_path / "w"
    make_figures(out, fast=True, only="theory_model", work=work, progress=True)
    said = capsys.readouterr().err
    assert "theory_model: model 1/3" in said and "n = 25" in said and "done in" in said
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    make_figures(out, fast=True, only="theory_model", work=work)
    again = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert again == stamps  # same bytes, not even touched
    assert (work / "timings.json").is_file()  # the times go to the work directory
    text = (out / "README.md").read_text() + (out / "theory_model.json").read_text()
    assert str(tmp_path) not in text and "took" not in text


def test_committed_readme_carries_no_absolute_paths():
    import re

    from experiments.figures.make_figures import _ROOT

    text = "".join(p.read_text() for p in (_ROOT / "paper_figures").glob("*.[jm][sd]*"))
    assert not re.findall(r"(?<![\w.~])/(?:work|home|tmp|root|Users|mnt)/", text)
