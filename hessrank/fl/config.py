"""Run configuration of the federated trainer: one flat, JSON-serializable dataclass.

:class:`TrainConfig` is composed of option groups, each a dataclass whose fields carry their
type, constraints and help line (:func:`hessrank.fl.registry.option`): the run's own groups
below (data, federation, optimization, bookkeeping) and every algorithm's groups from
:mod:`hessrank.fl.registry`. That one declaration is validated by pydantic (strict types:
an int is no bool and a number is no string; constraints; choices), shown by ``hessrank
train --help`` and written to ``config.json``; the config stays flat, so every saved run
directory reads back. pydantic (and ``annotated_types``) are imported on the first
validation, never by ``--help``: pydantic's import alone costs about as much as the whole
``--help`` budget (experiments/benchmarks/results/trainer_refactor.md has the timings).

Everything needed to rebuild model, data and partition is in here, so a run directory's
``config.json`` alone reproduces the run (docs/design.md). :func:`run_fingerprint` hashes the
keys that change the trajectory.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from hessrank.data.catalog import DATASET_CATALOG, PARTITION_SCHEMES
from hessrank.fl.registry import (
    ALGORITHM_NAMES,
    ALGORITHMS,
    CONSTRAINT_NAMES,
    LoRAOptions,
    option,
    option_group,
    option_groups,
)
from hessrank.models.catalog import MODEL_CATALOG

if TYPE_CHECKING:
    from annotated_types import Ge, Gt, Interval

__all__ = [
    "LEGACY_DEFAULTS",
    "MAX_SEED",
    "NEUTRAL_VALUES",
    "RENAMED_VALUES",
    "BookkeepingOptions",
    "DataOptions",
    "DivergenceOptions",
    "FederationOptions",
    "OptimizationOptions",
    "TrainConfig",
    "config_groups",
    "field_types",
    "run_fingerprint",
]

MAX_SEED = 2**32 - 1  # scikit-learn's random_state bound; the trainer derives streams from it
FINGERPRINT_VERSION = "hessrank-run/1"
"""Part of every fingerprint: bumped if the meaning of a config key ever changes."""

LEGACY_DEFAULTS: dict[str, Any] = {
    "fedlrt_init": "svd",
    "fedlrt_weighting": "size",
    "mfedloru_scheme": "width",
    "personal_order": "AB-first",
    "trunc_theta": 0.1,
}
"""Values of later-added fields that reproduce runs saved before the fields existed."""

_DATASETS = tuple(DATASET_CATALOG)
_SCHEMES = PARTITION_SCHEMES
_MODELS = tuple(MODEL_CATALOG)


@option_group
class DataOptions:
    """What is trained: algorithm, data and model."""

    algo: Literal[ALGORITHM_NAMES] = option("fedavg", "federated algorithm (list below)")
    dataset: Literal[_DATASETS] = option("digits", "dataset (list below)")
    data_root: str | None = option(
        None, "local folder with mnist/fashion-mnist/cifar10 in torchvision's layout")
    dataset_kwargs: dict[str, Any] = option(
        {}, "JSON dict of dataset options, e.g. '{\"limit\": 500}' (options per dataset below)")
    model: Literal[_MODELS] = option("mlp", "network (list below)")
    model_kwargs: dict[str, Any] = option(
        {}, "JSON dict of model options, e.g. '{\"hidden\": [128, 128]}'")
    dtype: Literal["float32", "float64"] = option("float32", "model and data dtype")


@option_group
class FederationOptions:
    """Clients and their data."""

    clients: Annotated[int, Ge(1)] = option(20, "number of clients K")
    partition: Literal[_SCHEMES] = option(
        "dirichlet", "client split (natural: one client per group of the data, e.g. a "
        "shakespeare role; --clients must equal the number of groups)")
    dirichlet_alpha: Annotated[float, Gt(0)] = option(
        0.5, "Dirichlet concentration (smaller: stronger label skew)")
    shards_per_client: Annotated[int, Ge(1)] = option(2, "label shards per client (shards)")
    min_client_size: Annotated[int, Ge(1)] = option(8, "fewest samples a client may hold")
    client_fraction: Annotated[float, Interval(gt=0.0, le=1.0)] = option(
        1.0, "C, fraction of clients sampled per round (at least one)")
    validation_fraction: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.0, "fraction of the training set held out (never trained on) for val_loss/"
        "val_accuracy, e.g. to pick a learning rate (hessrank sweep)")  # fmt: skip
    client_holdout: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.0, "fraction of each client's samples held out as its own test set: per-client "
        "metric of the client's model (personalized) or the global one")  # fmt: skip


@option_group
class OptimizationOptions:
    """Rounds, local training and the learning rate."""

    rounds: Annotated[int, Ge(1)] = option(50, "number of communication rounds")
    local_epochs: Annotated[int, Ge(1)] = option(
        1, "E, local epochs per round (ignored when --local-steps > 0)")
    local_steps: Annotated[int, Ge(0)] = option(
        0, "s*, fixed number of local SGD steps per round (0: use epochs)")
    batch_size: Annotated[int, Ge(1)] = option(32, "local mini-batch size")
    lr: Annotated[float, Gt(0)] = option(0.05, "learning rate (round 1)")
    lr_schedule: Literal["constant", "cosine", "step"] = option("constant", "schedule over rounds")
    lr_decay: Annotated[float, Gt(0)] = option(
        0.5, "step schedule: factor applied every --lr-step-every rounds")
    lr_step_every: Annotated[int, Ge(1)] = option(20, "step schedule period in rounds")
    momentum: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.0, "SGD momentum (buffer reset every round)")
    weight_decay: Annotated[float, Ge(0)] = option(0.0, "SGD weight decay")
    max_grad_norm: Annotated[float, Ge(0)] = option(
        0.0, "clip every local step's gradient to this total 2-norm before weight decay and "
        "momentum, as torch.nn.utils.clip_grad_norm_ (0: off)")  # fmt: skip
    seed: Annotated[int, Interval(ge=0, le=MAX_SEED)] = option(
        0, "seeds model init, split, sampling and batches (same seed, same weights)")


@option_group
class BookkeepingOptions:
    """What is written (not part of the trajectory)."""

    save_every: Annotated[int, Ge(1)] = option(
        5, "checkpoint every this many rounds (plus round 0 and the last)")
    eval_every: Annotated[int, Ge(1)] = option(
        1, "evaluate every this many rounds (plus the last)")
    record_updates: bool = option(
        False, "save every sampled client's update to the dense effective weights, every "
        "round, to RUN/updates/round_XXXX.safetensors (keys CLIENT/PARAM)")  # fmt: skip
    notes: dict[str, str] = option(
        {}, "JSON dict of free-form notes (algorithms add their open choices)")


@option_group
class DivergenceOptions:
    """Divergence checks (they stop a run, never change its weights)."""

    divergence_factor: Annotated[float, Ge(0)] = option(
        1e3, "stop when a client's local loss or the training loss exceeds this multiple of "
        "the initial (round 0) training loss (0: off)")  # fmt: skip
    weight_bound: Annotated[float, Ge(0)] = option(
        1e6, "stop when a weight a client sends or the server holds exceeds this magnitude "
        "(0: off)")  # fmt: skip

    def check(self, used: bool) -> None:
        if 0 < self.divergence_factor <= 1:
            raise ValueError(
                f"config key 'divergence_factor' must be 0 (off) or > 1, got "
                f"{self.divergence_factor}; the loss may not even exceed its initial value"
            )


_RUN_GROUPS = (DataOptions, FederationOptions, OptimizationOptions)

NEUTRAL_VALUES: dict[str, Any] = {
    "max_grad_norm": 0.0,
    "factorize_rule": "inner",
    "lora_init": "dense-variance",
    "lowrank_dropout": 0.0,
    "merge_mode": "reinit",
    "rank_cap": "none",
    "adapters": None,
    "lora_targets": None,
}
"""Trajectory keys added after fingerprint version 1, with the value that does what runs
did before they existed: at that value a key is left out of :meth:`TrainConfig.trajectory`,
so every earlier run keeps its fingerprint."""


RENAMED_VALUES: dict[str, dict[str, str]] = {
    "personal_order": {"global-first": "LU-first", "personal-first": "AB-first"},
}
"""Config values renamed: old spelling → new. An old spelling is still accepted (one-line
FutureWarning; silently when a saved run is read) and stored in the new one; the fingerprint
hashes the old spelling, so a run keeps its identity across the rename."""


def _renamed(values: dict[str, Any], warn: bool) -> dict[str, Any]:
    """``values`` with old spellings (:data:`RENAMED_VALUES`) replaced by the new ones."""
    for key, table in RENAMED_VALUES.items():
        old = values.get(key)
        if isinstance(old, str) and old in table:
            if warn:
                warnings.warn(
                    f"config key {key!r}: {old!r} is deprecated, use {table[old]!r} (pFedLoRU's "
                    "pairs are named as in the authors' rebuttal: L, U shared, A, B local)",
                    FutureWarning, stacklevel=4,
                )  # fmt: skip
            values[key] = table[old]
    return values


def config_groups() -> tuple[type, ...]:
    """The option groups of :class:`TrainConfig` in display order: the run's, the
    algorithms' (registry order), bookkeeping, divergence checks."""
    return (*_RUN_GROUPS, *option_groups(), BookkeepingOptions, DivergenceOptions)


def _not_trajectory() -> set[str]:
    """Keys that do not change the weights: bookkeeping, the divergence checks and where the
    data is read from."""
    groups = (BookkeepingOptions, DivergenceOptions)
    return {f.name for g in groups for f in dataclasses.fields(g)} | {"data_root"}


@dataclass
class TrainConfig(*reversed(config_groups())):  # type: ignore[misc]
    """Configuration of one federated training run: the fields of every option group
    (:func:`config_groups`; dataclass bases are listed last-first so that the fields keep
    the display order). Algorithm-specific fields are ignored by the other algorithms.
    Choices the papers leave open are recorded in ``notes`` by the algorithm at setup.

    Raises:
        ValueError: on construction, one line naming the first offending key.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # lists given as tuples: store the JSON form
            if isinstance(getattr(self, f.name), tuple):
                setattr(self, f.name, list(getattr(self, f.name)))
        values = _validate(_renamed(self.to_dict(), warn=True))
        for f in dataclasses.fields(self):
            setattr(self, f.name, values[f.name])
        entry = ALGORITHMS[self.algo]
        for group in (DivergenceOptions, *option_groups()):
            check = getattr(group, "check", None)
            if check is not None:  # self: the whole config; run groups are always used
                check(self, group is DivergenceOptions or group in entry.options)

    # ---- dict and JSON forms -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config of the keys in ``d`` (the others at their defaults).

        Raises:
            ValueError: not a mapping, an unknown key (with the closest valid one), or an
                invalid value; one line naming the key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(
                f"a TrainConfig needs a mapping of config keys, got {type(d).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean {close[0]!r} for {unknown[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown config keys {unknown}{hint}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**d)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        """:meth:`from_dict` of a JSON file, with one-line errors for unreadable files."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object of TrainConfig fields")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config as a run directory saved it: keys it lacks (written before they existed)
        get the values that reproduce what that run did (:data:`LEGACY_DEFAULTS`), not
        today's defaults."""
        data = _renamed(dict(data), warn=False)
        for key, value in LEGACY_DEFAULTS.items():
            data.setdefault(key, value)
        entry = ALGORITHMS.get(str(data.get("algo")))
        if isinstance(data.get("from_scratch"), bool) and not (
            entry is not None and LoRAOptions in entry.options
        ):
            data["from_scratch"] = None  # saved as False by older versions for every algorithm
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A run directory's saved ``config.json`` (:meth:`from_saved`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not readable JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object of TrainConfig fields")
        try:
            return cls.from_saved(data)
        except ValueError as err:
            raise ValueError(f"config file {path}: {err.args[0]}") from None

    # ---- identity ----------------------------------------------------------------------------
    def trajectory(self) -> dict[str, Any]:
        """The keys that change the weights a run produces, as JSON values: every key but
        bookkeeping (``save_every``, ``eval_every``, ``record_updates``, ``notes``) and
        ``data_root``, without the option groups the algorithm does not read, without
        ``rounds`` unless the learning-rate schedule depends on it (cosine), and without the
        later-added keys at their :data:`NEUTRAL_VALUES`; renamed values in their old spelling
        (:data:`RENAMED_VALUES`)."""
        entry = ALGORITHMS[self.algo]
        unused = {f.name for g in option_groups() if g not in entry.options
                  for f in dataclasses.fields(g)}  # fmt: skip
        skip = _not_trajectory() | unused
        if self.lr_schedule != "cosine":
            skip.add("rounds")
        skip |= {k for k, v in NEUTRAL_VALUES.items() if getattr(self, k) == v}
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        for key, table in RENAMED_VALUES.items():  # hashed in the spelling runs were saved in
            old = {new: old for old, new in table.items()}
            if d.get(key) in old:
                d[key] = old[d[key]]
        return json.loads(json.dumps(d))  # tuples → lists, as after a JSON round trip

    def fingerprint(self) -> str:
        """:func:`run_fingerprint` of this config."""
        import hashlib  # here, not at the top: keeps `hessrank --help` fast (module docstring)

        text = json.dumps([FINGERPRINT_VERSION, self.trajectory()], sort_keys=True,
                          separators=(",", ":"), allow_nan=False)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()


def run_fingerprint(config: TrainConfig | Mapping[str, Any]) -> str:
    """The identity of a run's trajectory: SHA-256 of :meth:`TrainConfig.trajectory` (every
    key that changes the weights; ``rounds`` whenever the schedule depends on it).

    Two runs with the same fingerprint produce the same checkpoints (bit for bit on the CPU
    with the same threads and versions); every checkpoint stores its run's fingerprint, and
    :class:`hessrank.fl.rundir.RunDir` refuses one whose fingerprint is not its run's.

    Args:
        config: a :class:`TrainConfig`, or a saved ``config.json`` as a dict (read with the
            legacy defaults of :meth:`TrainConfig.from_saved`).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_saved(config)
    return cfg.fingerprint()


# ---- validation (pydantic, imported here on first use) -------------------------------------------
def field_types(constraints: bool = True) -> dict[str, Any]:
    """TrainConfig's field types, evaluated: with their ``annotated_types`` constraints
    (``constraints=True``, what pydantic validates), or with inert stand-ins for them (what
    the CLI needs: the base types, without importing ``annotated_types``)."""
    if constraints:
        import annotated_types  # here: keeps `hessrank --help` fast (module docstring)

        names = {n: getattr(annotated_types, n) for n in CONSTRAINT_NAMES}
    else:
        names = dict.fromkeys(CONSTRAINT_NAMES, lambda *args, **kwargs: None)
    return typing.get_type_hints(TrainConfig, localns=names, include_extras=constraints)


@functools.cache
def _validator() -> Any:
    """A pydantic model with TrainConfig's fields (types with their constraints), strict:
    no str → number, no bool → int, no inf/nan."""
    import pydantic  # here, not at the top: keeps `hessrank --help` fast (module docstring)

    hints = field_types()
    fields = {f.name: (hints[f.name], ...) for f in dataclasses.fields(TrainConfig)}
    config = pydantic.ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    return pydantic.create_model("TrainConfig", __config__=config, **fields)


def _validate(values: dict[str, Any]) -> dict[str, Any]:
    import pydantic  # here, not at the top: keeps `hessrank --help` fast (module docstring)

    try:
        model = _validator().model_validate(values)
    except pydantic.ValidationError as err:
        raise ValueError(_one_line(err.errors()[0])) from None
    return {name: getattr(model, name) for name in values}


def _one_line(error: Mapping[str, Any]) -> str:
    """A pydantic error as one line naming the key, the offending value and what is valid."""
    loc = [str(p) for p in error.get("loc", ())]
    key = loc[0] if loc else "?"
    where = key + "".join(f"[{p}]" for p in loc[1:2] if p.isdigit())
    value = error.get("input")
    kind = error.get("type", "")
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", "")).replace("'", "")
        return f"config key {where!r}: unknown value {value!r}; choose one of {expected}"
    shown = f"{type(value).__name__} {value!r}"
    message = str(error.get("msg", "invalid value"))
    message = message[0].lower() + message[1:]
    return f"config key {where!r}: {message}, got {shown}; fix it in the config file or flag"
