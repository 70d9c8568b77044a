"""Run configuration of the federated trainer: one flat, JSON-serializable dataclass.

Everything needed to rebuild model, data and partition is in here, so a run directory's
``config.json`` alone reproduces the run (DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALGORITHM_REGISTRY: dict[str, str] = {
    "fedavg": "hessrank.fl.fedavg:FedAvg",
    "fedprox": "hessrank.fl.fedprox:FedProx",
    "fedlora": "hessrank.fl.fedlora:FedLoRA",
    "fedloru": "hessrank.fl.fedloru:FedLoRU",
    "pfedloru": "hessrank.fl.fedloru:PFedLoRU",
    "mfedloru": "hessrank.fl.fedloru:MFedLoRU",
    "fedlrt": "hessrank.fl.fedlrt:FeDLRT",
}
"""The one algorithm registry: name → "module:class", imported on first use by the runner."""
ALGORITHMS = tuple(ALGORITHM_REGISTRY)

LEGACY_DEFAULTS: dict[str, Any] = {
    "fedlrt_init": "svd",
    "fedlrt_weighting": "size",
    "mfedloru_scheme": "width",
    "personal_order": "personal-first",
    "trunc_theta": 0.1,
}
"""Values of later-added fields that reproduce runs saved before the fields existed."""

SECTIONS: dict[str, tuple[str, ...]] = {
    "LoRA family (fedlora, fedloru, pfedloru, mfedloru)": (
        "rank", "lora_alpha", "factorize", "from_scratch", "merge_every"),
    "pFedLoRU": ("personal_rank", "personal_alpha", "personal_order", "personal_steps"),
    "mFedLoRU": ("client_ranks", "mfedloru_scheme"),
    "FedProx": ("prox_mu",),
    "FeDLRT (also uses rank, factorize)": (
        "correction", "trunc_theta", "r_min", "r_max", "fedlrt_init", "fedlrt_weighting"),
}  # fmt: skip
"""Per-algorithm groups of fields (the CLI help shows one section each); the rest is common."""
PARTITIONS = ("iid", "dirichlet", "shards")
LR_SCHEDULES = ("constant", "cosine", "step")
DTYPES = ("float32", "float64")
CORRECTIONS = ("full", "simplified", "none")
LORA_FAMILY = ("fedlora", "fedloru", "pfedloru", "mfedloru")
PERSONAL_ORDERS = ("global-first", "personal-first")
MFEDLORU_SCHEMES = ("hierarchical", "width")
FEDLRT_INITS = ("scaled-svd", "svd")
WEIGHTINGS = ("uniform", "size")
MAX_SEED = 2**32 - 1  # scikit-learn's random_state bound; the trainer derives streams from it


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON-like ``value`` fits the annotation ``tp`` (int for float is fine, bool for
    int is not)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


@dataclass
class TrainConfig:
    """Configuration of one federated training run.

    Fields are grouped by concern. Algorithm-specific fields are ignored by the others.
    Choices the papers leave open are recorded in ``notes`` by the algorithm at setup.
    """

    # what
    algo: str = "fedavg"
    dataset: str = "digits"
    data_root: str | None = None  # local directory for mnist/fashion-mnist/cifar10
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # load_dataset options
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    # federation
    clients: int = 20
    partition: str = "dirichlet"  # iid | dirichlet | shards
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    min_client_size: int = 8
    client_fraction: float = 1.0  # C: fraction sampled per round
    validation_fraction: float = 0.0  # server-side validation split of the training set
    client_holdout: float = 0.0  # fraction of each client's data held out (personal test)
    # optimization
    rounds: int = 50
    local_epochs: int = 1  # E; ignored when local_steps > 0
    local_steps: int = 0  # s*: fixed number of local steps per round
    batch_size: int = 32
    lr: float = 0.05
    lr_schedule: str = "constant"  # constant | cosine | step
    lr_decay: float = 0.5  # step schedule: factor every lr_step_every rounds
    lr_step_every: int = 20
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    # low-rank (FedLoRA / FedLoRU / pFedLoRU / mFedLoRU)
    rank: int = 8
    lora_alpha: float = 8.0
    factorize: list[str] | None = None  # module names; None: every Linear/Conv2d but first and last
    merge_every: int = 5  # tau, FedLoRU accumulation period in rounds
    # LoRA family: W0 = 0 with both factors random (the papers' pure rank-r model); None: the
    # algorithm's default (True for fedlora/fedloru/pfedloru/mfedloru); an error elsewhere
    from_scratch: bool | None = None
    personal_rank: int = 4  # pFedLoRU
    personal_alpha: float = 4.0
    personal_order: str = "global-first"  # pFedLoRU: global pair, then personal pair
    personal_steps: int = 0  # pFedLoRU steps on the personal pair; 0: half the global phase's
    mfedloru_scheme: str = "hierarchical"  # mFedLoRU: hierarchical | width
    client_ranks: list[int] | None = None  # mFedLoRU ranks (<= rank); None: r, r/2, r/4
    # FedProx
    prox_mu: float = 0.01  # mu of the proximal term (mu/2)||theta - theta_global||^2
    # FeDLRT
    correction: str = "full"  # full | simplified | none
    trunc_theta: float = 0.02  # relative truncation threshold (vartheta); 0.1 blocks rank growth
    r_min: int = 2
    r_max: int = 64
    fedlrt_init: str = "scaled-svd"  # scaled-svd | svd
    fedlrt_weighting: str = "uniform"  # uniform (the paper's (1/C) sum L_c) | size
    # bookkeeping
    save_every: int = 5
    eval_every: int = 1
    record_updates: bool = False  # RUN/updates/round_XXXX.safetensors: each client's update
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ValueError(
                    f"config field {f.name!r} must be {_type_name(hints[f.name])}, got "
                    f"{type(value).__name__} {value!r}; fix the value in the config file or flag"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            if isinstance(value, tuple):  # lists given as tuples: store the JSON form
                setattr(self, f.name, list(value))

    def _check_values(self) -> None:
        """Every value check that needs no data: run before any work (CLI boundary)."""
        choices = {"algo": ALGORITHMS, "partition": PARTITIONS, "lr_schedule": LR_SCHEDULES,
                   "dtype": DTYPES, "correction": CORRECTIONS,
                   "personal_order": PERSONAL_ORDERS,
                   "mfedloru_scheme": MFEDLORU_SCHEMES, "fedlrt_init": FEDLRT_INITS,
                   "fedlrt_weighting": WEIGHTINGS}  # fmt: skip
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                kind = "algorithm" if name == "algo" else name
                raise ValueError(
                    f"unknown {kind} {getattr(self, name)!r}; choose one of {', '.join(valid)}"
                )
        at_least = {"clients": 1, "rounds": 1, "batch_size": 1, "save_every": 1,
                    "eval_every": 1, "local_epochs": 1, "local_steps": 0, "lr_step_every": 1,
                    "min_client_size": 1, "shards_per_client": 1, "rank": 1,
                    "personal_rank": 1, "merge_every": 0, "r_min": 1,
                    "personal_steps": 0}  # fmt: skip
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        positive = ("lr", "lora_alpha", "personal_alpha", "dirichlet_alpha", "lr_decay")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"{name} must be > 0, got {getattr(self, name)}"
                    + ("; a learning rate must be a positive number" if name == "lr" else "")
                )
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        for name in ("validation_fraction", "client_holdout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.prox_mu < 0:
            raise ValueError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if not 0.0 <= self.trunc_theta < 1.0:
            raise ValueError(f"trunc_theta must be in [0, 1), got {self.trunc_theta}")
        if self.r_max < self.r_min:
            raise ValueError(f"r_max must be >= r_min, got r_min={self.r_min}, r_max={self.r_max}")
        if self.from_scratch is not None and self.algo not in LORA_FAMILY:
            raise ValueError(
                f"from_scratch applies to {', '.join(LORA_FAMILY)} only, not {self.algo!r}; "
                "drop --from-scratch/--no-from-scratch"
            )
        if self.client_ranks is not None and any(r < 1 for r in self.client_ranks):
            raise ValueError(f"client_ranks must be >= 1, got {self.client_ranks}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
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
    def load(cls, path: str | Path) -> TrainConfig:
        """A run directory's saved config; keys it lacks (written before they existed) get the
        values that reproduce what that run did (:data:`LEGACY_DEFAULTS`), not today's
        defaults."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not readable JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object of TrainConfig fields")
        for key, value in LEGACY_DEFAULTS.items():
            data.setdefault(key, value)
        if data.get("algo") not in LORA_FAMILY and isinstance(data.get("from_scratch"), bool):
            data["from_scratch"] = None  # saved as False by older versions for every algorithm
        return cls.from_dict(data)
