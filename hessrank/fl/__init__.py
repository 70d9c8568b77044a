"""The built-in federated trainer: FedAvg, FedProx, FedLoRA, FedLoRU (+p/m), FeDLRT, SCAFFOLD.

Layout (docs/design.md): :mod:`~hessrank.fl.protocol` (server strategy, client procedure,
client states), one module per algorithm, :mod:`~hessrank.fl.registry` (the algorithms and
their options), :mod:`~hessrank.fl.config` (``TrainConfig``), :mod:`~hessrank.fl.setup`,
:mod:`~hessrank.fl.loop`, :mod:`~hessrank.fl.evaluation`, :mod:`~hessrank.fl.rundir`,
:mod:`~hessrank.fl.runner` and the engines (built-in; :mod:`~hessrank.fl.flower`).

``train``, ``TrainConfig`` and ``RunDir`` are exported lazily, so importing one algorithm
module does not pull in the runner (and the runner's data and model dependencies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hessrank.fl.config import TrainConfig, run_fingerprint

if TYPE_CHECKING:
    from hessrank.fl.rundir import RunDir
    from hessrank.fl.runner import train

__all__ = ["RunDir", "TrainConfig", "run_fingerprint", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        # PEP 562: the trainer (torch) is imported on first use, so --help stays fast
        from hessrank.fl.runner import train

        return train
    if name == "RunDir":
        from hessrank.fl.rundir import RunDir  # PEP 562, as above

        return RunDir
    raise AttributeError(f"module 'hessrank.fl' has no attribute {name!r}")
