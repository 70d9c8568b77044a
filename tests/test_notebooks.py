"""The research notebooks run end to end in fast mode (HESSRANK_FAST=1)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_rank_discrepancy.ipynb", "02_gradient_alignment.ipynb"]


def _kernel_or_skip():
    try:
        import nbformat  # noqa: F401
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
        from nbclient import NotebookClient  # noqa: F401
    except ImportError as err:
        pytest.skip(f"nbclient/nbformat not installed ({err.name}); pip install -e '.[dev]'")
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel; pip install ipykernel")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_fast(name, tmp_path, monkeypatch):
    _kernel_or_skip()
    import nbformat
    from nbclient import NotebookClient

    path = tmp_path / name
    shutil.copy(NOTEBOOKS / name, path)
    monkeypatch.setenv("HESSRANK_FAST", "1")
    monkeypatch.setenv("HESSRANK_WORK", str(tmp_path / "work"))
    # the kernel must import this interpreter's hessrank
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []))
    assert "on this federation:" in text
    assert any(v in text for v in ("CONFIRMED", "REFUTED", "INCONCLUSIVE"))


def test_generator_matches_committed_notebooks(tmp_path):
    """The .ipynb sources are what make_notebooks.py generates (outputs may differ)."""
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(NOTEBOOKS))
    for name, build in make_notebooks.NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        fresh = build()
        assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], name
