"""`hessrank analyze` / `hessrank plot`: every bad input is one line and a non-zero exit, found
before any work (issue 9, item 4); progress without a TTY is plain lines (item 8)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hessrank.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions: a read-only file system instead
        return Path("/sys/hessrank-test-out")
    return ro / "an"


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seed", str(2**70)], "--seed must be"),
    (["--seed", "-1"], "--seed must be"),
    (["--density-probes", "0", "--quantities", "density"], "--density-probes must be >= 1"),
    (["--density-steps", "0", "--quantities", "density"], "--density-steps must be >= 1"),
    (["--matvecs", "3"], "--matvecs must be >= 10"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--memory-mb", "0"], "--memory-mb must be a positive"),
    (["--memory-mb", "inf"], "--memory-mb must be a positive"),
    (["--device", "cuda"], "CUDA"),
    (["--device", "tpu9"], "--device"),
    (["--dtype", "float16"], "--dtype"),
    (["--mode", "predict"], "--mode"),
    (["--curvature", "hessain"], "--curvature"),
    (["--rtol", "0"], "--rtol"),
    (["--rtol", "2"], "--rtol"),
    (["--alignment-ranks", "1,x", "--quantities", "alignment"], "--alignment-ranks"),
    (["--alignment-ranks", "-1", "--quantities", "alignment"], "--alignment-ranks"),
    (["--params", "fc1.weigth"], "fc1.weigth"),
    (["--clients", "0"], "--clients"),
    (["--subjects", "clients:7"], "client ids [7]"),
    (["--subjects", "subset:5000x2"], "5000"),
    (["--rounds", "7"], "saved rounds"),
])
def test_bad_flag_fails_once_before_any_work(trained_run, tmp_path, capsys, flags, needle):
    out = tmp_path / "an"
    code = main(["analyze", str(trained_run), "--out", str(out), "--quiet", *flags])
    assert code == 2
    _one_line(capsys, needle)
    assert not out.exists()  # nothing was computed or written


def test_out_naming_a_file(trained_run, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["analyze", str(trained_run), "--out", str(f), "--quiet"]) == 2
    _one_line(capsys, "not a directory")
    assert main(["plot", str(trained_run), "--out", str(f)]) != 0  # no table: one line too
    _one_line(capsys, "hessrank plot")


def test_read_only_out(trained_run, tmp_path, capsys):
    out = _read_only_dir(tmp_path)
    assert main(["analyze", str(trained_run), "--out", str(out), "--quiet"]) == 2
    _one_line(capsys, "cannot write")


def test_plot_errors_are_one_line(trained_run, tmp_path, capsys):
    an = tmp_path / "an"
    assert main(["analyze", str(trained_run), "--rounds", "0", "--subjects", "server",
                 "--matvecs", "10", "--out", str(an), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["plot", str(an), "--out", str(_read_only_dir(tmp_path))]) == 2
    _one_line(capsys, "cannot write")
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["plot", str(an), "--out", str(f)]) == 2
    _one_line(capsys, "not a directory")
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    _one_line(capsys, "hessrank analyze")


def test_disk_full_is_one_line(trained_run, tmp_path, capsys, monkeypatch):
    import hessrank.analysis.store as store

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "atomic_write_bytes", full)
    code = main(["analyze", str(trained_run), "--rounds", "0", "--subjects", "server",
                 "--matvecs", "10", "--out", str(tmp_path / "an"), "--quiet"])
    assert code == 1
    _one_line(capsys, "No space left on device")


@pytest.mark.slow
def test_file_size_limit_in_a_subprocess(trained_run, tmp_path):
    """`ulimit -f`: writes fail with EFBIG (Python ignores SIGXFSZ)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = (f"ulimit -f 4; exec {sys.executable} -m hessrank.cli analyze {trained_run} "
           f"--rounds 0 --subjects server,clients --quantities stable-rank,top-eig "
           f"--matvecs 10 --out {tmp_path / 'an'} --quiet")
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "too large" in lines[0] or "file size limit" in lines[0], p.stderr


@pytest.mark.parametrize("body, needle", [
    ("def make(width):\n    return build_model('mlp', (1, 8, 8), 10, hidden=(width,))\n",
     "takes arguments"),
    ("def make():\n    return build_model('mlp', (1, 4, 4), 10, hidden=(4,))\n",
     "does not fit the data"),
    ("def make():\n    return 3\n", "not a torch.nn.Module"),
])
def test_bad_model_factory(tmp_path, monkeypatch, capsys, body, needle):
    import torch

    from hessrank.models import build_model

    name = f"bad_nets_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{name}.py").write_text("from hessrank.models import build_model\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save(build_model("mlp", (1, 8, 8), 10, hidden=(4,)).state_dict(), ckpts / "r_1.pt")
    code = main(["analyze", str(ckpts), "--model-factory", f"{name}:make", "--dataset",
                 "digits", "--clients", "2", "--matvecs", "10", "--out", str(tmp_path / "an"),
                 "--quiet"])
    assert code == 2
    _one_line(capsys, needle)
    assert not (tmp_path / "an").exists()


def test_debug_lets_the_error_through(trained_run, tmp_path):
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        main(["analyze", str(trained_run), "--batch-size", "0", "--debug", "--quiet"])


def test_progress_without_a_tty_is_plain_lines(trained_run, tmp_path, capsys):
    assert main(["analyze", str(trained_run), "--rounds", "0", "--subjects", "server",
                 "--matvecs", "10", "--out", str(tmp_path / "an")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("analyze:")]
    assert len(lines) >= 2 and "products" in lines[0] and "(100%)" in lines[-1]


def test_cli_module_imports_nothing_heavy():
    """`hessrank analyze --help` stays fast: the CLI module defers pandas, matplotlib and the
    analysis modules to the command functions."""
    code = ("import sys, hessrank; before = set(sys.modules); import hessrank.analysis.cli; "
            "heavy = ('pandas', 'matplotlib', 'hessrank.analysis.trajectory', "
            "'hessrank.analysis.store', 'hessrank.analysis.sources', "
            "'hessrank.analysis.plotting', 'torch', 'numpy'); "
            "bad = [m for m in heavy if m in set(sys.modules) - before]; print(bad); "
            "sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_curvature_is_checked_once_up_front(trained_run, tmp_path, capsys):
    """A curvature this build lacks fails before any work; one it has lands in its column."""
    import pandas as pd

    out = tmp_path / "an"
    code = main(["analyze", str(trained_run), "--rounds", "0", "--subjects", "server",
                 "--matvecs", "10", "--curvature", "ggn", "--out", str(out), "--quiet"])
    try:
        from hessrank.curvature import curvature_class  # noqa: F401
    except ImportError:
        assert code == 2
        _one_line(capsys, "--curvature ggn is not available")
        assert not out.exists()
        return
    assert code == 0
    assert set(pd.read_parquet(out / "results.parquet")["curvature"]) == {"ggn"}
