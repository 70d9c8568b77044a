"""The federated training loop: setup, client sampling, rounds, evaluation, checkpoints, resume.

Reproducibility contract: everything random is a function of ``config.seed``. The model is
built right after ``torch.manual_seed(seed)``; the partition and the dataset take the seed;
factor initializations use their own seeded generators; every draw during training (client
sampling, batch order, FedLoRU's redraws) comes from one *round generator* whose state is
stored in every checkpoint together with torch's global RNG state. On CPU, the same config
gives bit-for-bit the same weights, and a run killed after checkpoint k and resumed gives the
same weights as an uninterrupted one.

Example:
    >>> from hessrank.fl import train                                  # doctest: +SKIP
    >>> run = train({"algo": "fedloru", "rounds": 10}, "runs/demo")    # doctest: +SKIP
    >>> run.metrics()[["round", "test_accuracy"]]                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import importlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor, nn

from hessrank.data.task import ClassificationTask
from hessrank.fl.base import (
    ClientData,
    Execute,
    FederatedAlgorithm,
    NonFiniteError,
    first_non_finite,
)
from hessrank.fl.config import ALGORITHM_REGISTRY, TrainConfig
from hessrank.fl.provenance import finish_record, start_record, write_provenance
from hessrank.fl.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PARTITION_FILE,
    UPDATES_DIR,
    RunDir,
    read_checkpoint,
    read_metrics,
    save_checkpoint,
    save_client_updates,
)
from hessrank.io import atomic_write_text, split_prefix
from hessrank.progress import progress as progress_bar

__all__ = [
    "ALGORITHM_CLASSES",
    "ENGINES",
    "algorithm_class",
    "build_setup",
    "label_weighted_accuracy",
    "learning_rate",
    "sample_clients",
    "train",
    "train_many",
]

ALGORITHM_CLASSES = ALGORITHM_REGISTRY
"""Alias of :data:`hessrank.fl.config.ALGORITHM_REGISTRY` (one registry)."""

ENGINES = ("builtin", "flower")
"""``builtin``: client work in this process; ``flower``: every client task runs in a Flower
ClientApp under Flower's simulation engine (:mod:`hessrank.fl.flower`), same results."""

_ROUND_SEED_OFFSET = 1_000_003  # round generator seed = seed + offset: a stream of its own
_EVAL_BATCH = 2048

Callback = Callable[[int, FederatedAlgorithm], None]


def algorithm_class(name: str) -> type[FederatedAlgorithm]:
    """The class registered under ``name`` (imported lazily)."""
    if name not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; valid names: {', '.join(ALGORITHM_CLASSES)}")
    module_name, _, cls_name = ALGORITHM_CLASSES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"algorithm {name!r} is not available in this build ({err})") from None
    return getattr(module, cls_name)


def sample_clients(num_clients: int, fraction: float, generator: torch.Generator) -> list[int]:
    """max(1, ⌊C·K⌋) distinct client ids drawn uniformly without replacement, ascending.

    Always consumes one ``torch.randperm(K, generator)``, also for C = 1.
    """
    m = max(1, math.floor(fraction * num_clients + 1e-9))
    perm = torch.randperm(num_clients, generator=generator)
    return sorted(int(i) for i in perm[:m])


def learning_rate(config: TrainConfig, round_idx: int) -> float:
    """Learning rate of round t = 1..T.

    constant: λ; cosine: λ·½(1 + cos(π·(t−1)/T)); step: λ·decay^⌊(t−1)/step_every⌋.
    """
    t, total = round_idx - 1, max(config.rounds, 1)
    if config.lr_schedule == "constant":
        return float(config.lr)
    if config.lr_schedule == "cosine":
        return float(config.lr * 0.5 * (1.0 + math.cos(math.pi * t / total)))
    if config.lr_schedule == "step":
        return float(config.lr * config.lr_decay ** (t // max(config.lr_step_every, 1)))
    raise ValueError(
        f"unknown lr_schedule {config.lr_schedule!r}; choose constant, cosine or step"
    )


# ---- setup -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Setup:
    config: TrainConfig
    dataset: Any
    partition: Any
    algorithm: FederatedAlgorithm
    clients: list[ClientData]
    test: tuple[Tensor, Tensor]
    train: tuple[Tensor, Tensor]
    input_shape: tuple[int, ...]
    num_outputs: int
    validation: tuple[Tensor, Tensor] | None = None
    holdout: list[tuple[Tensor, Tensor]] | None = None


def _split_data(config: TrainConfig, labels: Any) -> tuple[Any, np.ndarray]:
    """The partition over the samples left after the validation split, in dataset indices,
    with per-client holdouts (see :func:`held_out_partition`); and the validation indices."""
    from hessrank.data.partition import Partition, make_partition

    n = int(labels.shape[0])
    pool, val = np.arange(n), np.zeros(0, dtype=np.int64)
    if config.validation_fraction > 0:
        perm = np.random.default_rng([config.seed, 7]).permutation(n)
        k = min(max(1, round(config.validation_fraction * n)), n - config.clients)
        val, pool = np.sort(perm[:k]), np.sort(perm[k:])
    part = make_partition(
        labels[torch.as_tensor(pool)], config.clients, config.partition,
        alpha=config.dirichlet_alpha, shards_per_client=config.shards_per_client,
        min_size=config.min_client_size, seed=config.seed,
    )  # fmt: skip
    if config.validation_fraction == 0 and config.client_holdout == 0:
        return part, val
    indices, holdout = [pool[idx] for idx in part.indices], []
    for c, idx in enumerate(indices):
        if config.client_holdout > 0:
            perm = np.random.default_rng([config.seed, 11, c]).permutation(idx)
            k = min(round(config.client_holdout * len(idx)), len(idx) - 1)
            holdout.append(np.sort(perm[:k]).tolist())
            indices[c] = np.sort(perm[k:])
    params = {**part.params, "validation_fraction": config.validation_fraction,
              "validation_indices": val.tolist(), "client_holdout": config.client_holdout,
              "holdout_indices": holdout}  # fmt: skip
    return Partition(part.scheme, part.num_clients, part.seed, tuple(indices), params), val


def _cast(t: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def _build(
    config: TrainConfig, partition_json: dict | None, device: torch.device | None = None
) -> _Setup:
    from hessrank.data.datasets import load_dataset
    from hessrank.data.partition import Partition
    from hessrank.models import build_model

    dtype = getattr(torch, str(config.dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {config.dtype!r}; use float32 or float64")
    if config.lr_schedule not in ("constant", "cosine", "step"):
        raise ValueError(
            f"unknown lr_schedule {config.lr_schedule!r}; choose constant, cosine or step"
        )
    for name in ("rounds", "batch_size", "save_every", "eval_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    ds = load_dataset(
        config.dataset, root=config.data_root, seed=config.seed, **config.dataset_kwargs
    )
    if partition_json is not None:
        part = Partition.from_json(partition_json)
    else:
        labels = ds.meta.get("train_groups", ds.train_y)  # hetero-lsq: split by group
        part, _ = _split_data(config, labels)
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, ds.input_shape, ds.output_dim, **config.model_kwargs)
        model = model.to(dtype=dtype, device=device)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a dry forward pass
            model.eval()(_cast(ds.train_x[:2], dtype, device))
        model.train()
    except (TypeError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"model {config.model!r} with model_kwargs {config.model_kwargs} does not fit "
            f"dataset {config.dataset!r} (inputs {tuple(ds.input_shape)}, {ds.output_dim} "
            f"outputs): {first}"
        ) from None
    algorithm = algorithm_class(config.algo)(model, config)
    algorithm.loss_fn = ds.task
    clients = []
    for cid, idx in enumerate(part.indices):
        index = torch.as_tensor(idx, dtype=torch.long)
        x = _cast(ds.train_x[index], dtype, device)
        y = _cast(ds.train_y[index], dtype, device)
        clients.append(ClientData(cid, x, y))
    def subset(idx: Any) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return _cast(ds.train_x[index], dtype, device), _cast(ds.train_y[index], dtype, device)

    val_idx = part.params.get("validation_indices") or []
    holdout_idx = part.params.get("holdout_indices") or []
    split = bool(val_idx) or bool(holdout_idx)
    return _Setup(
        config, ds, part, algorithm, clients,
        test=(_cast(ds.test_x, dtype, device), _cast(ds.test_y, dtype, device)),
        train=subset(np.concatenate(part.indices)) if split else (
            _cast(ds.train_x, dtype, device), _cast(ds.train_y, dtype, device)),
        input_shape=tuple(ds.input_shape), num_outputs=ds.output_dim,
        validation=subset(val_idx) if val_idx else None,
        holdout=[subset(h) for h in holdout_idx] if holdout_idx else None,
    )  # fmt: skip


def build_setup(config: TrainConfig) -> _Setup:
    """Data, partition and algorithm of ``config`` on the CPU, exactly as a run builds them
    (a Flower ClientApp rebuilds a run's clients with it)."""
    return _build(config, None)


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """Fields that must agree for a resume: all but ``notes`` (written by the algorithms) and
    ``rounds`` (a run may be extended), unless a cosine schedule depends on ``rounds``."""
    d = config.to_dict()
    d.pop("notes")
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


# ---- evaluation and logging ---------------------------------------------------------------
def _personalized(algorithm: FederatedAlgorithm) -> bool:
    return type(algorithm).client_model is not FederatedAlgorithm.client_model


@torch.no_grad()
def label_weighted_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, client_targets: Tensor, num_classes: int
) -> float:
    """Accuracy on (x, y) reweighted to a client's label distribution:
    Σ_k p_c(k)·acc(k), with acc(k) the accuracy on test samples of class k and p_c the label
    histogram of the client's training data — the client's own test distribution under label
    skew, estimated from the shared test set."""
    model.eval()
    task = ClassificationTask()
    out = torch.cat([task.forward(model, x[i : i + _EVAL_BATCH])
                     for i in range(0, len(x), _EVAL_BATCH)])  # fmt: skip
    hits = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(
        0, y, task.correct(out, y)
    )
    per_class = hits / torch.bincount(y, minlength=num_classes).clamp(min=1).to(torch.float64)
    hist = torch.bincount(client_targets, minlength=num_classes).to(torch.float64)
    return float((per_class * hist).sum() / hist.sum())


def _personal_eval(setup: _Setup) -> dict[str, float]:
    """Personalized evaluation (pFedLoRU): client c's own model, mean over clients of
    :func:`label_weighted_accuracy` (classification) or of the test loss (regression)."""
    ds, algo = setup.dataset, setup.algorithm
    x, y = setup.test
    scores = []
    for client in setup.clients:
        model = algo.client_model(client.client_id)
        if isinstance(ds.task, ClassificationTask):
            scores.append(label_weighted_accuracy(model, x, y, client.targets, ds.num_classes))
        else:
            scores.append(ds.task.evaluate(model, x, y)["loss"])
    key = ("personal_test_accuracy" if isinstance(ds.task, ClassificationTask)
           else "personal_test_loss")  # fmt: skip
    return {key: float(np.mean(scores))}


def _eval_row(setup: _Setup) -> dict[str, Any]:
    model = setup.algorithm.effective_model()
    task = setup.dataset.task
    tr = task.evaluate(model, *setup.train)
    te = task.evaluate(model, *setup.test)
    row: dict[str, Any] = {
        "train_loss": tr["loss"],
        "test_loss": te["loss"],
        "test_accuracy": te.get("accuracy"),
    }
    if setup.validation is not None:
        va = task.evaluate(model, *setup.validation)
        row.update({"val_loss": va["loss"], "val_accuracy": va.get("accuracy")})
    if setup.holdout is not None:
        row.update(_holdout_eval(setup, model))
    if _personalized(setup.algorithm):
        row.update(_personal_eval(setup))
    return row


def _holdout_eval(setup: _Setup, global_model: nn.Module) -> dict[str, Any]:
    """Per-client evaluation on each client's own held-out samples (``client_holdout``): the
    client's own model for personalized algorithms, the global model otherwise. Logs the
    per-client values and their unweighted mean over clients."""
    algo, task = setup.algorithm, setup.dataset.task
    key = task.metric
    per_client = {}
    for client, (x, y) in zip(setup.clients, setup.holdout or []):
        if x.shape[0] == 0:
            continue
        model = algo.client_model(client.client_id) if _personalized(algo) else global_model
        per_client[str(client.client_id)] = task.evaluate(model, x, y)[key]
    mean = float(np.mean(list(per_client.values()))) if per_client else None
    return {f"client_holdout_{key}": per_client, f"holdout_{key}_mean": mean}


def _rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    return {"round": generator.get_state(), "torch": torch.get_rng_state()}


def _save(setup: _Setup, out: Path, round_idx: int, gen: torch.Generator, cum: dict) -> None:
    algo = setup.algorithm
    save_checkpoint(
        out, round_idx,
        model_state=algo.effective_model().state_dict(),
        algo_state=algo.state_tensors(),
        rng=_rng_state(gen),
        algo=setup.config.algo,
        metadata={
            "input_shape": list(setup.input_shape), "num_outputs": setup.num_outputs,
            "cum_floats_up": cum["up"], "cum_floats_down": cum["down"],
        },
    )  # fmt: skip


def _append_metrics(out: Path, row: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


# ---- training --------------------------------------------------------------------------------
LOCK_FILE = ".train.lock"


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


def _check_finite_checkpoint(path: Path, tensors: dict[str, Tensor]) -> None:
    bad = first_non_finite({k: v for k, v in tensors.items() if not k.startswith("rng.")})
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} holds non-finite values ({bad!r}); refusing to resume from it: "
            "delete that file to resume from an earlier checkpoint, or use --no-resume"
        )


def _restore(algo: FederatedAlgorithm, path: Path, tensors: dict[str, Tensor]) -> None:
    """Load a checkpoint's algorithm state, mapping shape errors to one line naming the file."""
    try:
        algo.load_state_tensors(split_prefix(tensors, "state"))
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err.args[0] if err.args else err).strip().splitlines()[0]
        raise ValueError(
            f"checkpoint {path} does not fit this run's model ({first}); delete it or use "
            "--no-resume"
        ) from None


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
        callback: called as ``callback(round, algorithm)`` after each round is logged and
            checkpointed (tests use it to simulate a kill).
        device: where model and data live ("cpu", "cuda", "cuda:1"); not part of the config
            (a run may resume elsewhere), recorded in ``provenance.json``.
        threads: ``torch.set_num_threads`` for the run (None: leave torch's setting); the
            weights depend on it, so it is recorded in ``provenance.json``.
        command: the command line to record (default ``sys.argv``).
        engine: ``builtin`` or ``flower`` (:data:`ENGINES`; Flower's simulation engine runs
            the client work in ClientApps, same run directory and weights; needs the
            ``flwr[simulation]`` package, CPU and an algorithm with stateless clients).
    Returns:
        :class:`~hessrank.fl.rundir.RunDir` of ``out``.
    Raises:
        OSError: ``out`` cannot be written (PermissionError, NotADirectoryError when a file is
            in the way, ENOSPC/EFBIG when the disk or ``ulimit -f`` is full).
        ValueError: invalid config or device; ``out`` holds a run with a different
            config or a non-finite or misshapen last checkpoint; another process is training
            into ``out``; or training diverged (:class:`~hessrank.fl.base.NonFiniteError`:
            the message names round and client and the last finite checkpoint is kept).
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
    for cfg, _ in configs:
        _check_engine(engine, cfg, dev)
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
            from hessrank.fl.flower import run_flower

            return run_flower(max(cfg.clients for cfg, _ in configs), loop)
        return loop()


def _check_engine(engine: str, cfg: TrainConfig, device: torch.device) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    if engine == "builtin":
        return
    if not algorithm_class(cfg.algo).stateless_clients:
        raise ValueError(
            f"--engine flower cannot run {cfg.algo}: its clients keep state between rounds; "
            "use --engine builtin"
        )
    if device.type != "cpu":
        raise ValueError("--engine flower runs on the CPU only; use --device cpu")
    if importlib.util.find_spec("flwr") is None:
        raise ValueError(
            "--engine flower needs Flower: pip install 'flwr[simulation]==1.41.0' (in "
            "hessrank's dev extra)"
        )


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
        return RunDir(out)

    setup = _build(cfg, partition_json, device)
    algo = setup.algorithm
    gen = torch.Generator().manual_seed(cfg.seed + _ROUND_SEED_OFFSET)
    cum = {"up": 0, "down": 0}
    if saved_rounds:
        start = saved_rounds[-1]
        path = out / CHECKPOINT_DIR / f"round_{start:05d}.safetensors"
        tensors, meta = read_checkpoint(path)
        _check_finite_checkpoint(path, tensors)
        _restore(algo, path, tensors)
        rng = split_prefix(tensors, "rng")
        gen.set_state(rng["round"])
        torch.set_rng_state(rng["torch"])
        cum = {"up": int(json.loads(meta["cum_floats_up"])),
               "down": int(json.loads(meta["cum_floats_down"]))}  # fmt: skip
    elif (out / CONFIG_FILE).is_file() and not resume:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(out / UPDATES_DIR, ignore_errors=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
    # everything is validated and built: from here on the run directory is written
    atomic_write_text(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    record = start_record(cfg, setup.dataset, device, command, resumed_from=saved_rounds[-1]
                          if saved_rounds else None)  # fmt: skip
    write_provenance(out, record)
    if saved_rounds:
        rows = [r for r in read_metrics(out / METRICS_FILE) if r["round"] <= start] if (
            out / METRICS_FILE
        ).is_file() else []
        atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    else:
        start = 0
        atomic_write_text(
            out / PARTITION_FILE, json.dumps(setup.partition.to_json(), separators=(",", ":"))
        )
        t0 = time.perf_counter()
        row = {"round": 0, **_eval_row(setup), "lr": None, "sampled": [],
               "floats_up": {}, "floats_down": {}, "floats_up_total": 0, "floats_down_total": 0,
               "cum_floats_up": 0, "cum_floats_down": 0, "cum_floats": 0, "ranks": {},
               "local_loss": None, "extra": {}}  # fmt: skip
        row["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / METRICS_FILE, json.dumps(row) + "\n")
        _save(setup, out, 0, gen, cum)

    last_saved = start
    previous = (algo.state_tensors(), _rng_state(gen), dict(cum))  # state after round t - 1
    desc = f"{cfg.algo} rounds" + (f" {start + 1}-{cfg.rounds}" if start else "")
    bar = progress_bar(range(start + 1, cfg.rounds + 1), desc=desc, unit="round",
                       disable=not progress)  # a bar on a terminal, plain lines in a log
    for t in bar:
        t0 = time.perf_counter()
        lr = learning_rate(cfg, t)
        sampled = sample_clients(cfg.clients, cfg.client_fraction, gen)
        if cfg.record_updates:
            broadcast = algo.effective_model().state_dict()
            algo.record = {}
        try:
            stats = algo.run_round(t, [setup.clients[i] for i in sampled], lr, gen, execute)
            state = algo.state_tensors()
            bad = first_non_finite(state)
            if bad is not None:
                raise NonFiniteError(f"the aggregated state has non-finite values in {bad!r}")
        except NonFiniteError as err:
            algo.record = None
            bar.close()
            last_saved = _keep_last_finite(setup, out, t - 1, last_saved, previous)
            raise NonFiniteError(
                f"training diverged in round {t} (lr {lr:g}): {err.args[0]}; stopped, the last "
                f"finite checkpoint is round {last_saved} in {out}; lower --lr",
                client_id=err.client_id,
            ) from None
        if cfg.record_updates:
            save_client_updates(out, t, _updates(broadcast, algo.record))
            algo.record = None
        up, down = sum(stats.floats_up.values()), sum(stats.floats_down.values())
        cum["up"] += up
        cum["down"] += down
        evaluated = t % cfg.eval_every == 0 or t == cfg.rounds
        ev = _eval_row(setup) if evaluated else {
            "train_loss": None, "test_loss": None, "test_accuracy": None
        }
        row = {"round": t, **ev, "lr": lr, "sampled": sampled,
               "floats_up": {str(k): v for k, v in stats.floats_up.items()},
               "floats_down": {str(k): v for k, v in stats.floats_down.items()},
               "floats_up_total": up, "floats_down_total": down,
               "cum_floats_up": cum["up"], "cum_floats_down": cum["down"],
               "cum_floats": cum["up"] + cum["down"], "ranks": dict(stats.ranks),
               "local_loss": stats.train_loss, "extra": dict(stats.extra)}  # fmt: skip
        row["seconds"] = time.perf_counter() - t0
        _append_metrics(out, row)
        if t % cfg.save_every == 0 or t == cfg.rounds:
            _save(setup, out, t, gen, cum)
            last_saved = t
        previous = (state, _rng_state(gen), dict(cum))
        if evaluated:
            shown = ev["test_accuracy"] if ev["test_accuracy"] is not None else ev["test_loss"]
            bar.set_postfix(train_loss=f"{ev['train_loss']:.4f}", test=f"{shown:.4f}")
        if callback is not None:
            callback(t, algo)
    bar.close()
    finish_record(out, record)
    return RunDir(out)


def _updates(
    broadcast: dict[str, Tensor], clients: dict[int, dict[str, Tensor]]
) -> dict[int, dict[str, Tensor]]:
    """Δ_c = θ_c − θ per client and floating key (the format of hessrank.fl.rundir)."""
    return {
        cid: {k: state[k] - v for k, v in broadcast.items() if v.is_floating_point()}
        for cid, state in clients.items()
    }


def _keep_last_finite(
    setup: _Setup, out: Path, round_idx: int, last_saved: int, previous: tuple
) -> int:
    """On divergence in round ``round_idx + 1``: checkpoint the state after ``round_idx`` (the
    last finite one) unless it is saved already; returns the last saved round."""
    if round_idx <= last_saved:
        return last_saved
    state, rng, cum = previous
    setup.algorithm.load_state_tensors(state)
    algo = setup.algorithm
    save_checkpoint(
        out, round_idx,
        model_state=algo.effective_model().state_dict(), algo_state=state, rng=rng,
        algo=setup.config.algo,
        metadata={
            "input_shape": list(setup.input_shape), "num_outputs": setup.num_outputs,
            "cum_floats_up": cum["up"], "cum_floats_down": cum["down"],
        },
    )  # fmt: skip
    return round_idx
