"""The Flower apps of ``hessrank train --engine flower`` as module attributes, for Flower's
deployment engine (``flwr run``; see docs/flower.md).

``clientapp``: :func:`hessrank.fl.flower.make_client_app` (every SuperNode runs it).
``serverapp``: reads the run config of ``flwr run`` --
    ``config``     path of a TrainConfig JSON on the machine of the ServerApp (required),
    ``out``        run directory to write there (required),
    ``min-nodes``  SuperNodes to wait for before the first round (default 1),
and runs :func:`hessrank.fl.runner.train_many` with every client task sent through the grid:
the same loop, run directory and weights as ``hessrank train --engine flower``.

Importing this module needs ``flwr``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp

from hessrank.fl.flower import make_client_app, make_execute

__all__ = ["clientapp", "serverapp"]

clientapp = make_client_app()
serverapp = ServerApp()


@serverapp.main()
def _main(grid: Any, context: Any) -> None:
    from hessrank.fl.runner import train_many  # when Flower runs the app: not at load time

    run_config = context.run_config
    missing = [k for k in ("config", "out") if k not in run_config]
    if missing:
        raise ValueError(f"flwr run needs --run-config entries {missing} (see docs/flower.md)")
    config = json.loads(Path(str(run_config["config"])).read_text())
    for_config = make_execute(grid, int(run_config.get("min-nodes", 1)))
    settings = " ".join(f"{k}={run_config[k]!r}" for k in sorted(run_config))
    command = ["flwr", "run", "(hessrank.fl.flower_app)", "--run-config", settings]
    train_many([(config, str(run_config["out"]))], progress=False, engine="flower",
               execute_for=for_config, command=command)  # fmt: skip
