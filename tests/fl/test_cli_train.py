"""`hessrank train`: flags generated from TrainConfig, config files, typos, an end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from hessrank.cli import build_parser, main
from hessrank.fl.cli import build_config
from hessrank.fl.config import TrainConfig


def _parse(*argv: str):
    return build_parser().parse_args(["train", "--out", "unused", *argv])


def test_every_config_field_has_a_documented_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_flags_are_typed_and_override_only_when_given():
    args = _parse("--algo", "mfedloru", "--client-ranks", "8,4,2", "--factorize", "fc2",
                  "--from-scratch", "--lr", "0.3", "--model-kwargs", '{"hidden": [8]}',
                  "--data-root", "none")  # fmt: skip
    cfg = build_config(args)
    assert cfg.algo == "mfedloru" and cfg.client_ranks == [8, 4, 2] and cfg.factorize == ["fc2"]
    assert cfg.from_scratch is True and cfg.lr == 0.3 and cfg.model_kwargs == {"hidden": [8]}
    assert cfg.data_root is None and cfg.rounds == TrainConfig().rounds
    assert build_config(_parse("--algo", "fedlora", "--no-from-scratch")).from_scratch is False


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    TrainConfig(algo="fedlora", rounds=7, rank=3).save(path)
    cfg = build_config(_parse("--config", str(path), "--rank", "5"))
    assert (cfg.algo, cfg.rounds, cfg.rank) == ("fedlora", 7, 5)


@pytest.mark.parametrize(
    "argv",
    [["--clinets", "3"], ["--client", "3"], ["--algo", "fedsgd"], ["--rounds", "ten"]],
    ids=["typo", "abbreviation", "bad-choice", "bad-type"],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_invalid_value_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--clients", "0"]) == 2
    assert "config key 'clients': input should be greater than or equal to 1" in (
        capsys.readouterr().err
    )


def test_end_to_end_train(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--algo", "fedloru", "--clients", "3",
                 "--rounds", "2", "--local-steps", "2", "--model-kwargs", '{"hidden": [8, 8]}',
                 "--rank", "2", "--partition", "iid", "--quiet"])  # fmt: skip
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["algo"] == "fedloru" and saved["rank"] == 2 and "merge" in saved["notes"]
    assert (out / "checkpoints" / "round_00002.safetensors").is_file()
    assert "round 2" in capsys.readouterr().out


def test_dataset_and_model_catalogs_match_the_registries():
    """The CLI lists datasets and models from torch-free catalogs; every loader and builder
    must have its entry, with the same options (a new dataset fails here until it has one)."""
    from hessrank.data.catalog import DATASET_CATALOG
    from hessrank.data.datasets import DATASETS, load_dataset
    from hessrank.models import MODELS, build_model
    from hessrank.models.catalog import MODEL_CATALOG

    assert tuple(DATASET_CATALOG) == tuple(DATASETS)
    assert tuple(MODEL_CATALOG) == tuple(MODELS)
    for name, info in DATASET_CATALOG.items():
        with pytest.raises(ValueError, match="valid options: (.*)") as err:
            load_dataset(name, probe_option=1)
        valid = err.value.args[0].rpartition("valid options: ")[2].split(", ")
        assert sorted(valid) == sorted(["limit", *info.options]), name
    for name, info in MODEL_CATALOG.items():
        with pytest.raises(ValueError, match="valid options") as err:
            build_model(name, (1, 8, 8), 3, probe_option=1)
        valid = err.value.args[0].rpartition("valid options: ")[2].split(", ")
        assert sorted(valid) == sorted(info.options), name


def test_help_lists_every_registered_name_and_option_group(capsys):
    from hessrank.data.catalog import DATASET_CATALOG
    from hessrank.fl.registry import ALGORITHMS, option_groups
    from hessrank.models.catalog import MODEL_CATALOG

    with pytest.raises(SystemExit):
        _parse("--help")
    text = capsys.readouterr().out
    for name in [*ALGORITHMS, *DATASET_CATALOG, *MODEL_CATALOG]:
        assert f"  {name} " in text, name
    for group in option_groups():
        assert group.__doc__.splitlines()[0].rstrip(".") in text, group.__name__


def test_parsers_import_neither_torch_nor_pydantic():
    code = ("import sys\nfrom hessrank.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'pydantic', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
