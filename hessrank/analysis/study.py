"""Studies: R replicates of train → analyze → one tidy table → ``hypotheses.csv`` (§6 of
docs/design.md).

The spec format (TOML, ``experiments/configs/*.toml``) is :mod:`hessrank.analysis.spec`; the
hypothesis kinds are :mod:`hessrank.analysis.hypotheses`; the tests and verdicts
:mod:`hessrank.analysis.inference`; the checkpoint-grid checks :mod:`hessrank.analysis.grid`;
the planning numbers :mod:`hessrank.analysis.planning`. The whole spec is validated before
the first replicate trains.

Seeds. Replicate i trains with ``study.seed + i`` (model init, data split, partition, batch
order) and analyzes with :func:`analysis_seed` (a SeedSequence of (study seed, i)), so subset
draws and estimator probes are independent across replicates. Within one replicate,
``analyze`` derives each unit's estimator seed from that seed, the round and the subject group
(:func:`hessrank.analysis.settings.probe_seed`: probe vectors are independent across rounds
and groups), while a subset draw's indices come from the seed alone, so draw d is the same
subset at every round (paired by design).

Layout of ``out``: ``spec.json`` (the spec as run), ``replicate_{i}/run`` (training),
``replicate_{i}/analysis`` (``analyze``'s resumable store), ``replicate_{i}/controls``,
``results.{parquet,csv}`` (all replicates, with a ``replicate`` column), ``hypotheses.csv``
with its ``README.md`` (what every column, verdict and flag means), ``profile.csv`` (the
effect per round, :func:`hessrank.analysis.grid.round_profile`), ``plan.csv`` (variance
components and replicates needed), ``regression.csv`` (with controls), ``diagnostics.csv``
(with [diagnostics]; per replicate in ``replicate_{i}/diagnostics.csv``) and, with two or
more subset sizes among its subjects, ``diagnostics_tests.csv`` (smallest − largest size of
each diagnostic per phase, :func:`hessrank.analysis.diagnostics.reversal_tests`),
``update_pairs.csv`` (alignment of recorded updates; per replicate in
``replicate_{i}/update_pairs.csv``) and ``study.json`` (provenance, with every invocation's
spec).

Several processes or machines that share ``out`` can compute disjoint sets of replicates
(:func:`compute_replicates`, ``hessrank study --only``); a final :func:`run_study` reuses them
and runs the tests.

Rerunning resumes: trained replicates, analysis units, controls and diagnostics are reused
when their settings did not change, and the tests are redone. A spec whose training settings
([train], study seed) differ from those the replicates in ``out`` were trained with is
refused; any other change (a fixed [analyze], [inference] or hypothesis) reuses the trained
replicates.
"""

from __future__ import annotations

import copy
import io
import json
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from hessrank.analysis import grid, planning
from hessrank.analysis import inference as inf
from hessrank.analysis.controls import analyze_controls, rank_regression, subject_label_entropy
from hessrank.analysis.diagnostics import reversal_tests, run_diagnostics
from hessrank.analysis.hypotheses import KINDS
from hessrank.analysis.sidecar import hypotheses_readme
from hessrank.analysis.spec import StudySpec, load_spec, parse_spec
from hessrank.analysis.trajectory import analyze
from hessrank.analysis.update_alignment import load_client_updates, pair_differences
from hessrank.fl import train
from hessrank.fl.rundir import RunDir
from hessrank.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "StudySpec",
    "analysis_seed",
    "build_units",
    "compute_replicates",
    "format_plan",
    "format_verdicts",
    "infer",
    "load_spec",
    "parse_spec",
    "phases_of",
    "plan_study",
    "run_study",
    "update_pairs",
]


def analysis_seed(study_seed: int, replicate: int) -> int:
    """The analysis seed of a replicate: a 31-bit word of SeedSequence((study_seed, replicate,
    1)), independent across replicates (the 1 separates it from other streams)."""
    state = np.random.SeedSequence([int(study_seed), int(replicate), 1]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


def phases_of(spec: StudySpec) -> list[inf.Phase]:
    """The spec's ``[inference] phases`` (default: thirds of the rounds)."""
    return spec.phases()


def update_pairs(run_path: Path, ranks: Sequence[int]) -> pd.DataFrame:
    """D_r per (round, layer, client pair) of every recorded round of a run."""
    folder = run_path / "updates"
    rounds = sorted(int(p.stem.removeprefix("round_")) for p in folder.glob("round_*.safetensors")
                    ) if folder.is_dir() else []
    if not rounds:
        raise ValueError(f"{run_path} has no recorded client updates ({folder}); the alignment "
                         "hypotheses of updates need [train] record_updates = true")
    frames = [pair_differences(load_client_updates(run_path, r), ranks).assign(round=r)
              for r in rounds]
    return pd.concat(frames, ignore_index=True)


def _diagnostics_replicate(run_path: Path, out: Path, seed: int, rounds, conf: dict[str, Any],
                           progress: bool) -> pd.DataFrame:
    """Diagnostics of one replicate, reused when ``out`` holds them for the same settings."""
    kwargs = {"rounds": rounds, **conf}
    settings = json.dumps({"seed": seed, **kwargs}, sort_keys=True, default=str)
    csv, meta = out / "diagnostics.csv", out / "diagnostics.json"
    if csv.is_file() and meta.is_file() and meta.read_text() == settings:
        return pd.read_csv(csv)
    table = run_diagnostics(run_path, seed=seed, progress=progress, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv, table.to_csv(index=False))
    atomic_write_text(meta, settings)
    return table


# ---- inference --------------------------------------------------------------------------------
def build_units(table: pd.DataFrame, spec: StudySpec, index: int,
                updates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Units frame of hypothesis ``index`` of ``spec`` from the study table (or, for an
    alignment hypothesis of recorded updates, from the pair table ``updates``), built by its
    kind's entry in :data:`hessrank.analysis.hypotheses.KINDS`."""
    h = spec.hypotheses[index]
    if spec.from_updates(index):
        if updates is None:
            raise ValueError(f"hypothesis {h.name!r} tests recorded updates; pass their pair "
                             "table")
        return KINDS[h.kind].units(table, h, updates)
    return KINDS[h.kind].units(table, h, None)


def _test_kwargs(spec: StudySpec, last_round: int) -> dict[str, Any]:
    conf = spec.inference
    return dict(
        min_effect={h.name: h.min_effect for h in spec.hypotheses}, phases=spec.phases(),
        last_round=last_round, alpha=conf.alpha, adjust=conf.adjust, method=conf.method,
        num_resamples=conf.resamples, seed=conf.seed if conf.seed is not None else spec.seed,
        transform={h.name: h.transform for h in spec.hypotheses}, power=conf.power,
    )


def _all_units(table: pd.DataFrame, spec: StudySpec,
               updates: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    return {h.name: build_units(table, spec, i, updates) for i, h in enumerate(spec.hypotheses)}


def infer(table: pd.DataFrame, spec: StudySpec, last_round: int | None = None,
          updates: pd.DataFrame | None = None) -> pd.DataFrame:
    """``hypotheses.csv`` of a study table: every hypothesis × phase in one family
    (:func:`hessrank.analysis.inference.test_hypotheses`), then the checkpoint-grid columns
    (:func:`hessrank.analysis.grid.grid_columns`). ``attrs["profile"]``: the per-round profile.

    ``updates``: the pair table of the recorded updates (all replicates), needed by the
    alignment hypotheses of updates (:meth:`StudySpec.update_ranks`).
    """
    last_round = spec.last_round if last_round is None else int(last_round)
    units = _all_units(table, spec, updates)
    kwargs = _test_kwargs(spec, last_round)
    hyp = inf.test_hypotheses(units, **kwargs)
    profile = grid.round_profile(units, alpha=spec.inference.alpha)
    hyp = grid.grid_columns(hyp, units, kwargs, profile)
    hyp.attrs["profile"] = profile
    return hyp


def plan_study(spec: StudySpec, pilot: str | Path) -> pd.DataFrame:
    """Replicates × units per replicate for the spec's power at each hypothesis's δ, from the
    variance components of a pilot or finished study in ``pilot`` (its ``results.parquet``
    and, for recorded updates, ``update_pairs.{parquet,csv}``); see
    :func:`hessrank.analysis.planning.plan`."""
    pilot = Path(pilot)
    results = pilot / "results.parquet"
    if not results.is_file():
        raise FileNotFoundError(f"no pilot in {pilot} (no results.parquet): run a pilot first, "
                                f"e.g. hessrank study SPEC --replicates 3 --out {pilot}")
    table = pd.read_parquet(results)
    updates = None
    if spec.update_ranks():
        found = [p for p in (pilot / "update_pairs.parquet", pilot / "update_pairs.csv")
                 if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{pilot} has no update_pairs.parquet or .csv for the "
                                    "alignment hypotheses of recorded updates")
        updates = (pd.read_parquet(found[0]) if found[0].suffix == ".parquet"
                   else pd.read_csv(found[0]))
    units = _all_units(table, spec, updates)
    rows, comps = [], []
    for name, frame in units.items():
        two_arms = bool((frame["arm"] == "b").any())
        for phase, rounds in inf.assign_phases(frame["round"].unique(), spec.phases(),
                                               spec.last_round).items():
            reps = inf.replicates_of(inf.phase_unit_means(frame, rounds), two_arms)
            if rounds and reps:
                delta = next(h.min_effect for h in spec.hypotheses if h.name == name)
                rows.append({"hypothesis": name, "phase": phase, "min_effect": delta})
                comps.append(planning.variance_components(reps))
    return planning.plan(rows, comps, alpha=spec.inference.alpha, power=spec.inference.power)


def _regressions(table: pd.DataFrame, spec: StudySpec, last_round: int) -> pd.DataFrame | None:
    """The rank regression (:func:`~hessrank.analysis.controls.rank_regression`) over all
    non-server rows, per phase and over all rounds (phase "all"); None if nothing fits."""
    sub = table[table["subject_kind"] != "server"]
    if not sub["label_entropy"].notna().any():
        return None
    by_phase = inf.assign_phases(sub["round"].unique(), spec.phases(), last_round)
    frames = []
    for name, rounds in [("all", None), *by_phase.items()]:
        if rounds is not None and not rounds:
            continue  # no analyzed round falls in this phase
        part = sub if rounds is None else sub[sub["round"].isin(rounds)]
        try:
            frames.append(rank_regression(part).assign(phase=name))
        except ValueError as err:  # too few rows in that phase
            warnings.warn(f"rank regression for phase {name!r} skipped: {err}", stacklevel=2)
    if not frames:
        return None
    out = pd.concat(frames, ignore_index=True)
    return out[["phase", *[c for c in out.columns if c != "phase"]]]


# ---- the driver -------------------------------------------------------------------------------
def _write_table(out: Path, name: str, table: pd.DataFrame) -> None:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(out / f"{name}.parquet", buf.getvalue())
    atomic_write_text(out / f"{name}.csv", table.to_csv(index=False))


def _check_resumable(out: Path, spec: StudySpec) -> None:
    """Refuse ``out`` when its replicates were trained with other training settings."""
    spec_file = out / "spec.json"
    if not spec_file.is_file():
        return
    try:
        before = json.loads(spec_file.read_text())
        old = parse_spec(before, where=str(spec_file)).training_settings()
    except (ValueError, json.JSONDecodeError):
        old = {"train": before.get("train") if isinstance(before, dict) else None,
               "seed": (before.get("study") or {}).get("seed", 0)
               if isinstance(before, dict) else None}
    new = spec.training_settings()
    if old != new:
        a, b = old.get("train") or {}, new["train"]
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        if old.get("seed") != new["seed"]:
            diff.append(f"study seed: {old.get('seed')!r} -> {new['seed']!r}")
        raise ValueError(f"{out} holds replicates trained with other settings "
                         f"({', '.join(diff[:6])}); choose another --out or delete that "
                         "directory")


def _open_study_dir(out: Path, spec: StudySpec) -> Path:
    """Refuse ``out`` if trained with other settings (:func:`_check_resumable`), else create
    it and record the spec as run."""
    _check_resumable(out, spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "spec.json", json.dumps(spec.raw, indent=2, sort_keys=True))
    return out


def _warn_few(R: int) -> None:
    if R == 1:
        warnings.warn("1 replicate: the tests use the units of that one run (sampling_unit "
                      "'unit'), so the verdicts speak for this run, not for the training "
                      "recipe", stacklevel=3)
    elif R < 3:
        warnings.warn(f"{R} replicates: the t-test has {R - 1} degree(s) of freedom; the "
                      "intervals are wide and most verdicts will be inconclusive",
                      stacklevel=3)


def _replicate(spec: StudySpec, out: Path, i: int, progress: bool) -> dict[str, Any]:
    """Train (or resume) replicate ``i`` and compute its analysis, controls, diagnostics
    and update pairs; every part reuses what ``out/replicate_{i}`` already holds."""
    rep = out / f"replicate_{i}"
    analyze_kwargs = spec.analyze_kwargs()
    t0 = time.perf_counter()
    config = {**copy.deepcopy(spec.train), "seed": spec.seed + i}
    run = train(config, rep / "run", progress=progress)
    t1 = time.perf_counter()
    seed = analysis_seed(spec.seed, i)
    table = analyze(run.path, seed=seed, out=rep / "analysis", progress=progress,
                    **analyze_kwargs)
    if table.attrs.get("errors"):
        raise RuntimeError(f"replicate {i}: {len(table.attrs['errors'])} analysis unit(s) "
                           f"failed; see {rep / 'analysis' / 'errors.csv'}")
    table = table.assign(replicate=i, train_seed=spec.seed + i)
    table["label_entropy"] = subject_label_entropy(
        table, RunDir(run.path).client_data()).to_numpy()
    t2 = time.perf_counter()
    ctrl = diag = pt = None
    if spec.controls is not None:
        rounds = sorted(table["round"].unique())
        ctrl = analyze_controls(run.path, rounds=rounds,
                                matvecs=int(analyze_kwargs.get("matvecs", 40)), seed=seed,
                                out=rep / "controls", **spec.controls_kwargs())
        ctrl = ctrl.assign(replicate=i, train_seed=spec.seed + i)
    t3 = time.perf_counter()
    if spec.diagnostics is not None:
        conf = spec.diagnostics_kwargs()
        rounds = conf.pop("rounds", None) or sorted(int(r) for r in table["round"].unique())
        diag = _diagnostics_replicate(run.path, rep, seed, rounds, conf, progress)
        diag = diag.assign(replicate=i, train_seed=spec.seed + i)
    t4 = time.perf_counter()
    update_ranks = spec.update_ranks()
    if update_ranks:
        pair_file = rep / "update_pairs.csv"
        if pair_file.is_file():
            pt = pd.read_csv(pair_file)
        else:
            pt = update_pairs(run.path, update_ranks)
            atomic_write_text(pair_file, pt.to_csv(index=False))
        pt = pt.assign(replicate=i)
    return {"table": table, "controls": ctrl, "diagnostics": diag, "pairs": pt,
            "timing": {"replicate": i, "train_s": t1 - t0, "analyze_s": t2 - t1,
                       "controls_s": t3 - t2, "diagnostics_s": t4 - t3,
                       "updates_s": time.perf_counter() - t4}}


def _record_run(out: Path, spec: StudySpec, R: int, run: dict[str, Any]) -> None:
    """Append one invocation to ``out/study.json`` (under a lock: ``--only`` processes may
    share ``out``)."""
    with FileLock(str(out / ".study.lock")):
        history = []
        if (out / "study.json").is_file():
            history = json.loads((out / "study.json").read_text()).get("runs", [])
        history.append(run)
        atomic_write_text(out / "study.json", json.dumps({
            "name": spec.name, "replicates": R, "seeds": {
                "train": [spec.seed + i for i in range(R)],
                "analysis": [analysis_seed(spec.seed, i) for i in range(R)]},
            "runs": history,
        }, indent=2))


def compute_replicates(spec: StudySpec | str | Path, out: str | Path, only: Sequence[int], *,
                       replicates: int | None = None, progress: bool = True,
                       command: str | None = None) -> list[dict[str, float]]:
    """Train and analyze only the replicates ``only`` of a study, without the tests.

    The parts of a study are independent per replicate (own directory, own seeds, own
    locks), so processes or machines that share ``out`` can each compute some replicates;
    a later :func:`run_study` on the same ``out`` reuses them all and runs the tests. The
    numbers are those :func:`run_study` alone would compute (same seeds, same calls).

    Returns:
        One timing row per computed replicate (seconds per part), also recorded in
        ``out/study.json``.
    Raises:
        ValueError: a bad spec, an index outside ``0 .. R-1``, or ``out`` trained with other
        settings.
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    R = int(replicates if replicates is not None else spec.replicates)
    bad = sorted({int(i) for i in only if not 0 <= int(i) < R})
    if bad or not only:
        raise ValueError(f"--only takes replicate indices in 0..{R - 1}, got "
                         f"{', '.join(map(str, bad)) or 'none'}")
    out = _open_study_dir(Path(out), spec)
    t_start = time.perf_counter()
    timing = [_replicate(spec, out, int(i), progress)["timing"]
              for i in sorted({int(i) for i in only})]
    _record_run(out, spec, R, {"command": command or " ".join(sys.argv), "replicates": R,
                               "only": [t["replicate"] for t in timing],
                               "python": platform.python_version(),
                               "seconds": time.perf_counter() - t_start, "timing": timing,
                               "spec": spec.raw})
    return timing


def run_study(spec: StudySpec | str | Path, out: str | Path, *, replicates: int | None = None,
              progress: bool = True, command: str | None = None) -> pd.DataFrame:
    """Train, analyze and test every replicate of a study; returns the hypotheses table.

    Args:
        spec: a :class:`~hessrank.analysis.spec.StudySpec` or the path of its TOML file.
        out: the study directory (module doc); rerunning resumes.
        replicates: overrides ``study.replicates``.
        progress: tqdm bars of training and analysis.
        command: the command line recorded in ``study.json``.
    Returns:
        The hypotheses table (also ``out/hypotheses.csv``); ``attrs["table"]`` is the tidy
        table of all replicates, ``attrs["regression"]`` the rank regression (with controls),
        ``attrs["profile"]`` the per-round profile.
    Raises:
        ValueError: bad spec, or ``out`` holds replicates trained with other settings.
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    R = int(replicates if replicates is not None else spec.replicates)
    if R < 1:
        raise ValueError(f"--replicates must be >= 1, got {R}")
    out = _open_study_dir(Path(out), spec)
    _warn_few(R)
    t_start = time.perf_counter()
    frames, controls, diagnostics, pairs, timing = [], [], [], [], []
    last_round = spec.last_round
    for i in range(R):
        parts = _replicate(spec, out, i, progress)
        frames.append(parts["table"])
        for name, bucket in (("controls", controls), ("diagnostics", diagnostics),
                             ("pairs", pairs)):
            if parts[name] is not None:
                bucket.append(parts[name])
        timing.append(parts["timing"])
    table = pd.concat(frames + controls, ignore_index=True)
    _write_table(out, "results", table)
    if diagnostics:
        diag = pd.concat(diagnostics, ignore_index=True)
        atomic_write_text(out / "diagnostics.csv", diag.to_csv(index=False))
        sizes = sorted(set(diag.loc[diag["subject_kind"] == "subset", "subject_size"]))
        if len(sizes) >= 2:  # smallest − largest subset size of each diagnostic
            tests = reversal_tests(diag, phases=spec.phases(), last_round=last_round,
                                   small=int(sizes[0]), large=int(sizes[-1]),
                                   alpha=spec.inference.alpha, adjust=spec.inference.adjust,
                                   seed=_test_kwargs(spec, last_round)["seed"])
            atomic_write_text(out / "diagnostics_tests.csv", tests.to_csv(index=False))
    updates = pd.concat(pairs, ignore_index=True) if pairs else None
    if updates is not None:
        atomic_write_text(out / "update_pairs.csv", updates.to_csv(index=False))
    hyp = infer(table, spec, last_round, updates)
    atomic_write_text(out / "hypotheses.csv", hyp.to_csv(index=False))
    atomic_write_text(out / "README.md", hypotheses_readme(hyp, spec))
    atomic_write_text(out / "profile.csv", hyp.attrs["profile"].to_csv(index=False))
    atomic_write_text(out / "plan.csv", plan_study(spec, out).to_csv(index=False))
    regression = _regressions(table, spec, last_round)
    if regression is not None:
        atomic_write_text(out / "regression.csv", regression.to_csv(index=False))
    _record_run(out, spec, R, {"command": command or " ".join(sys.argv), "replicates": R,
                               "python": platform.python_version(),
                               "seconds": time.perf_counter() - t_start, "timing": timing,
                               "spec": spec.raw})
    hyp.attrs["table"] = table
    hyp.attrs["regression"] = regression
    return hyp


def format_verdicts(hyp: pd.DataFrame) -> str:
    """The hypotheses table as aligned text (for the CLI)."""
    cols = ["hypothesis", "phase", "round_lo", "round_hi", "estimate", "ci_low_adjusted",
            "ci_high_adjusted", "p_adjusted", "n_replicates", "min_effect", "verdict",
            "grid_check", "sign_change"]
    with pd.option_context("display.width", 200, "display.precision", 4,
                           "display.max_columns", None):
        return hyp[cols].to_string(index=False)


def format_plan(plan: pd.DataFrame) -> str:
    """A plan (:func:`plan_study`) as text: per row, the pilot's variance components and the
    replicates needed at 1×, 2×, 4× and unlimited units per replicate."""
    wide = plan.pivot_table(index=["hypothesis", "phase"], columns="units_factor",
                            values="replicates_needed", sort=False)
    wide.columns = [("R at ∞ units" if np.isinf(f) else f"R at {f:g}× units")
                    for f in wide.columns]
    first = plan.drop_duplicates(["hypothesis", "phase"]).set_index(["hypothesis", "phase"])
    show = first[["min_effect", "n_replicates", "units_a", "between", "icc",
                  "power_now"]].join(wide)
    with pd.option_context("display.width", 200, "display.precision", 3,
                           "display.max_columns", None):
        return show.to_string()
