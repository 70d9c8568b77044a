"""Smoke test of ``hessrank study``: two tiny replicates, resume, refusal, bad specs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hessrank.analysis import inference as inf
from hessrank.analysis import study
from hessrank.cli import main

SPEC = """
[study]
name = "smoke"
replicates = 2
seed = 3
[train]
algo = "fedavg"
dataset = "digits"
model = "mlp"
model_kwargs = { hidden = [6] }
clients = 2
partition = "iid"
rounds = 2
local_steps = 1
save_every = 1
[analyze]
subjects = "server,clients,subset:10x3,subset:100x2"
matvecs = 6
[controls]
matched_draws = 1
[inference]
resamples = 200
[[hypotheses]]
name = "client_minus_server"
kind = "client-server"
transform = "log"
min_effect = 0.05
[[hypotheses]]
name = "n10_minus_n100"
kind = "subset-size"
small = 10
large = 100
min_effect = 0.1
[[hypotheses]]
name = "client_minus_size_matched"
kind = "matched-size"
min_effect = 0.1
"""


def test_study_command_end_to_end(tmp_path, capsys):
    spec = tmp_path / "smoke.toml"
    spec.write_text(SPEC)
    out = tmp_path / "study"
    assert main(["study", str(spec), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "n10_minus_n100" in printed.out and "few clusters" in printed.err
    hyp = pd.read_csv(out / "hypotheses.csv")
    assert list(hyp.columns[: len(inf.HYPOTHESES_COLUMNS)]) == inf.HYPOTHESES_COLUMNS
    assert set(hyp["verdict"]) <= set(inf.VERDICTS)
    assert (hyp["n_replicates"] == 2).all()
    assert len(hyp) == 3 * 3  # 3 hypotheses × early/middle/late (rounds 0, 1, 2)
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["replicate"].unique()) == [0, 1]
    assert set(table["train_seed"]) == {3, 4}
    seeds = table.groupby("replicate")["seed"].first()
    assert seeds[0] != seeds[1] and seeds[0] == study.analysis_seed(3, 0)
    # different probes and different subset draws across replicates
    sub = table[table["subject_kind"] == "subset"].groupby("replicate")["data_seed"].apply(set)
    assert not (sub[0] & sub[1])
    assert (out / "regression.csv").is_file()
    reg = pd.read_csv(out / "regression.csv")
    assert set(reg["phase"]) == {"all", "early", "middle", "late"}
    ckpt = out / "replicate_0" / "run" / "checkpoints"
    ctrl = (out / "replicate_1" / "controls" / "controls.parquet").stat().st_mtime_ns
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    # rerun resumes: nothing retrained, same verdicts
    assert main(["study", str(spec), "--out", str(out), "--quiet"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert (out / "replicate_1" / "controls" / "controls.parquet").stat().st_mtime_ns == ctrl
    assert len(json.loads((out / "study.json").read_text())["runs"]) == 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "hypotheses.csv"), hyp)
    # another spec into the same directory is refused with one line
    spec.write_text(SPEC.replace("min_effect = 0.05", "min_effect = 0.5"))
    capsys.readouterr()
    assert main(["study", str(spec), "--out", str(out), "--quiet"]) == 2
    assert "different spec" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('kind = "client-server"', 'kind = "bogus"'), "unknown kind"),
    (lambda s: s.replace("min_effect = 0.05", "min_effect = 0"), "min_effect > 0"),
    (lambda s: s.replace("[analyze]", "[analyse]"), "unknown sections"),
    (lambda s: s.replace("rounds = 2", "rounds = 2\nbogus_key = 1"), "unknown config keys"),
    (lambda s: s + "\n[[", "not valid TOML"),
])
def test_bad_specs_fail_with_one_line(tmp_path, capsys, edit, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(edit(SPEC))
    assert main(["study", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_committed_specs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments" / "configs"
    specs = sorted(root.glob("*.toml"))
    assert specs
    for path in specs:
        spec = study.load_spec(path)
        assert spec.hypotheses and spec.replicates >= 1


def test_committed_verdicts_follow_from_the_committed_table():
    # experiments/results/centralized_digits: hypotheses.csv is what infer() gives on the
    # committed tidy table with the committed spec (numbers come from running code).
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments"
    spec = study.load_spec(root / "configs" / "centralized_digits.toml")
    res = root / "results" / "centralized_digits"
    got = study.infer(pd.read_parquet(res / "results.parquet"), spec, spec.train["rounds"])
    want = pd.read_csv(res / "hypotheses.csv").fillna(
        {"verdict_even_grid": "", "verdict_odd_grid": ""})
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)
    v = dict(zip(zip(want["hypothesis"], want["phase"]), want["verdict"]))
    assert v[("n50_minus_n500", "init")] == "supported"
    assert v[("n50_minus_n500", "late")] == "reversed"
