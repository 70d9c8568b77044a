"""`hessrank analyze` / `hessrank plot`: exit codes and outputs."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from hessrank.cli import main


@pytest.mark.parametrize("flag, message", [
    (["--quantities", "stable-rank,bogus"], "unknown quantity 'bogus'"),
    (["--subjects", "server,subset:5"], "unknown subject 'subset:5'"),
    (["--rounds", "1:x"], "start:stop:step"),
])
def test_bad_flags_exit_2_with_one_line(trained_run, capsys, flag, message):
    assert main(["analyze", str(trained_run), "--quiet", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_analyze_then_plot(trained_run, tmp_path, capsys):
    out = tmp_path / "an"
    argv = ["analyze", str(trained_run), "--rounds", "0:2:2", "--subjects", "server,clients",
            "--quantities", "stable-rank,alignment", "--matvecs", "10", "--out", str(out),
            "--alignment-ranks", "1,full", "--quiet"]
    assert main(argv) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["quantity"]) >= {"stable-rank", "alignment"}
    assert main(["plot", str(out), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "stable_rank_vs_round.pdf").is_file()


def test_failed_checkpoint_exits_1_with_summary(run_copy, tmp_path, capsys):
    (run_copy / "checkpoints" / "round_00002.safetensors").write_bytes(b"\x00" * 10)
    argv = ["analyze", str(run_copy), "--subjects", "server", "--matvecs", "10", "--quiet"]
    with pytest.warns(UserWarning):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 unit(s) failed in rounds [2]" in err and "errors.csv" in err
    assert (run_copy / "analysis" / "results.parquet").is_file()


def test_model_factory_route(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from hessrank.models import build_model\n"
        "def small():\n    return build_model('mlp', (1, 8, 8), 10, hidden=(4,))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    sys.modules.pop("my_nets", None)
    import my_nets

    torch.save(my_nets.small().state_dict(), ckpts / "round_1.pt")
    argv = ["analyze", str(ckpts), "--model-factory", "my_nets:small", "--dataset", "digits",
            "--clients", "2", "--matvecs", "10", "--out", str(tmp_path / "an"), "--quiet"]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "an" / "results.csv")
    assert set(table["subject"]) == {"client0", "client1", "server"}
    bad = ["analyze", str(ckpts), "--model-factory", "my_nets:nope", "--dataset", "digits",
           "--clients", "2", "--quiet"]
    assert main(bad) == 2
