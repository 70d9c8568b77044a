"""Study specs: the TOML format as a typed schema, checked whole before anything trains.

A spec (``experiments/configs/*.toml``) has these tables; every key is checked for its type
and range, an unknown key is refused with the closest valid one, and the hypotheses are
checked against the rest (the subjects, controls and recorded updates each one reads must be
asked for), so a bad spec fails with one line naming the file, the table and the key —
before the first replicate trains::

    [study]          name, replicates (≥ 1), seed (replicate i trains with seed + i)
    [train]          hessrank.fl.config.TrainConfig fields (hessrank train --help)
    [analyze]        hessrank.analysis.settings.AnalysisSettings fields (hessrank analyze
                     --help) but those the study sets itself (seed, progress, force, prune,
                     shard, lock_timeout, and the state_dict-folder keys)
    [controls]       optional: matched_draws, nested_sizes, nested_draws
    [diagnostics]    optional: subjects, rounds, matvecs, density_probes, density_steps,
                     outlier_kappa (hessrank.analysis.diagnostics.run_diagnostics)
    [inference]      alpha, adjust, method, resamples, seed, phases, power
    [[hypotheses]]   name, kind, min_effect, transform, quantity, and the kind's own keys
                     (:mod:`hessrank.analysis.hypotheses`)

:func:`json_schema` gives the JSON schema of the whole format (``hessrank study --schema``).

Example:
    >>> spec = parse_spec({"train": {"algo": "fedavg", "rounds": 2}, "analyze": {
    ...     "subjects": "server,clients"}, "hypotheses": [{"name": "cs", "kind":
    ...     "client-server", "min_effect": 0.05}]}, where="demo.toml")
    >>> spec.hypotheses[0].kind, spec.inference.method
    ('client-server', 't')
    >>> parse_spec({"train": {}, "hypotheses": [{"name": "h", "kind": "subset-size",
    ...     "small": "x", "large": 10, "min_effect": 0.1}]}, where="bad.toml")
    Traceback (most recent call last):
    ...
    ValueError: bad.toml: [[hypotheses]] #1 'small': Input should be a valid integer (got 'x')
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from hessrank.analysis.hypotheses import KINDS, Hypothesis, SpecContext, kinds_help
from hessrank.analysis.schema import Table, closest, one_line_error
from hessrank.analysis.settings import AnalysisSettings
from hessrank.data.catalog import DATASET_CATALOG
from hessrank.fl.config import TrainConfig

if TYPE_CHECKING:
    from hessrank.analysis.inference import Phase

# This module imports only pydantic and light modules at load time: `hessrank study --help`
# is generated from its models. What needs torch, numpy or pandas (subject and quantity
# parsing, phases) is imported inside the validators that use it.

__all__ = [
    "ANALYZE_RESERVED",
    "ControlsTable",
    "DiagnosticsTable",
    "InferenceTable",
    "PhaseTable",
    "StudySpec",
    "StudyTable",
    "format_help",
    "json_schema",
    "load_spec",
    "parse_spec",
]

ANALYZE_RESERVED = ("seed", "progress", "force", "prune", "shard", "lock_timeout",
                    "model_factory", "dataset", "clients", "data_root")
"""AnalysisSettings fields a spec's [analyze] may not set: the study sets them."""

_TARGETS = {"classification": "labels", "next-token": "tokens", "regression": "values"}
"""A dataset's task → what its samples' targets are (:class:`SpecContext` ``targets``)."""

def _methods() -> tuple[str, ...]:
    from hessrank.analysis.inference import METHODS  # keeps --help fast (pandas, scipy)

    return METHODS


class StudyTable(Table):
    name: str = Field("study", min_length=1, description="the study's name")
    replicates: int = Field(1, ge=1, description="independent training runs (--replicates "
                            "overrides)")
    seed: int = Field(0, ge=0, description="replicate i trains with seed + i; its analysis "
                      "seed is derived from (seed, i)")


class ControlsTable(Table):
    matched_draws: int = Field(0, ge=0, description="per client, random subsets of the "
                               "server's data of the client's size, and of its label histogram "
                               "(class labels) or its token histogram (next-token sequences)")
    nested_sizes: list[int] = Field(default_factory=list, description="sizes of nested "
                                    "subsets S_n1 ⊂ S_n2 ⊂ …")
    nested_draws: int = Field(1, ge=1, description="independent nested chains")

    @field_validator("nested_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"nested sizes must be >= 1, got {v}")
        return v


class DiagnosticsTable(Table):
    subjects: str = Field("server,subset:50x5,subset:500x5", description="server and "
                          "subset:NxD subjects")
    rounds: list[int] | None = Field(None, description="default: the analyzed rounds")
    matvecs: int = Field(40, ge=1, description="budget of each estimator call")
    density_probes: int = Field(8, ge=1, description="SLQ probes of the negative mass")
    density_steps: int | None = Field(None, ge=1, description="Lanczos steps per probe")
    outlier_kappa: float = Field(3.0, gt=0, description="bulk-edge threshold (module doc of "
                                 "hessrank.analysis.diagnostics)")

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: str) -> str:
        from hessrank.analysis.subjects import parse_subjects  # keeps --help fast (torch)

        kinds = {s.kind for s in parse_subjects(v)}
        if kinds - {"server", "subset"}:
            raise ValueError(f"diagnostics subjects are server and subset:NxD, got {v!r}")
        return v


class PhaseTable(Table):
    name: str = Field(min_length=1)
    lo: float = Field(description="first round (absolute) or fraction of the last round")
    hi: float = Field(description="last round (absolute, inclusive) or fraction (exclusive, "
                      "1 includes the last round)")
    absolute: bool = Field(False, description="lo and hi are rounds, not fractions")

    @model_validator(mode="after")
    def _ordered(self) -> PhaseTable:
        if self.lo > self.hi:
            raise ValueError(f"phase {self.name!r} has lo {self.lo:g} > hi {self.hi:g}")
        if not self.absolute and not (0 <= self.lo and self.hi <= 1):
            raise ValueError(f"phase {self.name!r}: fractions lo, hi must lie in [0, 1] (or "
                             "set absolute = true for rounds)")
        return self


class InferenceTable(Table):
    alpha: float = Field(0.05, gt=0, lt=0.5, description="family-wise level (holm) or false "
                         "discovery rate (bh)")
    adjust: Literal["holm", "bh"] = Field("holm", description="multiplicity adjustment over "
                                          "all hypotheses × phases")
    method: str = Field("t", description="the test: t (t-test on replicate statistics with "
                        "R − 1 degrees of freedom, the measured default), bootstrap-t, "
                        "percentile (two-stage cluster bootstrap), mixedlm",
                        json_schema_extra=lambda schema: schema.update(enum=list(_methods())))
    resamples: int = Field(4000, ge=100, description="resamples of the bootstrap methods")
    seed: int | None = Field(None, ge=0, description="seed of the bootstrap methods "
                             "(default: [study] seed)")
    phases: list[PhaseTable] | None = Field(None, description="[{name, lo, hi, absolute}, "
                                            "...]: fractions of the last round [lo, hi), or "
                                            "rounds lo..hi with absolute = true; default: "
                                            "thirds (early, middle, late)")
    power: float = Field(0.8, gt=0, lt=1, description="power of the planning columns")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in _methods():
            raise ValueError(f"unknown method {v!r}{closest(v, _methods())}; valid: "
                             f"{', '.join(_methods())}")
        return v

    @field_validator("phases")
    @classmethod
    def _unique(cls, v: list[PhaseTable] | None) -> list[PhaseTable] | None:
        names = [p.name for p in v or []]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return v


class StudySpec(Table):
    """A validated study spec (module doc). ``raw``: the TOML as read (written as run)."""

    study: StudyTable = Field(default_factory=StudyTable)
    train: dict[str, Any] = Field(description="TrainConfig fields (hessrank train --help)")
    analyze: dict[str, Any] = Field(default_factory=dict, description="AnalysisSettings "
                                    "fields (hessrank analyze --help) but "
                                    + ", ".join(ANALYZE_RESERVED))
    controls: ControlsTable | None = None
    diagnostics: DiagnosticsTable | None = None
    inference: InferenceTable = Field(default_factory=InferenceTable)
    hypotheses: list[Hypothesis] = Field(min_length=1, description="at least one, each with "
                                         "its min_effect")
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _where: str = PrivateAttr(default="spec")

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        valid = [f.name for f in dataclasses.fields(TrainConfig)]
        for key in v:
            if key not in valid:
                raise ValueError(f"unknown key {key!r}{closest(key, valid)}; see hessrank "
                                 "train --help for the keys")
        TrainConfig.from_dict(copy.deepcopy(v))  # its ValueError names the key
        return v

    @field_validator("analyze")
    @classmethod
    def _analyze(cls, v: dict[str, Any]) -> dict[str, Any]:
        valid = [f for f in AnalysisSettings.__dataclass_fields__ if f not in ANALYZE_RESERVED]
        for key in v:
            if key in ANALYZE_RESERVED:
                raise ValueError(f"key {key!r} is set by the study itself; leave it out")
            if key not in valid:
                raise ValueError(f"unknown key {key!r}{closest(key, valid)}; valid keys: "
                                 f"{', '.join(valid)}")
        for key in ("subjects", "quantities", "params"):
            value = v.get(key)
            if value is not None and not (isinstance(value, str) or (
                    isinstance(value, list) and all(isinstance(x, str) for x in value))):
                raise ValueError(f"{key!r} must be a comma-separated string or a list of "
                                 f"strings, got {value!r}")
        rounds = v.get("rounds")
        if rounds is not None and not (isinstance(rounds, str) or (isinstance(rounds, list) and all(
                isinstance(r, int) and not isinstance(r, bool) for r in rounds))):
            raise ValueError(f"'rounds' must be a list of rounds or \"start:stop:step\", got "
                             f"{rounds!r}")
        from hessrank.analysis.quantities import parse_quantities  # keeps --help fast (torch)
        from hessrank.analysis.subjects import parse_subjects  # keeps --help fast (torch)

        try:
            settings = analysis_settings(v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"[analyze] holds a value of the wrong type: {err}") from None
        # their parsers name the value, not the key
        for key, parse in (("subjects", parse_subjects), ("quantities", parse_quantities)):
            try:
                parse(getattr(settings, key) or ())
            except ValueError as err:
                raise ValueError(f"{key!r}: {err}") from None
        try:
            settings.validate()
        except (TypeError, ValueError) as err:
            # the settings name command-line flags; a spec names keys
            raise ValueError(re.sub(r"--([a-z-]+)", lambda m: repr(m[1].replace("-", "_")),
                                    str(err))) from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        names = [h.name for h in self.hypotheses]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"[[hypotheses]]: names must be unique; repeated: {dup}")
        ctx = self.context()
        for i, h in enumerate(self.hypotheses):
            problem = KINDS[h.kind].check(h, ctx)
            if problem:
                raise ValueError(f"[[hypotheses]] #{i + 1} {h.name!r} ({h.kind}): {problem}")
        self._check_rounds()
        return self

    def _check_rounds(self) -> None:
        """Explicit [analyze] / [diagnostics] rounds must be trained and saved, and every
        phase must hold one of them."""
        config = self.train_config()
        rounds, every = config.rounds, config.save_every
        saved = set(range(0, rounds + 1, every)) | {rounds}
        chosen = self.analyze.get("rounds")
        if isinstance(chosen, str):
            from hessrank.analysis.sources import select_rounds  # keeps --help fast (torch)

            try:
                select_rounds(chosen, sorted(saved))
            except ValueError as err:
                err = str(err).replace("bad --rounds", "bad value")
                raise ValueError(f"[analyze] 'rounds': {err} (saved by [train]: rounds "
                                 f"{rounds}, save_every {every})") from None
        for table, chosen in (("analyze", self.analyze.get("rounds")),
                              ("diagnostics", self.diagnostics and self.diagnostics.rounds)):
            if isinstance(chosen, list):
                bad = sorted({int(r) for r in chosen} - saved)
                if bad:
                    raise ValueError(f"[{table}] 'rounds': {bad} are not saved by [train] "
                                     f"(rounds {rounds}, save_every {every})")
        chosen = self.analyze.get("rounds")
        if isinstance(chosen, list):
            from hessrank.analysis.inference import assign_phases  # keeps --help fast

            empty = [k for k, v in assign_phases(chosen, self.phases(), rounds).items() if not v]
            if empty:
                raise ValueError(f"[inference] phases {empty} hold no round of [analyze] "
                                 f"rounds {chosen}")

    # ---- what the rest of the study reads ---------------------------------------------------
    @property
    def name(self) -> str:
        return self.study.name

    @property
    def replicates(self) -> int:
        return self.study.replicates

    @property
    def seed(self) -> int:
        return self.study.seed

    @property
    def raw(self) -> dict[str, Any]:
        """The spec as read (a copy)."""
        return copy.deepcopy(self._raw)

    @property
    def where(self) -> str:
        """The file the spec came from (for messages)."""
        return self._where

    def read_from(self, raw: dict[str, Any], where: str) -> StudySpec:
        """Remember the spec as read (``raw``, copied) and the file it came from; returns
        this spec."""
        self._raw = copy.deepcopy(raw)
        self._where = where
        return self

    @property
    def last_round(self) -> int:
        """The final round of training ([train] rounds)."""
        return self.train_config().rounds

    def train_config(self) -> TrainConfig:
        """[train] as a :class:`~hessrank.fl.config.TrainConfig` (with its defaults)."""
        return TrainConfig.from_dict(copy.deepcopy(self.train))

    def phases(self) -> list[Phase]:
        """[inference] phases (default: thirds of the rounds)."""
        from hessrank.analysis.inference import Phase, default_phases  # keeps --help fast

        if self.inference.phases is None:
            return default_phases()
        return [Phase(p.name, p.lo, p.hi, p.absolute) for p in self.inference.phases]

    def analyze_kwargs(self) -> dict[str, Any]:
        """[analyze] as keywords of :func:`hessrank.analysis.trajectory.analyze`."""
        kwargs = dict(self.analyze)
        kwargs.setdefault("quantities", "stable-rank")
        return kwargs

    def diagnostics_kwargs(self) -> dict[str, Any]:
        """The [diagnostics] keys given (defaults left to run_diagnostics)."""
        return self.diagnostics.model_dump(exclude_unset=True) if self.diagnostics else {}

    def controls_kwargs(self) -> dict[str, Any]:
        return self.controls.model_dump() if self.controls else {}

    def from_updates(self, index: int) -> bool:
        """Whether hypothesis ``index`` tests the recorded client updates."""
        h = self.hypotheses[index]
        return KINDS[h.kind].reads_updates and h.from_updates(
            bool(self.train.get("record_updates")))

    def update_ranks(self) -> list[int]:
        """Ranks of the alignment hypotheses that test recorded client updates."""
        return sorted({int(h.rank) for i, h in enumerate(self.hypotheses)
                       if self.from_updates(i)})

    def training_settings(self) -> dict[str, Any]:
        """What the trained replicates depend on: [train] and the study seed."""
        return json.loads(json.dumps({"train": self.train, "seed": self.seed}))

    def context(self) -> SpecContext:
        """The facts of [train], [analyze] and [controls] the hypothesis checks read."""
        from hessrank.analysis.quantities import QUANTITIES  # keeps --help fast (torch)
        from hessrank.analysis.subjects import parse_subjects  # keeps --help fast (torch)

        settings = analysis_settings(self.analyze_kwargs())
        subjects = parse_subjects(settings.subjects or ())
        rows = {r for q in settings.quantities or () for r in QUANTITIES[q].produces}
        controls = self.controls or ControlsTable()
        task = DATASET_CATALOG[self.train_config().dataset].task
        return SpecContext(
            subset_sizes=frozenset(s.size for s in subjects if s.kind == "subset"),
            server=any(s.kind == "server" for s in subjects),
            clients=any(s.kind == "clients" for s in subjects),
            row_quantities=frozenset(rows),
            alignment_ranks=frozenset(0 if r is None else r for r in settings.alignment_ranks),
            nested_sizes=frozenset(controls.nested_sizes),
            matched_draws=controls.matched_draws,
            record_updates=bool(self.train.get("record_updates")),
            targets=_TARGETS.get(task, ""))


def analysis_settings(analyze: dict[str, Any]) -> AnalysisSettings:
    """:class:`AnalysisSettings` of an [analyze] table (seed 0: the study derives seeds)."""
    kwargs = dict(analyze)
    kwargs.setdefault("quantities", "stable-rank")
    return AnalysisSettings.build(**kwargs, seed=0)


def parse_spec(raw: dict[str, Any], where: str = "spec") -> StudySpec:
    """Validate a spec given as a dict (the parsed TOML); ValueError: one line naming
    ``where``, the table and the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a study spec is a TOML table")
    tables = list(StudySpec.model_fields)
    for key in raw:
        if key not in tables:
            hint = closest(key, tables).replace("'", "")
            raise ValueError(f"{where}: unknown table [{key}]{hint}; valid tables: "
                             f"{', '.join(tables)}")
    if "train" not in raw:
        raise ValueError(f"{where}: missing table [train] (TrainConfig fields: see hessrank "
                         "train --help)")
    if not raw.get("hypotheses"):
        raise ValueError(f"{where}: no [[hypotheses]]; state at least one with its min_effect")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ValueError(one_line_error(err, where, tags=list(KINDS))) from None
    return spec.read_from(raw, where)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec file (module doc)."""
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
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    return parse_spec(raw, where=str(path))


def json_schema() -> dict[str, Any]:
    """The JSON schema of the spec format (``hessrank study --schema``)."""
    schema = StudySpec.model_json_schema()
    schema["title"] = "hessrank study spec"
    schema["description"] = __doc__.split("\n\n")[0].replace("\n", " ")
    return schema


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None or value == [] or value == {}:
        return "optional"
    if isinstance(value, Table):
        return "optional"
    return f"default {json.dumps(value)}"


def format_help() -> str:
    """The spec format as text, from the models (``hessrank study --help``)."""
    lines = ["A study spec is a TOML file with these tables (every key is checked before "
             "anything trains; an unknown key is refused with the closest valid one):", ""]
    models = {"study": StudyTable, "controls": ControlsTable, "diagnostics": DiagnosticsTable,
              "inference": InferenceTable}
    for name, field in StudySpec.model_fields.items():
        table = f"[[{name}]]" if name == "hypotheses" else f"[{name}]"
        lines.append(f"{table}  {field.description or ''}".rstrip())
        model = models.get(name)
        for key, f in (model.model_fields.items() if model else []):
            lines.append(f"    {key:15s} {f.description or ''} ({_default(f)})")
        if name == "hypotheses":
            common = next(iter(KINDS.values())).model.model_fields
            for key in ("name", "kind", "min_effect", "transform", "quantity"):
                desc = ("one of the kinds below" if key == "kind" else common[key].description)
                lines.append(f"    {key:15s} {desc}" + (
                    f" ({_default(common[key])})" if key != "kind" else " (required)"))
            lines.append("  kinds, with their own keys:")
            lines.append(kinds_help())
    return "\n".join(lines)
