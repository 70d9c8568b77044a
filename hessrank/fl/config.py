"""Run configuration of the federated trainer: one flat, JSON-serializable dataclass.

Everything needed to rebuild model, data and partition is in here, so a run directory's
``config.json`` alone reproduces the run (DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALGORITHMS = ("fedavg", "fedlora", "fedloru", "pfedloru", "mfedloru", "fedlrt")


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
    from_scratch: bool = False  # FedLoRU: W0 = 0 with both factors random
    personal_rank: int = 4  # pFedLoRU
    personal_alpha: float = 4.0
    personal_steps: int = 0  # pFedLoRU local steps on the personal pair; 0: same as global
    client_ranks: list[int] | None = None  # mFedLoRU ranks (<= rank); None: r, r/2, r/4
    # FeDLRT
    correction: str = "full"  # full | simplified | none
    trunc_theta: float = 0.1  # relative truncation threshold (vartheta)
    r_min: int = 2
    r_max: int = 64
    # bookkeeping
    save_every: int = 5
    eval_every: int = 1
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            choices = ", ".join(ALGORITHMS)
            raise ValueError(f"unknown algorithm {self.algo!r}; choose one of {choices}")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.correction not in ("full", "simplified", "none"):
            raise ValueError(
                f"unknown correction {self.correction!r}; choose full, simplified or none"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
