"""Issue 11 #5: the heterogeneous least-squares problem runs from ``hessrank train``."""

from __future__ import annotations

import pytest
import torch

from hessrank.cli import main
from hessrank.data.datasets import load_dataset
from hessrank.fl import RunDir


def test_heterogeneity_knob_moves_the_group_minimizers_apart():
    iid = load_dataset("hetero-lsq", groups=4, heterogeneity=0.0)
    het = load_dataset("hetero-lsq", groups=4, heterogeneity=1.0)
    spread = [float((d.meta["W_star_groups"] - d.meta["W_star_groups"][0]).abs().max())
              for d in (iid, het)]  # fmt: skip
    assert spread[0] == 0.0 and spread[1] > 0.5
    assert het.meta["train_groups"].shape[0] == het.train_x.shape[0]


def _train(out, correction: str) -> float:
    argv = ["train", "--out", str(out), "--algo", "fedlrt", "--dataset", "hetero-lsq",
            "--dataset-kwargs", '{"groups": 4, "heterogeneity": 1.0}', "--model", "linear",
            "--factorize", "fc", "--clients", "4", "--partition", "shards",
            "--shards-per-client", "1", "--rounds", "15", "--local-steps", "5",
            "--batch-size", "100000", "--lr", "0.3", "--rank", "4", "--trunc-theta", "0.01",
            "--dtype", "float64", "--correction", correction, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    run = RunDir(out)
    # one group per client: the partition follows the dataset's group ids
    groups = run.dataset().meta["train_groups"]
    assert all(len(set(groups[idx].tolist())) == 1 for idx in run.partition().indices)
    return float(run.metrics()["train_loss"].iloc[-1])


def test_fedlrt_full_correction_converges_none_stalls_from_the_cli(tmp_path):
    """Full correction reaches the dense least-squares minimum L*, none stalls above it."""
    ds = load_dataset("hetero-lsq", groups=4, heterogeneity=1.0)
    x, y = ds.train_x.double(), ds.train_y.double()
    w = torch.linalg.lstsq(x, y).solution.T
    l_star = float(0.5 * (x @ w.T - y).pow(2).sum(1).mean())
    full, none = _train(tmp_path / "full", "full"), _train(tmp_path / "none", "none")
    # measured: L* = 0.467405, full 0.467405 (+6e-12), none 0.5610 after 15 rounds
    assert full - l_star < 1e-6, (full, l_star)
    assert none - l_star > 0.05, (none, l_star)


def test_unknown_dataset_option_is_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--dataset", "hetero-lsq",
                 "--dataset-kwargs", '{"heterogenity": 1}', "--model", "linear"])  # fmt: skip
    assert code != 0 and "valid options" in capsys.readouterr().err


@pytest.mark.parametrize("h", [-0.1, 1.5])
def test_bad_heterogeneity(h):
    with pytest.raises(ValueError, match="heterogeneity in"):
        load_dataset("hetero-lsq", heterogeneity=h)
