"""The top-level ``hessrank`` CLI: light ``--help``, defaults shown, one-line errors with
suggestions, ``--version``, ``--debug``, the error guard, one-line warnings, rounded numbers,
and the progress helper."""

from __future__ import annotations

import errno
import io
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import hessrank
from hessrank.cli import build_parser, main
from hessrank.clikit import format_fields, format_number, one_line_warnings, run_command
from hessrank.progress import LineProgress, progress

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "pandas", "matplotlib", "scipy", "tqdm")


def _run(*args: str, preexec=None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout, preexec_fn=preexec)  # fmt: skip


def _hessrank(*argv: str, **kw) -> subprocess.CompletedProcess:
    return _run("-m", "hessrank.cli", *argv, **kw)


# ---- --help is light -----------------------------------------------------------------------
def test_building_every_parser_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from hessrank.cli import build_parser\n"
        "p = build_parser()\n"
        "p.format_help()\n"
        "for sub in p.subcommands.choices.values(): sub.format_help()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["", "train", "analyze", "plot", "figures"])
def test_help_does_not_import_torch(command):
    done = _run("-X", "importtime", "-m", "hessrank.cli", *command.split(), "--help")
    assert done.returncode == 0
    assert "usage: hessrank" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_import_hessrank_is_lazy_and_every_public_name_resolves():
    done = _run("-c", "import sys, hessrank; print('torch' in sys.modules)")
    assert done.stdout.strip() == "False"
    for name in hessrank.__all__:
        assert getattr(hessrank, name) is not None, name
    assert set(hessrank.__all__) <= set(dir(hessrank))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hessrank.nope  # noqa: B018


def test_analyze_help_lists_match_the_library():
    """The subject forms are spelled out for --help (the parser sits beside torch code); the
    quantities are read from the registry when the parser is built (test_registry.py), not
    copied at import, so a registered quantity is never missing from --help."""
    from hessrank.analysis import cli as analysis_cli
    from hessrank.analysis.subjects import VALID_FORMS

    assert analysis_cli.VALID_FORMS == VALID_FORMS
    assert not hasattr(analysis_cli, "QUANTITIES")


# ---- help content --------------------------------------------------------------------------
def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


def test_every_subcommand_shows_its_defaults(capsys):
    text = _help("analyze", capsys=capsys)
    for shown in ("(default: 0)", "(default: eval)", "(default: 4)", "(default: server,clients)"):
        assert shown in text, shown  # --seed, --mode, --density-probes, --subjects
    assert "(default: None)" not in text and "(default: False)" not in text
    text = _help("train", capsys=capsys)
    assert "(default: 'fedavg')" in text and "--resume, --no-resume" in text
    assert "(default: True)" in text  # --resume
    assert "(default: 0)" in _help("figures", capsys=capsys)
    top = _help(capsys=capsys)
    for command in ("train", "analyze", "plot", "figures", "--version", "--debug"):
        assert command in top


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"hessrank {hessrank.__version__}"


# ---- bad flags and subcommands: one line, a suggestion, exit 2 -----------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["analyse", "x"], "invalid choice: 'analyse' (did you mean analyze?)"),
        (["analyze", "x", "--matvec", "3"], "unrecognized argument --matvec (did you mean "
                                            "--matvecs?)"),
        (["train", "--out", "x", "--lr-sched", "cosine"], "--lr-sched (did you mean "
                                                          "--lr-schedule?)"),
        (["train", "--out", "x", "--algo", "fedlor"], "invalid choice: 'fedlor' (did you mean "
                                                      "fedloru?)"),
        (["train", "--out", "x", "--clinets=3"], "--clinets (did you mean --clients?)"),
        (["analyze"], "the following arguments are required: RUN_DIR"),
        (["plot", "a", "b"], "unexpected argument b"),
    ],
    ids=["subcommand", "flag", "flag-with-value", "choice", "flag=value", "missing", "extra"],
)
def test_bad_command_lines_are_one_line_with_a_suggestion(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hessrank")
    assert expected in err
    assert "--help" in err


def test_a_typo_with_no_close_match_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--algo", "zzz"])
    assert "choose from" in capsys.readouterr().err


# ---- the error guard -------------------------------------------------------------------------
def _raise(err: BaseException):
    def func():
        raise err

    return func


@pytest.mark.parametrize(
    ("err", "status", "expected"),
    [
        (ValueError("--lr must be > 0, got -1"), 2, "--lr must be > 0, got -1"),
        (KeyError("unknown parameter 'fc.weigth'"), 2, "unknown parameter 'fc.weigth'"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x"), 2,
         "No such file or directory: runs/x"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 1,
         "Permission denied: /ro/out (choose a location you can write to)"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), 1, "read-only"),
        (OSError(errno.ENOSPC, "No space left on device", "out/x.parquet"), 1, "free some space"),
        (OSError(errno.EFBIG, "File too large"), 1, "ulimit -f"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "out/config.json"), 1,
         "Is a directory: out/config.json"),
        (RuntimeError("shape mismatch\n  at layer fc\n  more"), 1,
         "RuntimeError: shape mismatch [...] (rerun with --debug for the traceback)"),
        (AssertionError("Torch not compiled with CUDA enabled"), 1,
         "AssertionError: Torch not compiled with CUDA enabled (rerun with --debug"),
    ],
    ids=["value", "key", "missing-file", "permission", "read-only", "disk-full", "ulimit",
         "is-a-directory", "runtime-multiline", "assertion"],
)
def test_escaping_errors_become_one_line(err, status, expected, capsys):
    assert run_command("hessrank x", _raise(err)) == status
    out = capsys.readouterr()
    assert out.err == f"hessrank x: error: {out.err.split('error: ', 1)[1]}"
    assert out.err.count("\n") == 1 and expected in out.err and "Traceback" not in out.err


def test_ctrl_c_exits_130_and_debug_lets_errors_through(capsys):
    assert run_command("hessrank x", _raise(KeyboardInterrupt())) == 130
    assert "hessrank x: interrupted" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="boom"):
        run_command("hessrank x", _raise(RuntimeError("boom")), debug=True)
    assert run_command("hessrank x", lambda: None) == 0
    assert run_command("hessrank x", lambda: 3) == 3


def test_train_into_an_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    """A read-only --out (simulated: the tests may run as root, who can write anywhere)."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    argv = ["train", "--out", str(tmp_path / "r"), "--rounds", "1", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("hessrank train: error: Permission denied: ") and err.count("\n") == 1
    with pytest.raises(PermissionError):  # --debug, before or after the subcommand
        main(["--debug", *argv])
    with pytest.raises(PermissionError):
        main([*argv, "--debug"])


@pytest.mark.slow
def test_a_file_in_the_way_of_out_is_one_line(tmp_path):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a directory")
    done = _hessrank("train", "--out", str(in_the_way / "run"), "--rounds", "1", "--quiet")
    assert done.returncode == 1
    assert done.stderr.startswith("hessrank train: error: Not a directory")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_disk_full_is_one_line(tmp_path):
    """``ulimit -f``: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = _hessrank("train", "--out", str(tmp_path / "run"), "--rounds", "2", "--quiet",
                     preexec=limit)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("hessrank train: error: File too large")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


# ---- warnings ------------------------------------------------------------------------------
def test_warnings_are_one_line_without_source_lines_only_while_installed():
    with one_line_warnings("hessrank analyze"):
        text = warnings.formatwarning("skipping round 2: corrupt\ndetails", UserWarning,
                                      "/x/trajectory.py", 535, "warnings.warn(...)")  # fmt: skip
        other = warnings.formatwarning("overflow", RuntimeWarning, "/x/y.py", 1)
    assert text == "hessrank analyze: warning: skipping round 2: corrupt [...]\n"
    assert other == "hessrank analyze: warning: RuntimeWarning: overflow\n"
    assert "trajectory.py" in warnings.formatwarning("m", UserWarning, "/x/trajectory.py", 5)


def test_a_warning_in_a_process_prints_one_line():
    code = ("import warnings\nfrom hessrank.clikit import one_line_warnings\n"
            "with one_line_warnings('hessrank x'):\n"
            "    warnings.warn('lower --matvecs, or pass --rtol')\n")
    done = _run("-c", code)
    assert done.stderr == "hessrank x: warning: lower --matvecs, or pass --rtol\n"


# ---- numbers -------------------------------------------------------------------------------
def test_numbers_are_rounded_for_people():
    assert format_number(2.2690107822418213) == "2.269"
    assert format_number(0.96666) == "0.9667"
    assert format_number(12) == "12" and format_number(50.0) == "50"
    assert format_number(1234.5678) == "1235" and format_number(1.23e-7) == "1.23e-07"
    assert format_number(None) == "n/a" and format_number(float("nan")) == "nan"
    assert format_number(True) == "True" and format_number("x") == "x"
    assert (format_fields({"round": 50, "train_loss": 0.123456, "test_accuracy": 0.96111})
            == "round 50, train loss 0.1235, test accuracy 0.9611")


# ---- progress ------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_tqdm_on_a_terminal_and_lines_elsewhere():
    from tqdm.auto import tqdm

    bar = progress(range(3), desc="x", file=_Terminal())
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    log = io.StringIO()
    reporter = progress(range(3), desc="analyze", unit="unit", file=log)
    assert isinstance(reporter, LineProgress)
    assert list(reporter) == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("analyze: 0/3 units (0%)")
    assert lines[-1].startswith("analyze: 3/3 units (100%)")
    assert "\r" not in log.getvalue()


def test_line_progress_prints_periodically_with_postfix():
    log = io.StringIO()
    with LineProgress(total=4, desc="train", unit="round", every=0.0, file=log) as bar:
        for _ in range(4):
            bar.set_postfix(loss=2.2690107, test=0.5)
            bar.update()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 + 4 + 1  # start, one per update (every=0), the closing line
    assert lines[2].startswith("train: 2/4 rounds (50%)") and "left" in lines[2]
    assert lines[2].endswith("loss=2.269, test=0.5")
    quiet = io.StringIO()
    with LineProgress(total=2, every=0.0, file=quiet, disable=True) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""
