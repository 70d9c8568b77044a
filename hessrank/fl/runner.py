"""Federated training into a run directory: checks, locks, resume, the rounds, checkpoints.

The parts it puts together: :func:`hessrank.fl.setup.build_setup` (config → data, partition,
model, algorithm), :meth:`hessrank.fl.loop.Federation.round` (one round),
:func:`hessrank.fl.evaluation.evaluate` (the metrics), :class:`hessrank.fl.rundir.RunWriter`
(the files) and the engine (:data:`ENGINES`).

Reproducibility contract: everything random is a function of ``config.seed``. The model is
built right after ``torch.manual_seed(seed)``; the partition and the dataset take the seed;
factor initializations use their own seeded generators; every draw during training (client
sampling, batch order, FedLoRU's redraws) comes from one *round generator* whose state is
stored in every checkpoint together with torch's global RNG state and the client states. On
CPU, the same config gives bit-for-bit the same weights under either engine, and a run killed
after checkpoint k and resumed gives the same weights as an uninterrupted one.

Example:
    >>> from hessrank.fl import train                                  # doctest: +SKIP
    >>> run = train({"algo": "fedloru", "rounds": 10}, "runs/demo")    # doctest: +SKIP
    >>> run.metrics()[["round", "test_accuracy"]]                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import Tensor

from hessrank.fl.config import TrainConfig
from hessrank.fl.divergence import DivergedError, DivergenceGuard
from hessrank.fl.evaluation import evaluate
from hessrank.fl.loop import RoundObserver, UpdateRecorder, learning_rate, sample_clients
from hessrank.fl.protocol import (
    ClientStates,
    Execute,
    NonFiniteError,
    RoundStats,
    Strategy,
    first_non_finite,
)
from hessrank.fl.provenance import finish_record, start_record, write_provenance
from hessrank.fl.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    PARTITION_FILE,
    Checkpoint,
    RunDir,
    RunWriter,
    check_history,
)
from hessrank.fl.setup import Setup, build_setup
from hessrank.progress import progress as progress_bar

__all__ = ["ENGINES", "LOCK_FILE", "train", "train_many"]

ENGINES = ("builtin", "flower")
"""``builtin``: client work in this process; ``flower``: every client task runs in a Flower
ClientApp under Flower's simulation engine (:mod:`hessrank.fl.flower`), same results."""

LOCK_FILE = ".train.lock"
_ROUND_SEED_OFFSET = 1_000_003  # round generator seed = seed + offset: a stream of its own

Callback = Callable[[int, Strategy], None]


def train(
    config: TrainConfig | dict,
    out: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    command: list[str] | None = None,
    engine: str = "builtin",
) -> RunDir:
    """Run (or resume) federated training and write a run directory.

    Args:
        config: a :class:`TrainConfig` or its dict form (not modified; the algorithm's notes
            go into the copy saved as ``out/config.json``).
        out: the run directory (created if needed).
        resume: if ``out`` holds a run with the same config, continue from its last
            checkpoint (metrics after it are dropped); a run already at ``config.rounds`` is
            returned as is. With ``resume=False`` an existing run of the same config is
            restarted from scratch (its checkpoints, updates and metrics are deleted).
        progress: show progress over rounds (a bar on a terminal, periodic lines otherwise).
        callback: called as ``callback(round, strategy)`` after each round is logged and
            checkpointed (tests use it to simulate a kill).
        device: where model and data live ("cpu", "cuda", "cuda:1"); not part of the config
            (a run may resume elsewhere), recorded in ``provenance.json``.
        threads: ``torch.set_num_threads`` for the run (None: leave torch's setting); the
            weights depend on it, so it is recorded in ``provenance.json``.
        command: the command line to record (default ``sys.argv``).
        engine: ``builtin`` or ``flower`` (:data:`ENGINES`; Flower's simulation engine runs
            the client work in ClientApps, same run directory and weights; needs the
            ``flwr[simulation]`` package and the CPU).
    Returns:
        :class:`~hessrank.fl.rundir.RunDir` of ``out``.
    Raises:
        OSError: ``out`` cannot be written (PermissionError, NotADirectoryError when a file is
            in the way, ENOSPC/EFBIG when the disk or ``ulimit -f`` is full).
        ValueError: invalid config or device; ``out`` holds a run with a different config,
            a damaged history or a non-finite, misshapen or foreign last checkpoint; another
            process is training into ``out``; or training diverged
            (:class:`~hessrank.fl.protocol.NonFiniteError`: the message names round and
            client and the last finite checkpoint is kept; its subclass
            :class:`~hessrank.fl.divergence.DivergedError` when a loss or weight passed the
            ``divergence_factor`` / ``weight_bound`` checks while still finite).
    """
    return train_many(
        [(config, out)], resume=resume, progress=progress, callback=callback, device=device,
        threads=threads, command=command, engine=engine,
    )[0]  # fmt: skip


def train_many(
    jobs: Sequence[tuple[TrainConfig | dict, str | Path]],
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    command: list[str] | None = None,
    engine: str = "builtin",
    execute_for: Callable[[str], Execute] | None = None,
) -> list[RunDir]:
    """:func:`train` for several (config, out) pairs one after the other; with
    ``engine="flower"`` all of them run in one Flower simulation (one start-up), each its
    own run directory. Every config and directory is checked and locked before any work.

    ``execute_for`` (with ``engine="flower"``): the runs are already inside a Flower
    ServerApp (deployment, :mod:`hessrank.fl.flower_app`); ``execute_for(config_json)`` is
    the ``execute`` of the run with that config (:func:`hessrank.fl.flower.make_execute`)."""
    configs = []
    for config, out in jobs:
        cfg = TrainConfig.from_dict(copy.deepcopy(config)) if isinstance(config, dict) else (
            copy.deepcopy(config)
        )
        TrainConfig.from_dict(cfg.to_dict())  # re-validate a config mutated after construction
        configs.append((cfg, Path(out)))
    dev = _resolve_device(device)
    for _ in configs:
        _check_engine(engine, dev)
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ValueError(f"threads must be >= 1, got {threads}")
    if len({out.resolve() for _, out in configs}) != len(configs):
        raise ValueError("two runs write the same --out directory")
    previous_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        for _, out in configs:
            _check_out(out)
            _open_out(out)
            lock = FileLock(str(out / LOCK_FILE))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ValueError(
                    f"another process is training into {out} (lock {out / LOCK_FILE}); wait "
                    "for it to finish or choose another --out"
                ) from None
            stack.callback(lock.release)
        stack.callback(torch.set_num_threads, previous_threads)
        if threads is not None:
            torch.set_num_threads(int(threads))

        def loop(execute_for: Callable[[str], Execute] | None = None) -> list[RunDir]:
            return [
                _train_locked(cfg, out, resume, progress, callback, dev, command,
                              None if execute_for is None else
                              execute_for(json.dumps(cfg.to_dict())))
                for cfg, out in configs
            ]  # fmt: skip

        if execute_for is not None:
            if engine != "flower":
                raise ValueError("execute_for needs engine='flower'")
            return loop(execute_for)
        if engine == "flower":
            from hessrank.fl.flower import run_flower  # imports Flower only when it is used

            return run_flower(max(cfg.clients for cfg, _ in configs), loop)
        return loop()


# ---- checks before any work -------------------------------------------------------------------
def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` parsed and checked to exist (one-line errors, before any work)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err}); use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported for training; use cpu or cuda")
    return dev


def _check_engine(engine: str, device: torch.device) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    if engine == "builtin":
        return
    if device.type != "cpu":
        raise ValueError("--engine flower runs on the CPU only; use --device cpu")
    if importlib.util.find_spec("flwr") is None:
        raise ValueError(
            "--engine flower needs Flower: pip install 'flwr[simulation]==1.41.0' (in "
            "hessrank's dev extra)"
        )


def _check_out(out: Path) -> None:
    """``out`` must be a directory or creatable as one (checked before any work).

    Raises:
        NotADirectoryError: ``out`` or one of its ancestors is a file.
    """
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))


def _open_out(out: Path) -> None:
    """Create ``out`` and prove it is writable (OSError, e.g. PermissionError, if not)."""
    out.mkdir(parents=True, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=out, prefix=".probe.", delete=True)
    probe.close()


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """Fields that must agree for a resume: all but ``notes`` (written by the algorithms) and
    ``rounds`` (a run may be extended), unless a cosine schedule depends on ``rounds``."""
    d = config.to_dict()
    d.pop("notes")
    for key in ("divergence_factor", "weight_bound"):  # a stopped run may resume with others
        d.pop(key)
    if config.lr_schedule != "cosine":
        d.pop("rounds")
    return json.loads(json.dumps(d))  # tuples → lists, as after a JSON round trip


def _check_same(saved: TrainConfig, config: TrainConfig, out: Path) -> None:
    a, b = _comparable(saved), _comparable(config)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ValueError(
            f"{out} holds a run with a different config ({shown}); choose another --out or "
            "delete that directory"
        )


# ---- one run ----------------------------------------------------------------------------------
def _rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    return {"round": generator.get_state(), "torch": torch.get_rng_state()}


def _metrics_row(
    round_idx: int,
    evaluation: dict[str, Any],
    cum: dict[str, int],
    lr: float | None = None,
    sampled: Sequence[int] = (),
    stats: RoundStats | None = None,
) -> dict[str, Any]:
    """One line of metrics.jsonl (round 0: the initialization, no round statistics)."""
    up = stats.floats_up if stats else {}
    down = stats.floats_down if stats else {}
    return {"round": round_idx, **evaluation, "lr": lr, "sampled": list(sampled),
            "floats_up": {str(k): v for k, v in up.items()},
            "floats_down": {str(k): v for k, v in down.items()},
            "floats_up_total": sum(up.values()), "floats_down_total": sum(down.values()),
            "cum_floats_up": cum["up"], "cum_floats_down": cum["down"],
            "cum_floats": cum["up"] + cum["down"], "ranks": dict(stats.ranks) if stats else {},
            "local_loss": stats.train_loss if stats else None,
            "extra": dict(stats.extra) if stats else {}}  # fmt: skip


def _save(
    setup: Setup,
    writer: RunWriter,
    round_idx: int,
    snapshot: tuple[dict[str, Tensor], ClientStates, dict[str, Tensor], dict[str, int]],
) -> None:
    """Checkpoint the server state, client states, RNG states and counters of ``snapshot``
    (the server state is loaded first, so the ``model.*`` entries are its effective model)."""
    state, states, rng, cum = snapshot
    strategy = setup.federation.strategy
    writer.checkpoint(
        round_idx, model_state=strategy.effective_model().state_dict(), algo_state=state,
        client_states=states.tensors(), rng=rng, algo=setup.config.algo,
        metadata={"input_shape": list(setup.input_shape), "num_outputs": setup.num_outputs,
                  "cum_floats_up": cum["up"], "cum_floats_down": cum["down"]},
    )  # fmt: skip


def _restore(setup: Setup, path: Path, ckpt: Checkpoint) -> None:
    """Load a checkpoint's server and client states (one-line errors naming the file)."""
    bad = first_non_finite({**ckpt.state, **ckpt.clients})
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} holds non-finite values ({bad!r}); refusing to resume from it: "
            "delete that file to resume from an earlier checkpoint, or use --no-resume"
        )
    fed = setup.federation
    try:
        fed.strategy.load_state_tensors(ckpt.state)
        states = ClientStates.from_tensors(ckpt.clients)
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err.args[0] if err.args else err).strip().splitlines()[0]
        raise ValueError(
            f"checkpoint {path} does not fit this run's model ({first}); delete it or use "
            "--no-resume"
        ) from None
    if ckpt.legacy:  # written before client states were saved: tiers come from the config
        for cid in fed.states:
            if not states.get(cid):
                states.put(cid, fed.states.get(cid))
    fed.states = states


def _train_locked(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    progress: bool,
    callback: Callback | None,
    device: torch.device,
    command: list[str] | None,
    execute: Execute | None = None,
) -> RunDir:
    saved_rounds: list[int] = []
    partition_json = None
    if (out / CONFIG_FILE).is_file():
        existing = RunDir(out)
        _check_same(existing.config, cfg, out)
        cfg.notes = {**existing.config.notes, **cfg.notes}
        if resume:
            saved_rounds = existing.rounds()
            if (out / PARTITION_FILE).is_file() and saved_rounds:
                partition_json = json.loads((out / PARTITION_FILE).read_text())
    if saved_rounds and saved_rounds[-1] >= cfg.rounds:
        check_history(out / METRICS_FILE, saved_rounds[-1])
        return RunDir(out)

    setup = build_setup(cfg, partition_json, device)
    fed, writer = setup.federation, RunWriter(out, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + _ROUND_SEED_OFFSET)
    cum = {"up": 0, "down": 0}
    start = saved_rounds[-1] if saved_rounds else 0
    rows: list[dict[str, Any]] = []
    if saved_rounds:
        rows = check_history(out / METRICS_FILE, start)
        run = RunDir(out)
        ckpt = run.checkpoint(start)
        _restore(setup, run.checkpoint_path(start), ckpt)
        gen.set_state(ckpt.rng["round"])
        torch.set_rng_state(ckpt.rng["torch"])
        cum = {"up": int(json.loads(ckpt.meta["cum_floats_up"])),
               "down": int(json.loads(ckpt.meta["cum_floats_down"]))}  # fmt: skip
    elif (out / CONFIG_FILE).is_file() and not resume:
        writer.clear()
    # everything is validated and built: from here on the run directory is written
    writer.write_config(cfg)
    record = start_record(cfg, setup.dataset, device, command,
                          resumed_from=start if saved_rounds else None)  # fmt: skip
    write_provenance(out, record)
    if saved_rounds:
        writer.write_metrics(rows)  # drops the rows of rounds after the checkpoint
    else:
        writer.write_partition(setup.partition)
        t0 = time.perf_counter()
        row = _metrics_row(0, evaluate(setup), cum)
        row["seconds"] = time.perf_counter() - t0
        writer.write_metrics([row])
        _save(setup, writer, 0, (fed.strategy.state_tensors(), fed.states, _rng_state(gen), cum))

    recorder = UpdateRecorder() if cfg.record_updates else None
    observers: list[RoundObserver] = [recorder] if recorder is not None else []
    initial = rows[0] if saved_rounds else row  # round 0's metrics row
    guard = DivergenceGuard.from_config(cfg, initial.get("train_loss"))
    observers.append(guard)
    last_saved = start
    previous = (fed.strategy.state_tensors(), fed.states.copy(), _rng_state(gen), dict(cum))
    desc = f"{cfg.algo} rounds" + (f" {start + 1}-{cfg.rounds}" if start else "")
    bar = progress_bar(range(start + 1, cfg.rounds + 1), desc=desc, unit="round",
                       disable=not progress)  # a bar on a terminal, plain lines in a log
    for t in bar:
        t0 = time.perf_counter()
        lr = learning_rate(cfg, t)
        sampled = sample_clients(cfg.clients, cfg.client_fraction, gen)
        evaluated = t % cfg.eval_every == 0 or t == cfg.rounds
        try:
            stats = fed.round(t, [setup.clients[i] for i in sampled], lr, gen, execute,
                              observers)  # fmt: skip
            state = fed.strategy.state_tensors()
            bad = first_non_finite(state)
            if bad is not None:
                raise NonFiniteError(f"the aggregated state has non-finite values in {bad!r}")
            guard.check_weights(state, "the aggregated model")
            ev = evaluate(setup) if evaluated else {
                "train_loss": None, "test_loss": None, "test_accuracy": None
            }
            guard.check_loss(ev["train_loss"], "the training loss of the aggregated model")
        except NonFiniteError as err:
            bar.close()
            if t - 1 > last_saved:  # keep the state after round t - 1, the last good one
                fed.strategy.load_state_tensors(previous[0])
                _save(setup, writer, t - 1, previous)
                last_saved = t - 1
            kind = DivergedError if isinstance(err, DivergedError) else NonFiniteError
            way_out = ("lower --lr, or raise --divergence-factor / --weight-bound (0: off)"
                       if kind is DivergedError else "lower --lr")  # fmt: skip
            raise kind(
                f"training diverged in round {t} (lr {lr:g}): {err.args[0]}; stopped, the last "
                f"{'good' if kind is DivergedError else 'finite'} checkpoint is round "
                f"{last_saved} in {out}; {way_out}",
                client_id=err.client_id,
            ) from None
        if recorder is not None:
            writer.updates(t, recorder.updates)
        cum["up"] += sum(stats.floats_up.values())
        cum["down"] += sum(stats.floats_down.values())
        row = _metrics_row(t, ev, cum, lr, sampled, stats)
        row["seconds"] = time.perf_counter() - t0
        writer.append_metrics(row)
        previous = (state, fed.states.copy(), _rng_state(gen), dict(cum))
        if t % cfg.save_every == 0 or t == cfg.rounds:
            _save(setup, writer, t, previous)
            last_saved = t
        if evaluated:
            shown = ev["test_accuracy"] if ev["test_accuracy"] is not None else ev["test_loss"]
            bar.set_postfix(train_loss=f"{ev['train_loss']:.4f}", test=f"{shown:.4f}")
        if callback is not None:
            callback(t, fed.strategy)
    bar.close()
    finish_record(out, record)
    return RunDir(out)
