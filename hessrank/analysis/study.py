"""Studies: R replicates of train → analyze → one tidy table → ``hypotheses.csv`` (§6).

A study spec is a TOML file (``experiments/configs/*.toml``)::

    [study]
    name = "centralized_digits"
    replicates = 3            # default; ``--replicates`` overrides
    seed = 0                  # replicate i trains with seed + i (init, split, partition, batches)

    [train]                   # TrainConfig fields (hessrank.fl.config.TrainConfig)
    algo = "fedavg"
    ...

    [analyze]                 # keywords of hessrank.analysis.trajectory.analyze
    rounds = [0, 50, 100]
    subjects = "server,subset:50x60,subset:500x20"
    matvecs = 40

    [controls]                # optional: hessrank.analysis.controls.analyze_controls
    matched_draws = 5
    nested_sizes = [25, 50, 100]

    [diagnostics]             # optional: hessrank.analysis.diagnostics.run_diagnostics
    subjects = "server,subset:50x5,subset:500x5"   # at every analyzed round (or rounds = [...])
    matvecs = 40
    density_probes = 8

    [inference]
    alpha = 0.05
    adjust = "holm"           # or "bh"
    resamples = 4000
    phases = [{name = "early", lo = 0.0, hi = 0.34}, ...]   # fractions of the last round;
                                                            # absolute = true: rounds
    [[hypotheses]]
    name = "n50_minus_n500"
    kind = "subset-size"      # or "client-server", "alignment", "matched-size", ...
                              # alignment: rank = r; with [train] record_updates = true it
                              # tests the recorded client updates (unit = client), else the
                              # gradient alignment rows of ``analyze`` (unit = layer)
    small = 50
    large = 500               # or "server"
    transform = "log"         # difference of log stable ranks (a ratio)
    min_effect = 0.05         # stated up front, in the units of the transformed difference

Seeds. Replicate i trains with ``study.seed + i`` and analyzes with
:func:`analysis_seed` (a SeedSequence of (study seed, i)), so subset draws and estimator probes
are independent across replicates. Within one replicate ``analyze`` uses that one seed for
every round and subject (its subsets are the same indices at every round — paired by design;
its probe vectors are drawn from the same seed at every round).

Layout of ``out``: ``spec.toml`` (the spec as run), ``replicate_{i}/run`` (training),
``replicate_{i}/analysis`` (``analyze``'s resumable store), ``replicate_{i}/controls``,
``results.{parquet,csv}`` (all replicates, with a ``replicate`` column), ``hypotheses.csv``,
``regression.csv`` (with controls), ``diagnostics.csv`` (with [diagnostics]; per replicate in
``replicate_{i}/diagnostics.csv``) and, with two or more subset sizes among its subjects,
``diagnostics_tests.csv`` (smallest − largest size of each diagnostic per phase,
:func:`hessrank.analysis.diagnostics.reversal_tests`), ``update_pairs.csv`` (alignment of
recorded updates; per replicate in ``replicate_{i}/update_pairs.csv``) and ``study.json``
(provenance). Rerunning resumes; an ``out`` holding a different spec is refused.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hessrank.analysis import inference as inf
from hessrank.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "HYPOTHESIS_KINDS",
    "StudySpec",
    "analysis_seed",
    "build_units",
    "load_spec",
    "phases_of",
    "run_study",
    "update_pairs",
]

HYPOTHESIS_KINDS = ("client-server", "subset-size", "nested", "alignment", "matched-size",
                    "matched-label")
"""``kind`` values of a hypothesis in a spec (see :func:`build_units`)."""


@dataclass(frozen=True)
class StudySpec:
    """A parsed study spec (module doc). ``raw`` is the TOML as a dict (written as run)."""

    name: str
    replicates: int
    seed: int
    train: dict[str, Any]
    analyze: dict[str, Any]
    controls: dict[str, Any]
    inference: dict[str, Any]
    hypotheses: list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, compare=False)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def update_ranks(self) -> list[int]:
        """Ranks of the ``alignment`` hypotheses that test recorded client updates."""
        return sorted({int(h["rank"]) for h in self.hypotheses if _from_updates(self.train, h)})


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a study spec; ValueError names the bad key and the way out."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError("study specs are TOML, read with tomllib: use Python >= 3.11") from None

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study spec at {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML ({err})") from None
    return parse_spec(raw, where=str(path))


def parse_spec(raw: dict[str, Any], where: str = "spec") -> StudySpec:
    known = {"study", "train", "analyze", "controls", "diagnostics", "inference", "hypotheses"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown sections {unknown}; valid: {sorted(known)}")
    study = dict(raw.get("study", {}))
    if "train" not in raw:
        raise ValueError(f"{where}: a [train] section (TrainConfig fields) is required")
    from hessrank.fl.config import TrainConfig

    TrainConfig.from_dict(copy.deepcopy(raw["train"]))  # fail fast on a bad config
    hyps = list(raw.get("hypotheses", []))
    if not hyps:
        raise ValueError(f"{where}: no [[hypotheses]]; state at least one with its min_effect")
    for h in hyps:
        if "name" not in h or "kind" not in h:
            raise ValueError(f"{where}: every [[hypotheses]] needs name and kind, got {h}")
        if h["kind"] not in HYPOTHESIS_KINDS:
            raise ValueError(f"{where}: hypothesis {h['name']!r} has unknown kind "
                             f"{h['kind']!r}; valid: {', '.join(HYPOTHESIS_KINDS)}")
        if not float(h.get("min_effect", 0)) > 0:
            raise ValueError(f"{where}: hypothesis {h['name']!r} needs min_effect > 0, stated "
                             "up front")
        if h["kind"] == "alignment" and "rank" not in h:
            raise ValueError(f"{where}: alignment hypothesis {h['name']!r} needs rank = r "
                             "(A_r − A_full)")
        if h.get("source", "gradients") not in ("gradients", "updates"):
            raise ValueError(f"{where}: hypothesis {h['name']!r} has source "
                             f"{h['source']!r}; valid: gradients, updates")
        if h.get("source") == "updates" and not raw["train"].get("record_updates"):
            raise ValueError(f"{where}: hypothesis {h['name']!r} tests recorded updates: set "
                             "record_updates = true in [train]")
    diag = dict(raw.get("diagnostics", {}))
    from hessrank.analysis.diagnostics import DIAGNOSTIC_KEYS

    bad = sorted(set(diag) - set(DIAGNOSTIC_KEYS))
    if bad:
        raise ValueError(f"{where}: unknown [diagnostics] keys {bad}; valid: "
                         f"{list(DIAGNOSTIC_KEYS)}")
    names = [h["name"] for h in hyps]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: hypothesis names must be unique, got {names}")
    replicates = int(study.get("replicates", 1))
    if replicates < 1:
        raise ValueError(f"{where}: replicates must be >= 1, got {replicates}")
    return StudySpec(
        name=str(study.get("name", "study")), replicates=replicates,
        seed=int(study.get("seed", 0)), train=dict(raw["train"]),
        analyze=dict(raw.get("analyze", {})), controls=dict(raw.get("controls", {})),
        inference=dict(raw.get("inference", {})), hypotheses=hyps, raw=raw, diagnostics=diag,
    )


def _from_updates(train: dict[str, Any], hypothesis: dict[str, Any]) -> bool:
    """An alignment hypothesis tests recorded updates when its source says so, or by default
    when [train] records them."""
    if hypothesis["kind"] != "alignment":
        return False
    default = "updates" if train.get("record_updates") else "gradients"
    return hypothesis.get("source", default) == "updates"


def analysis_seed(study_seed: int, replicate: int) -> int:
    """The analysis seed of a replicate: a 31-bit word of SeedSequence((study_seed, replicate,
    1)), independent across replicates (the 1 separates it from other streams)."""
    state = np.random.SeedSequence([int(study_seed), int(replicate), 1]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


# ---- the calls into training and analysis (the one place to adapt when their APIs change) ----
def _train_replicate(config: dict[str, Any], out: Path, progress: bool):
    from hessrank.fl.runner import train

    return train(config, out, progress=progress)


def _analyze_replicate(run_path: Path, out: Path, seed: int, kwargs: dict[str, Any],
                       progress: bool) -> pd.DataFrame:
    from hessrank.analysis.trajectory import analyze

    return analyze(run_path, seed=seed, out=out, progress=progress, **kwargs)


def _controls_replicate(run_path: Path, out: Path, seed: int, rounds, matvecs: int,
                        kwargs: dict[str, Any]) -> pd.DataFrame:
    from hessrank.analysis.controls import analyze_controls

    return analyze_controls(run_path, rounds=rounds, matvecs=matvecs, seed=seed, out=out,
                            **kwargs)


def update_pairs(run_path: Path, ranks: Sequence[int]) -> pd.DataFrame:
    """D_r per (round, layer, client pair) of every recorded round of a run."""
    from hessrank.analysis.update_alignment import load_client_updates, pair_differences

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
    from hessrank.analysis.diagnostics import run_diagnostics

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


def _entropy(table: pd.DataFrame, run_path: Path) -> pd.Series:
    from hessrank.analysis.controls import subject_label_entropy
    from hessrank.fl.rundir import RunDir

    return subject_label_entropy(table, RunDir(run_path).client_data())


# ---- inference glue -------------------------------------------------------------------------
def _matched_units(table: pd.DataFrame, kind: str, transform: str) -> pd.DataFrame:
    """client − mean of its matched control draws, paired by (replicate, round, client)."""
    t = table[table["quantity"] == "stable-rank"]
    t = t.assign(value=inf.transform_values(t["value"].astype(float), transform))
    ctrl = t[t["subject_kind"] == kind]
    if ctrl.empty:
        raise ValueError(f"hypothesis kind {kind!r} needs [controls] matched_draws > 0")
    m = ctrl.groupby(["replicate", "round", "client"])["value"].mean()
    cl = t[t["subject_kind"] == "client"].copy()
    cl["client"] = cl["subject"].str.removeprefix("client").astype(int)
    ref = m.reindex(pd.MultiIndex.from_frame(cl[["replicate", "round", "client"]])).to_numpy()
    out = pd.DataFrame({"replicate": cl["replicate"].to_numpy(), "round": cl["round"].to_numpy(),
                        "arm": "a", "unit": cl["subject"].to_numpy(),
                        "value": cl["value"].to_numpy() - ref})
    return out.dropna(subset=["value"])


def build_units(table: pd.DataFrame, hypothesis: dict[str, Any],
                updates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Units frame of one spec hypothesis from the study table.

    kinds: client-server (client − server, paired per client); subset-size (draws of size
    ``small`` − draws of size ``large`` or the server); nested (the same between nested sizes,
    units = nested chains); alignment (A_rank − A_full: of recorded updates from ``updates``,
    the pair table of :func:`~hessrank.analysis.update_alignment.pair_differences` with
    replicate and round, unit = client, see
    :func:`~hessrank.analysis.inference.update_alignment_units`; or of gradients per layer
    from the analysis rows when ``updates`` is None); matched-size /
    matched-label (client − the mean of its size-/label-matched random subsets: > 0 means the
    client's excess is not explained by its sample size / its label histogram alone).
    """
    kind, tr = hypothesis["kind"], hypothesis.get("transform", "identity")
    q = hypothesis.get("quantity", "stable-rank")
    if kind == "client-server":
        return inf.client_server_units(table, q, tr)
    if kind in ("subset-size", "nested"):
        return inf.subset_size_units(table, int(hypothesis["small"]), hypothesis["large"]
                                     if hypothesis["large"] == "server"
                                     else int(hypothesis["large"]), q, tr,
                                     kind="subset" if kind == "subset-size" else "nested")
    if kind == "alignment" and updates is not None:
        return inf.update_alignment_units(updates, int(hypothesis["rank"]),
                                          hypothesis.get("layers"))
    if kind == "alignment":
        return inf.alignment_units(table, int(hypothesis["rank"]), q)
    return _matched_units(table, kind, tr)


def phases_of(spec: StudySpec) -> list[inf.Phase]:
    """The spec's ``[inference] phases`` (default: thirds of the rounds)."""
    ph = spec.inference.get("phases")
    if ph is None:
        return inf.default_phases()
    return [inf.Phase(str(p["name"]), float(p["lo"]), float(p["hi"]),
                      bool(p.get("absolute", False))) for p in ph]


def infer(table: pd.DataFrame, spec: StudySpec, last_round: int,
          updates: pd.DataFrame | None = None) -> pd.DataFrame:
    """``hypotheses.csv`` of a study table (every hypothesis × phase, one multiplicity family).

    Grid check: the same tests on the even-indexed and on the odd-indexed analyzed rounds
    alone (each its own family) give ``verdict_even_grid`` / ``verdict_odd_grid``
    ("" where that grid has no round in the phase); ``settled`` is True when every grid
    that covers the phase agrees with ``verdict``. A verdict that flips under a coarser
    checkpoint grid is not settled. The grids are taken over each hypothesis's own rounds
    (recorded updates exist at other rounds than the analyzed checkpoints).

    ``updates``: the pair table of the recorded updates (all replicates), needed by the
    alignment hypotheses of updates (:meth:`StudySpec.update_ranks`).
    """
    units = {}
    for h in spec.hypotheses:
        if _from_updates(spec.train, h) and updates is None:
            raise ValueError(f"hypothesis {h['name']!r} tests recorded updates; pass their "
                             "pair table")
        units[h["name"]] = build_units(table, h, updates if _from_updates(spec.train, h)
                                       else None)
    conf = spec.inference
    kwargs = dict(
        min_effect={h["name"]: float(h["min_effect"]) for h in spec.hypotheses},
        phases=phases_of(spec), last_round=last_round, alpha=float(conf.get("alpha", 0.05)),
        adjust=str(conf.get("adjust", "holm")), num_resamples=int(conf.get("resamples", 4000)),
        seed=int(conf.get("seed", spec.seed)),
        transform={h["name"]: h.get("transform", "identity") for h in spec.hypotheses},
    )
    hyp = inf.test_hypotheses(units, **kwargs)
    key = ["hypothesis", "phase"]
    agree = pd.Series(True, index=hyp.index)
    for label, start in (("even", 0), ("odd", 1)):
        sub = {k: u[u["round"].isin(sorted(u["round"].unique())[start::2])]
               for k, u in units.items()}
        sub = {k: u for k, u in sub.items() if len(u)}
        alt = inf.test_hypotheses(sub, **kwargs) if sub else pd.DataFrame(
            columns=inf.HYPOTHESES_COLUMNS)
        got = hyp[key].merge(alt[[*key, "verdict"]], on=key, how="left")["verdict"]
        got = got.fillna("").to_numpy()
        hyp[f"verdict_{label}_grid"] = got
        agree &= (got == "") | (got == hyp["verdict"].to_numpy())
    hyp["settled"] = agree.to_numpy()
    return hyp


def _regressions(table: pd.DataFrame, spec: StudySpec, last_round: int) -> pd.DataFrame | None:
    """The rank regression (:func:`~hessrank.analysis.controls.rank_regression`) over all
    non-server rows, per phase and over all rounds (phase "all"); None if nothing fits."""
    from hessrank.analysis.controls import rank_regression

    sub = table[table["subject_kind"] != "server"]
    if not sub["label_entropy"].notna().any():
        return None
    by_phase = inf.assign_phases(sub["round"].unique(), phases_of(spec), last_round)
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


def run_study(spec: StudySpec | str | Path, out: str | Path, *, replicates: int | None = None,
              progress: bool = True, command: str | None = None) -> pd.DataFrame:
    """Train, analyze and test every replicate of a study; returns the hypotheses table.

    Args:
        spec: a :class:`StudySpec` or the path of its TOML file.
        out: the study directory (module doc); rerunning resumes.
        replicates: overrides ``study.replicates``.
        progress: tqdm bars of training and analysis.
        command: the command line recorded in ``study.json``.
    Returns:
        The hypotheses table (also ``out/hypotheses.csv``); ``attrs["table"]`` is the tidy
        table of all replicates, ``attrs["regression"]`` the rank regression (with controls).
    Raises:
        ValueError: bad spec, or ``out`` holds a study of a different spec.
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    R = int(replicates if replicates is not None else spec.replicates)
    if R < 1:
        raise ValueError(f"--replicates must be >= 1, got {R}")
    out = Path(out)
    spec_file = out / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != json.loads(
            json.dumps(spec.raw)):
        raise ValueError(f"{out} holds a study of a different spec; choose another --out or "
                         "delete that directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_file, json.dumps(spec.raw, indent=2, sort_keys=True))
    if R < 5:
        warnings.warn(f"{R} replicate(s): the replicate stage of the bootstrap has few "
                      "clusters; verdicts speak for these runs, not for the training recipe",
                      stacklevel=2)
    t_start = time.perf_counter()
    frames, controls, diagnostics, pairs, timing = [], [], [], [], []
    update_ranks = spec.update_ranks()
    analyze_kwargs = dict(spec.analyze)
    analyze_kwargs.setdefault("quantities", "stable-rank")
    last_round = int(spec.train.get("rounds", 50))
    for i in range(R):
        rep = out / f"replicate_{i}"
        t0 = time.perf_counter()
        config = {**copy.deepcopy(spec.train), "seed": spec.seed + i}
        run = _train_replicate(config, rep / "run", progress)
        t1 = time.perf_counter()
        seed = analysis_seed(spec.seed, i)
        table = _analyze_replicate(run.path, rep / "analysis", seed, analyze_kwargs, progress)
        if table.attrs.get("errors"):
            raise RuntimeError(f"replicate {i}: {len(table.attrs['errors'])} analysis unit(s) "
                               f"failed; see {rep / 'analysis' / 'errors.csv'}")
        table = table.assign(replicate=i, train_seed=spec.seed + i)
        table["label_entropy"] = _entropy(table, run.path).to_numpy()
        frames.append(table)
        t2 = time.perf_counter()
        if spec.controls:
            rounds = sorted(table["round"].unique())
            ctrl = _controls_replicate(run.path, rep / "controls", seed, rounds,
                                       int(analyze_kwargs.get("matvecs", 40)), spec.controls)
            controls.append(ctrl.assign(replicate=i, train_seed=spec.seed + i))
        t3 = time.perf_counter()
        if spec.diagnostics:
            conf = dict(spec.diagnostics)
            rounds = conf.pop("rounds", sorted(int(r) for r in table["round"].unique()))
            diag = _diagnostics_replicate(run.path, rep, seed, rounds, conf, progress)
            diagnostics.append(diag.assign(replicate=i, train_seed=spec.seed + i))
        t4 = time.perf_counter()
        if update_ranks:
            pair_file = rep / "update_pairs.csv"
            if pair_file.is_file():
                pt = pd.read_csv(pair_file)
            else:
                pt = update_pairs(run.path, update_ranks)
                atomic_write_text(pair_file, pt.to_csv(index=False))
            pairs.append(pt.assign(replicate=i))
        timing.append({"replicate": i, "train_s": t1 - t0, "analyze_s": t2 - t1,
                       "controls_s": t3 - t2, "diagnostics_s": t4 - t3,
                       "updates_s": time.perf_counter() - t4})
    table = pd.concat(frames + controls, ignore_index=True)
    _write_table(out, "results", table)
    if diagnostics:
        diag = pd.concat(diagnostics, ignore_index=True)
        atomic_write_text(out / "diagnostics.csv", diag.to_csv(index=False))
        sizes = sorted(set(diag.loc[diag["subject_kind"] == "subset", "subject_size"]))
        if len(sizes) >= 2:  # smallest − largest subset size of each diagnostic
            from hessrank.analysis.diagnostics import reversal_tests

            tests = reversal_tests(diag, phases=phases_of(spec), last_round=last_round,
                                   small=int(sizes[0]), large=int(sizes[-1]),
                                   seed=int(spec.inference.get("seed", spec.seed)))
            atomic_write_text(out / "diagnostics_tests.csv", tests.to_csv(index=False))
    updates = pd.concat(pairs, ignore_index=True) if pairs else None
    if updates is not None:
        atomic_write_text(out / "update_pairs.csv", updates.to_csv(index=False))
    hyp = infer(table, spec, last_round, updates)
    atomic_write_text(out / "hypotheses.csv", hyp.to_csv(index=False))
    regression = _regressions(table, spec, last_round)
    if regression is not None:
        atomic_write_text(out / "regression.csv", regression.to_csv(index=False))
    history = []
    if (out / "study.json").is_file():
        history = json.loads((out / "study.json").read_text()).get("runs", [])
    history.append({"command": command or " ".join(sys.argv), "replicates": R,
                    "python": platform.python_version(),
                    "seconds": time.perf_counter() - t_start, "timing": timing})
    atomic_write_text(out / "study.json", json.dumps({
        "name": spec.name, "replicates": R, "seeds": {
            "train": [spec.seed + i for i in range(R)],
            "analysis": [analysis_seed(spec.seed, i) for i in range(R)]},
        "runs": history,
    }, indent=2))
    hyp.attrs["table"] = table
    hyp.attrs["regression"] = regression
    return hyp


def format_verdicts(hyp: pd.DataFrame) -> str:
    """The hypotheses table as aligned text (for the CLI)."""
    cols = ["hypothesis", "phase", "round_lo", "round_hi", "estimate", "ci_low", "ci_high",
            "p_adjusted", "n_replicates", "min_effect", "verdict", "settled"]
    with pd.option_context("display.width", 160, "display.precision", 4):
        return hyp[cols].to_string(index=False)
