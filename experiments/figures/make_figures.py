"""The paper figures, regenerated from scratch: train → analyze → plot.

Run from a source checkout as ``python experiments/figures/make_figures.py`` (``make figures``;
``hessrank figures`` is a thin wrapper that finds and runs this script). The figure code lives
here, in ``experiments/figures/`` (one module per figure family, shared configs and runs in
``common.py``); the library only provides what it calls.

Each figure is produced by running code: federated runs are trained with
:func:`hessrank.fl.train` under a work directory (default ``runs/figures``, gitignored),
analyzed with :func:`hessrank.analysis.trajectory.analyze`, and drawn here. For each figure the
output directory receives ``NAME.png``, ``NAME.pdf``, ``NAME.csv`` (the numbers drawn) and
``NAME.json`` (command, configs, timing and the reading), and ``README.md`` is rebuilt from all
``*.json`` present, so ``--only`` refreshes one figure and keeps the others listed. Runs and
analyses are resumable: a finished run or analysis unit is reused, an interrupted one resumes.

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
  training data is split over K clients (FedLoRU's Fig. 2b setting, on digits).

``fast=True`` shrinks every setting (a few rounds and clients, a small MLP, few matvecs) so the
whole set runs in well under a minute on two cores; it exists for tests and smoke runs, and its
numbers are not meant to be read.

Torch runs single-threaded here by default (``threads=1``): for these small models an extra
intra-op thread does not pay, and on a loaded two-core machine two threads made a FedAvg round
on digits take 11 s instead of 0.05 s (OpenMP threads waiting on each other).

Example:
    >>> paths = make_figures("paper_figures_smoke", fast=True)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
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
    "accuracy_vs_clients": "test accuracy of the four algorithms vs the number of clients",
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
    args = ["python", "experiments/figures/make_figures.py", "--out", str(out), "--work",
            str(work), "--only", name, "--seed", str(seed)]
    if fast:
        args.append("--fast")
    return shlex.join(args)


def _write_readme(out: Path) -> Path:
    metas = []
    for p in out.glob("*.json"):
        try:
            meta = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if meta.get("figure") in FIGURES:
            metas.append(meta)
    order = list(FIGURES)
    metas.sort(key=lambda m: order.index(m["figure"]))
    lines = [
        "# Paper figures",
        "",
        "Generated by `python experiments/figures/make_figures.py` (`make figures`, or "
        "`hessrank figures` in a source checkout) from scratch: federated runs are trained, "
        "analyzed and plotted by the code in `experiments/figures/`. Each figure has a PNG, "
        "a PDF, the CSV of the numbers drawn and a JSON with the configs. The readings below "
        "are computed from those numbers when the figure is made. Error bars are standard "
        "errors (estimator stderr for single Hessians, spread/√count over clients or subset "
        "draws, leave-one-client-out jackknife for alignment).",
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
            f"- command: `{m['command']}` (scale `{m['scale']}`, seed {m['seed']}; took "
            f"{m['seconds']:.0f} s here, runs and analysis units found in the work directory "
            "reused)",
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
    path.write_text("\n".join(lines))
    return path


def make_figures(
    out: str | Path = "paper_figures",
    fast: bool = False,
    only: str | Sequence[str] | None = None,
    seed: int = 0,
    *,
    work: str | Path | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> list[Path]:
    """Train, analyze and plot the paper figures (module doc); returns the written paths.

    Args:
        out: figure directory (PNG, PDF, CSV, JSON per figure, and README.md).
        fast: shrink everything for a smoke run (~30 s on two cores).
        only: figure names (comma string or sequence) to make; default all of :data:`FIGURES`.
        seed: seeds training (config ``seed``) and every estimator and subset draw.
        work: where runs and analyses go (default ``runs/figures``, relative to the current
            directory); finished runs and analysis units found there are reused.
        progress: show the trainer's and the analysis' progress bars.
        threads: torch intra-op threads while making the figures (restored afterwards);
            None leaves torch's setting alone.
    Returns:
        Paths of the files written (per figure PNG, PDF, CSV, JSON; then README.md).
    Raises:
        ValueError: an unknown figure name.
    """
    import matplotlib
    import torch

    matplotlib.use("Agg")  # a script: no display (the figure modules leave the backend alone)
    names = parse_only(only)
    out = Path(out)
    work = Path(work) if work is not None else Path("runs") / "figures"
    scale = Scale.fast() if fast else Scale.full()
    ctx = Context(out=out, work=work, scale=scale, seed=int(seed), progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        written = [_make_one(ctx, name) for name in names]
    finally:
        torch.set_num_threads(before)
    return [p for paths in written for p in paths] + [_write_readme(out)]


def _make_one(ctx: Context, name: str) -> list[Path]:
    """Make one figure: its PNG, PDF, CSV and JSON (command, configs, timing, reading)."""
    import matplotlib.pyplot as plt

    t0 = time.perf_counter()
    made = _makers()[name](ctx)
    out = ctx.out
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        made.fig.savefig(p, dpi=130 if p.suffix == ".png" else None, bbox_inches="tight")
    plt.close(made.fig)
    csv = out / f"{name}.csv"
    made.frame.to_csv(csv, index=False, float_format="%.6g")
    fast = ctx.scale.name == "fast"
    meta = {
        "figure": name, "description": FIGURES[name], "reading": made.reading,
        "command": _command(name, fast, ctx.seed, out, ctx.work),
        "files": [p.name for p in (*paths, csv)], "scale": ctx.scale.name,
        "sizes": asdict(ctx.scale), "seed": ctx.seed, "configs": made.configs,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    meta_path = out / f"{name}.json"
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    if ctx.progress:
        print(f"[figures] {name}: {meta['seconds']:.0f} s — {made.reading}", flush=True)
    return [*paths, csv, meta_path]


# ---- CLI --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline's options (shared by this script and the ``hessrank figures`` wrapper)."""
    p.add_argument("--out", default="paper_figures", help="figure directory")
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


def run(args: argparse.Namespace) -> int:
    """Make the figures the parsed options ask for; print the written paths."""
    paths = make_figures(args.out, fast=args.fast, only=args.only, seed=args.seed,
                         work=args.work, progress=not args.quiet, threads=args.threads)
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
