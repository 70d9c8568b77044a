"""The built-in federated trainer: FedAvg, FedProx, FedLoRA, FedLoRU (+p/m), FeDLRT (DESIGN.md §5).

``train``, ``TrainConfig`` and ``RunDir`` are exported lazily, so importing one algorithm
module does not pull in the runner (and the runner's data and model dependencies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hessrank.fl.config import TrainConfig

if TYPE_CHECKING:
    from hessrank.fl.rundir import RunDir
    from hessrank.fl.runner import train

__all__ = ["RunDir", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from hessrank.fl.runner import train

        return train
    if name == "RunDir":
        from hessrank.fl.rundir import RunDir

        return RunDir
    raise AttributeError(f"module 'hessrank.fl' has no attribute {name!r}")
