"""Run hessrank's federated training inside Flower (``hessrank train --engine flower``).

The round protocol (:mod:`hessrank.fl.protocol`) separates server and client: in each phase
the server strategy configures :class:`~hessrank.fl.protocol.ClientTask` s and the client
procedure answers each one, ``client(task, data, state, rng) -> (reply, state)``, through an
``execute`` function (:meth:`hessrank.fl.loop.Federation.round`). This module supplies an
``execute`` that ships every task to a Flower ``ClientApp`` and waits for its reply:

    ServerApp (runs hessrank's loop: sampling, aggregation, server update, evaluation,
               checkpoints -- the same code as the built-in engine, see runner.train)
        ── Message(TRAIN): ArrayRecord "message", "held", "state", "rng";
                           ConfigRecord "task" ──►
    ClientApp (builds the run's setup from the config in the message, once per config and
               process; calls its client procedure on the task's client)
        ◄── Message: ArrayRecord "reply", "state", "rng"; MetricRecord "metrics";
                     ConfigRecord "status" ──

Client state (pFedLoRU's personal pairs, mFedLoRU's tiers, SCAFFOLD's control variates)
lives where the built-in engine keeps it, in the run's client-state store on the server
side: it travels with each task to the ClientApp and comes back with the reply, as the
generator's state does. Not in the SuperNode's ``Context.state``: the checkpoints must hold
every state a resume needs (a node's context is gone when the simulation ends, and a client
is not bound to one node), and the two engines must write equal checkpoints. What this
costs is that the state crosses the wire; it is runtime traffic, not counted as the
algorithm's communication (docs/flower.md).

Same bits as the built-in engine: client work draws only from the round generator, whose
state travels with the task and comes back with the reply, and tasks are sent one at a time
in the order the round issues them; tensors travel as numpy arrays of the same dtype
(float64 stays float64). So a Flower run's checkpoints equal the built-in run's, for every
algorithm (tests/fl/test_flower.py). The price is that clients work in turn, not in
parallel. Devices other than the CPU are not supported.

Client c's task goes to the (c mod N)-th of the N SuperNodes in ascending node-id order; in
the simulation every ClientApp can build every client's data from the config, so the mapping
only spreads the work. docs/flower.md describes deployment across machines.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessrank.fl.config import TrainConfig
from hessrank.fl.protocol import (
    ClientData,
    ClientReply,
    ClientState,
    ClientTask,
    Execute,
    NonFiniteError,
)
from hessrank.fl.setup import build_setup

__all__ = [
    "START_ATTEMPTS",
    "EngineStartError",
    "FlowerEngineError",
    "make_client_app",
    "make_execute",
    "reaped_children",
    "run_engine_once",
    "run_flower",
    "tensors_from_record",
    "tensors_to_record",
]

_NODE_WAIT_S = 120.0
"""How long the ServerApp waits for the simulated SuperNodes to connect."""
_PULL_INTERVAL_S = 0.05
_REAP_WAIT_S = 10.0
"""How long Ray's processes get to exit after ``ray.shutdown()`` before they are killed."""


class FlowerEngineError(RuntimeError):
    """Flower's simulation engine failed (Ray did not start, a node never connected, the
    simulation ended before a client replied); the message is one line."""


def _require_flwr() -> None:
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError(
            "--engine flower needs Flower: pip install 'flwr[simulation]==1.41.0' (the dev "
            "extra of hessrank includes it)"
        ) from None


def tensors_to_record(tensors: dict[str, Tensor]) -> Any:
    """A Flower ``ArrayRecord`` holding each tensor as a numpy array of the same dtype."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy())
                        for k, v in tensors.items()})  # fmt: skip


def tensors_from_record(record: Any) -> dict[str, Tensor]:
    """Inverse of :func:`tensors_to_record` (CPU tensors, writable copies)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def make_execute(
    grid: Any,
    num_nodes: int,
    stop: threading.Event | None = None,
    replied: threading.Event | None = None,
) -> Callable[[str], Execute]:
    """Waits for ``num_nodes`` SuperNodes; returns ``for_config(config_json)``, an ``execute``
    for :meth:`~hessrank.fl.loop.Federation.round` of the run with that config that sends
    each task (with the client's state) to a ClientApp through Flower's ``grid``.

    ``stop``: set when the simulation engine has ended (:func:`run_flower` sets it); every
    wait here checks it, so a ServerApp thread never outlives its engine (Flower's thread is
    not a daemon: a wait without end would keep the process alive). ``replied``: set when the
    first reply arrives."""
    stop = stop if stop is not None else threading.Event()
    replied = replied if replied is not None else threading.Event()
    deadline = time.monotonic() + _NODE_WAIT_S
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < num_nodes:
        if stop.is_set():
            raise FlowerEngineError("Flower's simulation engine ended before its nodes connected")
        if time.monotonic() > deadline:
            raise FlowerEngineError(
                f"only {len(nodes)} of {num_nodes} Flower SuperNodes connected within "
                f"{_NODE_WAIT_S:.0f} s"
            )
        time.sleep(0.1)
        nodes = sorted(grid.get_node_ids())

    def for_config(config_json: str) -> Execute:
        def execute(
            task: ClientTask, data: ClientData, state: ClientState, gen: torch.Generator
        ) -> tuple[ClientReply, ClientState]:
            out = _send(grid, nodes, config_json, task, state, gen, stop)
            replied.set()
            return out

        return execute

    return for_config


def _exchange(grid: Any, msg: Any, stop: threading.Event) -> Any:
    """Push one message and pull its reply, giving up when ``stop`` is set."""
    (msg_id,) = list(grid.push_messages([msg]))
    while not stop.is_set():
        replies = list(grid.pull_messages({msg_id}))
        if replies:
            return replies[0]
        time.sleep(_PULL_INTERVAL_S)
    raise FlowerEngineError("Flower's simulation engine ended before the client replied")


def _send(
    grid: Any,
    nodes: list[int],
    config_json: str,
    task: ClientTask,
    state: ClientState,
    generator: torch.Generator,
    stop: threading.Event,
) -> tuple[ClientReply, ClientState]:
    """Send one task and the client's state to its SuperNode, wait for the reply, advance
    ``generator`` as the client did; returns the reply and the client's new state."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    content = RecordDict({
        "message": tensors_to_record(task.message),
        "held": tensors_to_record(task.held),
        "state": tensors_to_record(state),
        "rng": tensors_to_record({"round": generator.get_state()}),
        "task": ConfigRecord({"phase": task.phase, "client_id": task.client_id,
                              "lr": float(task.lr), "config": config_json}),
    })  # fmt: skip
    node = nodes[task.client_id % len(nodes)]
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    reply = _exchange(grid, msg, stop)
    if reply.has_error():
        raise RuntimeError(
            f"Flower ClientApp failed on client {task.client_id} ({task.phase}): "
            f"{reply.error.reason}"
        )
    status = reply.content["status"]
    if status["error"]:
        raise NonFiniteError(str(status["error"]), client_id=task.client_id)
    generator.set_state(tensors_from_record(reply.content["rng"])["round"])
    metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
    tensors = tensors_from_record(reply.content["reply"])
    new_state = tensors_from_record(reply.content["state"])
    return ClientReply(tensors, metrics), new_state


def make_client_app() -> Any:
    """The ClientApp: rebuilds the run's setup from the config in a task (once per config and
    process) and runs its client procedure on the task's client and state."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    setups: dict[str, Any] = {}  # per-process cache: the data and algorithm of a config

    @app.train()
    def train(msg: Message, context: Any) -> Message:  # noqa: ARG001 (Flower's signature)
        task_rec = msg.content["task"]
        config_json = str(task_rec["config"])
        if config_json not in setups:
            setups.clear()
            setups[config_json] = build_setup(TrainConfig.from_dict(json.loads(config_json)))
        setup = setups[config_json]
        cid = int(task_rec["client_id"])
        task = ClientTask(
            str(task_rec["phase"]), cid, tensors_from_record(msg.content["message"]),
            tensors_from_record(msg.content["held"]), float(task_rec["lr"]),
        )  # fmt: skip
        state = tensors_from_record(msg.content["state"])
        gen = torch.Generator()
        gen.set_state(tensors_from_record(msg.content["rng"])["round"])
        error, reply = "", ClientReply({}, {})
        try:
            reply, state = setup.federation.client(task, setup.clients[cid], state, gen)
        except NonFiniteError as err:
            error = str(err.args[0])
        content = RecordDict({
            "reply": tensors_to_record(reply.tensors),
            "state": tensors_to_record(state),
            "rng": tensors_to_record({"round": gen.get_state()}),
            "metrics": MetricRecord({k: float(v) for k, v in reply.metrics.items()}),
            "status": ConfigRecord({"error": error}),
        })  # fmt: skip
        return Message(content, reply_to=msg)

    return app


def run_flower(num_nodes: int, server_loop: Callable[[Callable[[str], Execute]], Any]) -> Any:
    """Run ``server_loop(for_config)`` as a Flower ServerApp against ``num_nodes`` simulated
    SuperNodes running :func:`make_client_app` (Flower's simulation engine, Ray backend with
    one CPU; ``for_config`` from :func:`make_execute`); returns what ``server_loop`` returned.

    Ray gives its node 30 s to start (hard-coded in Ray); on a loaded machine that can fail.
    An engine that fails before the first client replied did no client work (the server loop
    may have written the run's round 0, which the next attempt resumes from, bit for bit),
    so it is started again, up to :data:`START_ATTEMPTS` times in all. Whatever
    happens (a finished run, an error, a failed start, Ctrl-C), the engine is left behind
    completely: the ServerApp's waits end, Ray is shut down and every process it started in
    this call is reaped (:func:`reaped_children`).

    Raises:
        FlowerEngineError: the engine failed (one line naming the cause).
    """
    _require_flwr()
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return run_engine_once(num_nodes, server_loop)
        except EngineStartError as failed:
            if attempt == START_ATTEMPTS:
                raise FlowerEngineError(
                    f"Flower's simulation engine failed to start ({failed.args[0]}), "
                    f"{attempt} attempt(s); rerun when the machine is less loaded, or use "
                    "--engine builtin"
                ) from None
    raise AssertionError("unreachable")


START_ATTEMPTS = 3
"""How many times :func:`run_flower` starts the engine when it fails before the first client
replied."""
_JOIN_S = 120.0
"""How long a failed attempt's ServerApp thread gets to finish before the next attempt."""


class EngineStartError(FlowerEngineError):
    """The engine failed before the first client replied (no client work was used), so
    :func:`run_flower` may start it again."""


def run_engine_once(
    num_nodes: int, server_loop: Callable[[Callable[[str], Execute]], Any]
) -> Any:
    """One start of the simulation engine (:func:`run_flower` without the retry).

    Raises:
        EngineStartError: the engine failed before the first client replied.
        FlowerEngineError: it failed later (one line).
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    server = ServerApp()
    result: dict[str, Any] = {}
    errors: list[BaseException] = []
    stop, replied = threading.Event(), threading.Event()
    server_threads: list[threading.Thread] = []

    @server.main()
    def main(grid: Any, context: Any) -> None:  # noqa: ARG001 (Flower's signature)
        server_threads.append(threading.current_thread())
        try:
            result["value"] = server_loop(make_execute(grid, num_nodes, stop, replied))
        except BaseException as err:  # re-raised in the calling thread below
            errors.append(err)

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 1, "num_gpus": 0}}  # fmt: skip
    with reaped_children():
        try:
            run_simulation(server, make_client_app(), num_supernodes=num_nodes,
                           backend_config=backend)  # fmt: skip
        except RuntimeError as err:
            cause = _root_cause(err)
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            if not replied.is_set():
                stop.set()
                for thread in server_threads:  # nothing may still write when we retry
                    thread.join(_JOIN_S)
                raise EngineStartError(f"{type(cause).__name__}: {first}") from None
            if errors:  # the server loop's own error explains more than Flower's wrapper
                raise errors[0] from None
            raise FlowerEngineError(
                f"Flower's simulation engine failed ({type(cause).__name__}: {first}); "
                "rerun, or use --engine builtin"
            ) from None
        finally:
            stop.set()
            _shutdown_ray()
    if errors:
        raise errors[0]
    if "value" not in result:
        raise FlowerEngineError("the Flower ServerApp ended without finishing the run")
    return result["value"]


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception Flower's wrappers ("Simulation Runtime crashed.") chain to."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def _shutdown_ray() -> None:
    ray = sys.modules.get("ray")  # only if Flower imported it; never import it here
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@contextmanager
def reaped_children() -> Iterator[None]:
    """On exit, terminate (then kill) every descendant process of this one that was not there
    on entry: what Ray started and ``ray.shutdown()`` left behind (a raylet or GCS server
    whose start timed out keeps running otherwise, and holds the terminal's pipes open)."""
    import psutil

    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    finally:
        new = [p for p in me.children(recursive=True) if p.pid not in before]
        for p in new:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(new, timeout=_REAP_WAIT_S)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=_REAP_WAIT_S)
