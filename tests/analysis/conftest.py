"""A tiny real training run (FedAvg, digits, small MLP, 3 clients, rounds 0..2) shared by the
analysis tests; written by ``hessrank.fl.train`` so the run directory is the real format."""

from __future__ import annotations

import shutil

import pytest

import hessrank.fl as fl

RUN_CONFIG = {
    "algo": "fedavg", "dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [8]},
    "clients": 3, "partition": "iid", "rounds": 2, "save_every": 1, "local_steps": 2,
    "seed": 0,
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Path of a read-only-by-convention run directory; copy it before modifying."""
    out = tmp_path_factory.mktemp("run") / "run"
    fl.train(RUN_CONFIG, out, progress=False)
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, safe to corrupt."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst
