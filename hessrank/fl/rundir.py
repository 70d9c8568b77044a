"""Run directories of the federated trainer: the format, its writer helpers and its reader.

Written by :mod:`hessrank.fl.runner`, read by the analysis (:mod:`hessrank.analysis.sources`);
imports no algorithm, so reading a run never imports the trainer. Layout (docs/design.md)::

    RUN/config.json                      TrainConfig (with the algorithm's notes)
    RUN/partition.json                   Partition.to_json() of the client split
    RUN/metrics.jsonl                    one JSON object per evaluated round
    RUN/checkpoints/round_00000.safetensors, round_00005.safetensors, ...
    RUN/updates/round_0001.safetensors, ...  (only with ``record_updates``)
    RUN/provenance.json                  versions, threads, device, command, data hash, times

A checkpoint holds ``model.<key>`` (the dense effective weights and buffers of the global
model, exactly the state_dict keys of ``build_model(config.model, ...)``), ``state.<name>``
(the algorithm's :meth:`state_tensors`, for resuming), ``rng.<name>`` (generator states) and
string metadata ``round``, ``algo``, ``input_shape`` (JSON), ``num_outputs`` and the
cumulative communication. Every file is written atomically (temporary file in the same
directory, fsync, ``os.replace``), so a killed run leaves either the old or the new file.

Client updates (``TrainConfig.record_updates``): ``updates/round_{t:04d}.safetensors`` holds,
for every client sampled in round t, its update to the dense effective weights,
``Δ_c = θ_c − θ``: the client's effective weights after its local training minus the
weights the server broadcast at the start of round t, one tensor per floating state_dict key
of the dense model (the keys of ``model.*`` in a checkpoint), stored as ``"{client_id}/{key}"``
in the run's dtype. For the LoRA family the factorized layers' entry is
(α/r)(B_c A_c − B A) (rank ≤ 2r; W0 and the personal pairs of pFedLoRU excluded), for FeDLRT
Ũ S̃_c Ṽᵀ − U S Vᵀ. Integer buffers are not recorded. String metadata: ``round``, ``clients``
(JSON list of the client ids). :func:`read_client_updates` reads it back.

Example:
    >>> run = RunDir("runs/x")                       # doctest: +SKIP
    >>> model = run.load_model(run.rounds()[-1])     # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hessrank.data.datasets import Dataset, load_dataset
from hessrank.data.partition import Partition
from hessrank.data.task import Task
from hessrank.fl.config import TrainConfig
from hessrank.io import read_tensors, split_prefix, write_tensors
from hessrank.models import build_model

if TYPE_CHECKING:
    import pandas

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PARTITION_FILE",
    "UPDATES_DIR",
    "RunDir",
    "checkpoint_path",
    "read_checkpoint",
    "read_client_updates",
    "read_metrics",
    "save_checkpoint",
    "save_client_updates",
]

CONFIG_FILE = "config.json"
PARTITION_FILE = "partition.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
UPDATES_DIR = "updates"
_CKPT_RE = re.compile(r"^round_(\d+)\.safetensors$")
_UPDATE_FILE = "round_{:04d}.safetensors"


def checkpoint_path(run: str | Path, round_idx: int) -> Path:
    """RUN/checkpoints/round_{round:05d}.safetensors."""
    return Path(run) / CHECKPOINT_DIR / f"round_{int(round_idx):05d}.safetensors"


def save_checkpoint(
    run: str | Path,
    round_idx: int,
    *,
    model_state: dict[str, Tensor],
    algo_state: dict[str, Tensor],
    rng: dict[str, Tensor],
    algo: str,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write round ``round_idx``'s checkpoint atomically and return its path.

    Args:
        model_state: dense effective state_dict of the global model (stored as ``model.*``).
        algo_state: the algorithm's state tensors (``state.*``).
        rng: generator states as uint8 tensors (``rng.*``).
        algo: algorithm name, stored in the metadata.
        metadata: extra JSON-serializable metadata (values stored as JSON strings).
    """
    tensors: dict[str, Tensor] = {}
    for prefix, group in (("model", model_state), ("state", algo_state), ("rng", rng)):
        for key, value in group.items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous().clone()
    meta = {"round": str(int(round_idx)), "algo": str(algo)}
    for key, value in (metadata or {}).items():
        meta[key] = json.dumps(value)
    path = checkpoint_path(run, round_idx)
    write_tensors(path, tensors, meta)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of one checkpoint file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable safetensors checkpoint (names the file).
    """
    path = Path(path)
    try:
        tensors, meta = read_tensors(path, "checkpoint")
    except ValueError as err:
        raise ValueError(
            f"{err.args[0]}; delete it to resume from the previous checkpoint"
        ) from None
    if "round" not in meta:
        raise ValueError(f"checkpoint {path} has no 'round' metadata; not written by hessrank")
    return tensors, meta


def updates_path(run: str | Path, round_idx: int) -> Path:
    """RUN/updates/round_{round:04d}.safetensors."""
    return Path(run) / UPDATES_DIR / _UPDATE_FILE.format(int(round_idx))


def save_client_updates(
    run: str | Path, round_idx: int, updates: dict[int, dict[str, Tensor]]
) -> Path:
    """Write round ``round_idx``'s client updates (client id → key → Δ tensor) atomically."""
    tensors = {
        f"{cid}/{key}": t.detach().cpu().contiguous().clone()
        for cid, per_client in sorted(updates.items())
        for key, t in per_client.items()
    }
    meta = {"round": str(int(round_idx)), "clients": json.dumps(sorted(int(c) for c in updates))}
    path = updates_path(run, round_idx)
    write_tensors(path, tensors, meta)
    return path


def read_client_updates(run_dir: str | Path, round_idx: int) -> dict[int, dict[str, Tensor]]:
    """Client id → dense parameter name → update Δ_c of round ``round_idx`` (module docstring).

    Raises:
        ValueError: the run recorded no updates for that round (lists the rounds it has), or
            the file is not readable.
    """
    path = updates_path(run_dir, round_idx)
    if not path.is_file():
        have = RunDir(run_dir).update_rounds() if (Path(run_dir) / CONFIG_FILE).is_file() else []
        raise ValueError(
            f"run {run_dir} has no client updates for round {round_idx} (rounds with updates: "
            f"{have}); train with --record-updates to record them"
        )
    try:
        tensors, _ = read_tensors(path, "update file")
    except ValueError as err:
        raise ValueError(f"{err.args[0]}; delete it") from None
    out: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        cid, _, key = name.partition("/")
        out.setdefault(int(cid), {})[key] = t
    return dict(sorted(out.items()))


class RunDir:
    """Reader of a run directory written by :func:`hessrank.fl.train`.

    Args:
        path: the run directory (holds ``config.json``).
    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it exists but is not a run directory (no or unreadable ``config.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run directory at {self.path}; train one first")
        cfg = self.path / CONFIG_FILE
        if not cfg.is_file():
            raise ValueError(
                f"{self.path} is not a run directory: it has no {CONFIG_FILE}; point at the "
                "directory given to `hessrank train --out`"
            )
        try:
            self.config: TrainConfig = TrainConfig.load(cfg)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{cfg} is not a valid TrainConfig JSON ({err})") from None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, algo={self.config.algo!r}, rounds={self.rounds()})"

    # ---- checkpoints --------------------------------------------------------------------
    def rounds(self) -> list[int]:
        """Rounds with a checkpoint, ascending (0 is the initialization)."""
        folder = self.path / CHECKPOINT_DIR
        if not folder.is_dir():
            return []
        found = (_CKPT_RE.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def update_rounds(self) -> list[int]:
        """Rounds with recorded client updates (``record_updates``), ascending."""
        folder = self.path / UPDATES_DIR
        if not folder.is_dir():
            return []
        found = (_CKPT_RE.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def client_updates(self, round: int) -> dict[int, dict[str, Tensor]]:
        """:func:`read_client_updates` of this run."""
        return read_client_updates(self.path, round)

    def checkpoint_path(self, round: int) -> Path:
        """Path of round ``round``'s checkpoint; ValueError listing the saved rounds if absent."""
        path = checkpoint_path(self.path, round)
        if not path.is_file():
            raise ValueError(
                f"run {self.path} has no checkpoint for round {round}; saved rounds: "
                f"{self.rounds()}"
            )
        return path

    def read(self, round: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Raw tensors and metadata of round ``round``'s checkpoint."""
        return read_checkpoint(self.checkpoint_path(round))

    def load_model(self, round: int, dtype: torch.dtype | None = None) -> nn.Module:
        """The dense global model after ``round`` rounds, in eval mode.

        Args:
            round: a saved round (see :meth:`rounds`).
            dtype: parameter dtype; default the run's ``config.dtype``.
        Raises:
            ValueError: no such round, corrupt file, or keys that do not match the model the
                config builds (the message names the file).
        """
        path = self.checkpoint_path(round)
        tensors, meta = read_checkpoint(path)
        state = split_prefix(tensors, "model")
        try:
            input_shape = tuple(json.loads(meta["input_shape"]))
            num_outputs = int(json.loads(meta["num_outputs"]))
        except KeyError as err:
            raise ValueError(f"checkpoint {path} lacks metadata {err.args[0]!r}") from None
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            cfg = self.config
            model = build_model(cfg.model, input_shape, num_outputs, **cfg.model_kwargs)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match model {self.config.model!r}: missing keys "
                f"{missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        target = dtype if dtype is not None else getattr(torch, self.config.dtype)
        model = model.to(target)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {path} does not fit the model: {err}") from None
        return model.eval()

    # ---- data -----------------------------------------------------------------------------
    @cached_property
    def _dataset(self) -> Dataset:
        cfg = self.config
        return load_dataset(cfg.dataset, root=cfg.data_root, seed=cfg.seed, **cfg.dataset_kwargs)

    def dataset(self) -> Dataset:
        """The run's dataset (loaded once, cached)."""
        return self._dataset

    def partition(self) -> Partition:
        """The client split saved at the start of the run."""
        path = self.path / PARTITION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"run {self.path} has no {PARTITION_FILE}")
        return Partition.from_json(json.loads(path.read_text()))

    def client_data(self) -> list[tuple[Tensor, Tensor]]:
        """Per client c, (inputs (n_c, ...), targets (n_c, ...)) of its training samples;
        floating tensors in the run's dtype, so that L_c is the loss the clients trained on."""
        ds = self.dataset()
        dtype = getattr(torch, self.config.dtype)
        out = []
        for idx in self.partition().indices:
            index = torch.as_tensor(idx, dtype=torch.long)
            x, y = ds.train_x[index], ds.train_y[index]
            out.append((x.to(dtype), y.to(dtype) if y.is_floating_point() else y))
        return out

    def task(self) -> Task:
        """The run's task (loss, metrics, feeding; callable as the batch-mean loss
        ``task(outputs, targets)``)."""
        return self.dataset().task

    def metrics(self) -> pandas.DataFrame:
        """metrics.jsonl as a DataFrame, one row per logged round (empty if none)."""
        import pandas as pd

        path = self.path / METRICS_FILE
        rows = read_metrics(path) if path.is_file() else []
        return pd.DataFrame(rows)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file, skipping a torn last line."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a partial line from a kill mid-write; the runner truncates it on resume
    return rows
