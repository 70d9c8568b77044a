"""Study specs: every table checked before anything trains, one-line messages naming file,
table and key, close-match suggestions, the JSON schema, the hypothesis-kind registry."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hessrank.analysis import hypotheses, spec
from hessrank.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "experiments" / "configs"
BASE = spec.load_spec(CONFIGS / "centralized_digits.toml").raw


def _error(edit) -> str:
    raw = copy.deepcopy(BASE)
    edit(raw)
    with pytest.raises(ValueError) as err:
        spec.parse_spec(raw, where="spec.toml")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith("spec.toml: ")
    return message


# ---- issue 19 #5: each defect named there --------------------------------------------------------
def test_small_of_the_wrong_type_names_the_hypothesis_and_key():
    msg = _error(lambda r: r["hypotheses"][1].__setitem__("small", "x"))
    assert msg == ("spec.toml: [[hypotheses]] #2 'small': Input should be a valid integer "
                   "(got 'x')")
    assert "[[hypotheses]] #2 'small': missing key" in _error(
        lambda r: r["hypotheses"][1].pop("small"))


def test_a_bad_phase_bound_names_the_phase_and_key():
    msg = _error(lambda r: r["inference"]["phases"][1].__setitem__("lo", "x"))
    assert msg.startswith("spec.toml: [inference] phases #2 'lo': Input should be a valid number")
    assert "phase 'early' has lo 150 > hi 99" in _error(
        lambda r: r["inference"]["phases"][1].__setitem__("lo", 150))


def test_a_string_for_a_number_is_named_not_a_float_conversion_error():
    msg = _error(lambda r: r["hypotheses"][0].__setitem__("min_effect", "x"))
    assert msg == ("spec.toml: [[hypotheses]] #1 'min_effect': Input should be a valid number "
                   "(got 'x')")
    assert "could not convert" not in msg


@pytest.mark.parametrize("table, key, hint", [
    ("study", "replicate", "replicates"), ("controls", "nested_size", "nested_sizes"),
    ("inference", "resample", "resamples"), ("diagnostics", "matvec", "matvecs"),
    ("analyze", "subject", "subjects"), ("train", "learning_rate", None),
    ("train", "save_evry", "save_every"),
])
def test_unknown_keys_are_refused_in_every_table_with_a_suggestion(table, key, hint):
    msg = _error(lambda r: r[table].__setitem__(key, 1))
    assert f"[{table}]" in msg and f"unknown key {key!r}" in msg
    if hint:
        assert f"did you mean {hint!r}?" in msg
    assert "did you mean 'small'?" in _error(lambda r: r["hypotheses"][0].__setitem__("smal", 1))
    assert "unknown table [analyse] (did you mean analyze?)" in _error(
        lambda r: r.__setitem__("analyse", {}))


def test_hypotheses_are_checked_against_what_the_study_computes():
    assert "[analyze] subjects lack subset:70xD" in _error(
        lambda r: r["hypotheses"][0].__setitem__("small", 70))
    assert "nested_sizes lacks [500]" in _error(
        lambda r: r["controls"].__setitem__("nested_sizes", [50]))
    assert "client-server needs the server and clients" in _error(
        lambda r: r["hypotheses"].append({"name": "cs", "kind": "client-server",
                                          "min_effect": 0.1}))
    assert "record_updates = true" in _error(
        lambda r: r["hypotheses"].append({"name": "u", "kind": "alignment", "rank": 2,
                                          "source": "updates", "min_effect": 0.1}))
    assert "[analyze] 'rounds': [30] are not saved" in _error(
        lambda r: r["analyze"].__setitem__("rounds", [0, 30]))
    assert "'matvecs' must be >= " in _error(lambda r: r["analyze"].__setitem__("matvecs", 3))
    assert "key 'seed' is set by the study itself" in _error(
        lambda r: r["analyze"].__setitem__("seed", 3))
    assert "unknown kind 'subset-sizes' (did you mean 'subset-size'?)" in _error(
        lambda r: r["hypotheses"][0].__setitem__("kind", "subset-sizes"))
    assert "names must be unique" in _error(
        lambda r: r["hypotheses"][1].__setitem__("name", "n50_minus_n500"))
    assert "'method': unknown method 'wald'" in _error(
        lambda r: r["inference"].__setitem__("method", "wald"))


def test_analyze_values_name_their_key():
    """[analyze] subjects, quantities and rounds: the parsers' messages name the value only, so
    the spec names the key; a rounds string is checked against the rounds [train] saves."""
    assert "[analyze]: 'subjects': unknown subject 'subset:50'" in _error(
        lambda r: r["analyze"].__setitem__("subjects", "server,subset:50"))
    assert "[analyze]: 'subjects' must be a comma-separated string" in _error(
        lambda r: r["analyze"].__setitem__("subjects", 5))
    assert "[analyze]: 'quantities': unknown quantity 'stable-rnak'" in _error(
        lambda r: r["analyze"].__setitem__("quantities", "stable-rnak"))
    assert "[analyze]: 'rounds' must be a list of rounds" in _error(
        lambda r: r["analyze"].__setitem__("rounds", ["a"]))
    assert "[analyze] 'rounds': bad value 'x'" in _error(
        lambda r: r["analyze"].__setitem__("rounds", "x"))
    assert "[analyze] 'rounds': rounds [7] have no checkpoint" in _error(
        lambda r: r["analyze"].__setitem__("rounds", "0,7"))
    raw = copy.deepcopy(BASE)
    raw["analyze"]["rounds"] = "0:300:50"
    assert spec.parse_spec(raw, where="spec.toml").analyze["rounds"] == "0:300:50"


def test_committed_specs_are_valid():
    specs = sorted(CONFIGS.glob("*.toml"))
    assert specs
    for path in specs:
        s = spec.load_spec(path)
        assert s.hypotheses and s.replicates >= 10 and s.inference.method == "t"


def test_json_schema_and_help_come_from_the_models(capsys):
    assert main(["study", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(spec.StudySpec.model_fields)
    kinds = schema["$defs"]
    assert {"SubsetSize", "Alignment", "InferenceTable"} <= set(kinds)
    assert kinds["InferenceTable"]["properties"]["method"]["enum"][0] == "t"
    text = spec.format_help()
    for name in hypotheses.KINDS:
        assert name in text
    assert "[inference]" in text and "min_effect" in text


def test_study_help_describes_the_format_and_imports_nothing_heavy():
    code = ("import sys, io, contextlib\n"
            "from hessrank.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: main(['study', '--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'pandas', 'scipy') if m in sys.modules)\n"
            "print(heavy, 'subset-size' in buf.getvalue(), '[inference]' in buf.getvalue())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] True True"


def test_the_registry_carries_each_kind_whole():
    assert list(hypotheses.KINDS) == ["client-server", "subset-size", "nested", "alignment",
                                      "matched-size", "matched-label", "matched-histogram"]
    for name, kind in hypotheses.KINDS.items():
        assert kind.model.model_fields["kind"].annotation.__args__ == (name,)
        assert callable(kind.check) and callable(kind.units) and kind.summary
        assert issubclass(kind.model, hypotheses.HypothesisTable)
    assert hypotheses.KINDS["subset-size"].keys() == ["small", "large"]
