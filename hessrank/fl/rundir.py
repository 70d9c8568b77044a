"""Run directories of the federated trainer: the format, its writer and its reader.

Written by :mod:`hessrank.fl.runner` through :class:`RunWriter`, read by the analysis
(:mod:`hessrank.analysis.sources`) through :class:`RunDir`; imports no algorithm, so
reading a run never imports the trainer. Layout (docs/design.md)::

    RUN/config.json                      TrainConfig (with the algorithm's notes)
    RUN/partition.json                   Partition.to_json() of the client split
    RUN/metrics.jsonl                    one JSON object per round (0 = initialization)
    RUN/checkpoints/round_00000.safetensors, round_00005.safetensors, ...
    RUN/updates/round_0001.safetensors, ...  (only with ``record_updates``)
    RUN/provenance.json                  versions, threads, device, command, data hash, times

A checkpoint holds ``model.<key>`` (the dense effective weights and buffers of the global
model, exactly the state_dict keys of ``build_model(config.model, ...)``; with PEFT adapters
the base and the adapters under PEFT's names, :mod:`hessrank.fl.adapters`), ``state.<name>``
(the server strategy's :meth:`state_tensors`), ``clients.<id>.<name>`` (the client states:
pFedLoRU's personal pairs, mFedLoRU's tiers, SCAFFOLD's control variates), ``rng.<name>``
(generator states) and string metadata: ``round``, ``algo``, ``format`` (2), ``fingerprint``
(the run's :func:`~hessrank.fl.config.run_fingerprint`), ``content_sha256``
(:func:`~hessrank.io.tensor_digest` of every tensor in the file), ``input_shape`` (JSON),
``num_outputs`` and the cumulative communication. :class:`RunDir` verifies all three when it
reads a checkpoint: a file from another run (another fingerprint), a file whose tensors were
changed (another digest) or whose ``model.*`` and ``state.*`` copies of one tensor differ is
refused with one line naming both values. Checkpoints written before the format had these
(no ``format``) are read without the first two checks; their pFedLoRU pairs
(``state.personal.<id>.<name>``) are read as client states.

Every file is written atomically (temporary file in the same directory, fsync,
``os.replace``), so a killed run leaves either the old or the new file; ``metrics.jsonl`` is
appended one line per round, so a kill can leave a torn last line, which the reader drops
(it is recomputed on resume). A damaged line anywhere else is an error naming file and line:
rows after it are never dropped silently.

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
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hessrank.data.datasets import Dataset, load_dataset
from hessrank.data.partition import Partition
from hessrank.data.task import Task
from hessrank.fl.adapters import add_run_adapters
from hessrank.fl.config import TrainConfig
from hessrank.io import (
    atomic_write_text,
    read_tensors,
    split_prefix,
    tensor_digest,
    write_tensors,
)
from hessrank.models import build_model

if TYPE_CHECKING:
    import pandas

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PARTITION_FILE",
    "UPDATES_DIR",
    "Checkpoint",
    "RunDir",
    "RunWriter",
    "checkpoint_path",
    "read_checkpoint",
    "read_client_updates",
    "read_metrics",
    "verify_checkpoint",
]

CONFIG_FILE = "config.json"
PARTITION_FILE = "partition.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
UPDATES_DIR = "updates"
CHECKPOINT_FORMAT = "2"
"""Metadata ``format`` of checkpoints with fingerprint, content hash and client states."""
_CKPT_RE = re.compile(r"^round_(\d+)\.safetensors$")
_UPDATE_FILE = "round_{:04d}.safetensors"
_LEGACY_PERSONAL = "state.personal."


def checkpoint_path(run: str | Path, round_idx: int) -> Path:
    """RUN/checkpoints/round_{round:05d}.safetensors."""
    return Path(run) / CHECKPOINT_DIR / f"round_{int(round_idx):05d}.safetensors"


def updates_path(run: str | Path, round_idx: int) -> Path:
    """RUN/updates/round_{round:04d}.safetensors."""
    return Path(run) / UPDATES_DIR / _UPDATE_FILE.format(int(round_idx))


# ---- checkpoints -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint's parts (module docstring), keys without their prefix."""

    model: dict[str, Tensor]
    state: dict[str, Tensor]
    clients: dict[str, Tensor]
    rng: dict[str, Tensor]
    meta: dict[str, str]

    @property
    def legacy(self) -> bool:
        """Written before format 2 (no fingerprint, no content hash, no ``clients.*``)."""
        return "format" not in self.meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str]) -> Checkpoint:
        state = split_prefix(tensors, "state")
        clients = split_prefix(tensors, "clients")
        for key in [k for k in tensors if k.startswith(_LEGACY_PERSONAL)]:  # pFedLoRU pairs
            clients[key[len(_LEGACY_PERSONAL):]] = state.pop(key[len("state."):])
        return cls(split_prefix(tensors, "model"), state, clients, split_prefix(tensors, "rng"),
                   dict(meta))  # fmt: skip


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of one checkpoint file (not verified: see
    :func:`verify_checkpoint` and :meth:`RunDir.read`).

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


def verify_checkpoint(
    path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str], fingerprint: str
) -> None:
    """Check that a checkpoint is its run's and intact (module docstring).

    Raises:
        ValueError: one line naming the file and both fingerprints, both hashes, or the
            tensor whose ``model.*`` and ``state.*`` copies differ.
    """
    if "format" in meta:
        saved = meta.get("fingerprint", "")
        if saved != fingerprint:
            raise ValueError(
                f"checkpoint {path} belongs to another run: its fingerprint {saved[:16]} is not "
                f"this run's {fingerprint[:16]} (from config.json); copy checkpoints only "
                "between runs of the same config, or retrain"
            )
        digest = tensor_digest(tensors)
        if digest != meta.get("content_sha256"):
            raise ValueError(
                f"checkpoint {path} was changed after it was written: its tensors hash to "
                f"{digest[:16]}, its metadata says {meta.get('content_sha256', '')[:16]}; "
                "delete it (a resume starts from the previous checkpoint) or retrain"
            )
    for key, value in tensors.items():
        if not key.startswith("model."):
            continue
        twin = tensors.get("state." + key[len("model."):])
        if twin is not None and not _same_bits(twin, value):
            raise ValueError(
                f"checkpoint {path} is inconsistent: {key} and state.{key[len('model.'):]} "
                "hold different values; delete it or retrain"
            )


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes (NaN equals NaN of the same payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))  # fmt: skip


# ---- metrics -----------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file.

    A torn last line (no newline at the end of the file: a kill mid-append) is dropped;
    it belongs to a round after the last checkpoint, which a resume recomputes.

    Raises:
        ValueError: any other line is not a JSON object (names file and line number).
    """
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
            continue
        if number == len(lines) and not text.endswith("\n"):
            break  # torn by a kill mid-write
        raise ValueError(
            f"{path}, line {number}: not a metrics row (a JSON object with its round); the "
            "training history is damaged there: restore the file, or retrain with --no-resume"
        )
    return rows


def check_history(path: str | Path, last_round: int) -> list[dict[str, Any]]:
    """The rows of rounds 0..``last_round`` of a run's metrics.jsonl, one per round.

    Raises:
        ValueError: the file is missing, damaged (:func:`read_metrics`) or lacks rows of some
            of those rounds; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{path} is missing although the run has a checkpoint of round {last_round}: its "
            "training history is lost; retrain with --no-resume"
        )
    rows = [r for r in read_metrics(path) if r["round"] <= last_round]
    have = [r["round"] for r in rows]
    if have != list(range(last_round + 1)):
        missing = sorted(set(range(last_round + 1)) - set(have))
        problem = f"lacks the rows of rounds {missing[:8]}" if missing else (
            f"has its rows out of order or twice ({have[:8]}...)")
        raise ValueError(
            f"{path} {problem} (the run has a checkpoint of round {last_round}): its training "
            "history is incomplete; restore the file, or retrain with --no-resume"
        )
    return rows


# ---- writer ------------------------------------------------------------------------------------
class RunWriter:
    """Writes one run directory (every file atomically; checkpoints with the run's
    fingerprint and their content hash)."""

    def __init__(self, path: str | Path, config: TrainConfig) -> None:
        self.path = Path(path)
        self.fingerprint = config.fingerprint()

    def write_config(self, config: TrainConfig) -> None:
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
        atomic_write_text(self.path / CONFIG_FILE, text)

    def write_partition(self, partition: Partition) -> None:
        text = json.dumps(partition.to_json(), separators=(",", ":"))
        atomic_write_text(self.path / PARTITION_FILE, text)

    def clear(self) -> None:
        """Delete checkpoints, updates and metrics (a restart with ``resume=False``)."""
        shutil.rmtree(self.path / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(self.path / UPDATES_DIR, ignore_errors=True)
        (self.path / METRICS_FILE).unlink(missing_ok=True)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def checkpoint(
        self,
        round_idx: int,
        *,
        model_state: dict[str, Tensor],
        algo_state: dict[str, Tensor],
        client_states: dict[str, Tensor],
        rng: dict[str, Tensor],
        algo: str,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write round ``round_idx``'s checkpoint and return its path.

        Args:
            model_state: dense effective state_dict of the global model (``model.*``).
            algo_state: the strategy's state tensors (``state.*``).
            client_states: the client states as ``{id}.{name}`` tensors (``clients.*``).
            rng: generator states as uint8 tensors (``rng.*``).
            algo: algorithm name, stored in the metadata.
            metadata: extra JSON-serializable metadata (values stored as JSON strings).
        """
        tensors: dict[str, Tensor] = {}
        groups = (("model", model_state), ("state", algo_state), ("clients", client_states),
                  ("rng", rng))  # fmt: skip
        for prefix, group in groups:
            for key, value in group.items():
                tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous().clone()
        meta = {"round": str(int(round_idx)), "algo": str(algo), "format": CHECKPOINT_FORMAT,
                "fingerprint": self.fingerprint, "content_sha256": tensor_digest(tensors)}
        for key, value in (metadata or {}).items():
            meta[key] = json.dumps(value)
        path = checkpoint_path(self.path, round_idx)
        write_tensors(path, tensors, meta)
        return path

    def updates(self, round_idx: int, updates: dict[int, dict[str, Tensor]]) -> Path:
        """Write round ``round_idx``'s client updates (client id → key → Δ tensor)."""
        tensors = {
            f"{cid}/{key}": t.detach().cpu().contiguous().clone()
            for cid, per_client in sorted(updates.items())
            for key, t in per_client.items()
        }
        meta = {"round": str(int(round_idx)),
                "clients": json.dumps(sorted(int(c) for c in updates))}  # fmt: skip
        path = updates_path(self.path, round_idx)
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


# ---- reader ------------------------------------------------------------------------------------
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
        self.config: TrainConfig = TrainConfig.load(cfg)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, algo={self.config.algo!r}, rounds={self.rounds()})"

    @property
    def fingerprint(self) -> str:
        """The run's :func:`~hessrank.fl.config.run_fingerprint` (from its config.json)."""
        return self.config.fingerprint()

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
        """Raw tensors and metadata of round ``round``'s checkpoint, verified
        (:func:`verify_checkpoint`)."""
        path = self.checkpoint_path(round)
        tensors, meta = read_checkpoint(path)
        verify_checkpoint(path, tensors, meta, self.fingerprint)
        return tensors, meta

    def checkpoint(self, round: int) -> Checkpoint:
        """Round ``round``'s verified checkpoint in its parts."""
        return Checkpoint.from_tensors(*self.read(round))

    def checkpoint_hash(self, round: int) -> str:
        """The content hash of round ``round``'s checkpoint (verified; for a checkpoint
        written before format 2, the digest of its tensors computed now)."""
        tensors, meta = self.read(round)
        return meta.get("content_sha256") or tensor_digest(tensors)

    def load_model(self, round: int, dtype: torch.dtype | None = None) -> nn.Module:
        """The dense global model after ``round`` rounds, in eval mode; for a run with PEFT
        adapters (``adapters="peft"``) the base with its adapters, only the adapters
        trainable (what an analysis differentiates by default).

        Args:
            round: a saved round (see :meth:`rounds`).
            dtype: parameter dtype; default the run's ``config.dtype``.
        Raises:
            ValueError: no such round, a checkpoint that is corrupt, another run's, changed
                or inconsistent, or keys that do not match the model the config builds (the
                message names the file).
        """
        path = self.checkpoint_path(round)
        ckpt = self.checkpoint(round)
        state, meta = ckpt.model, ckpt.meta
        try:
            input_shape = tuple(json.loads(meta["input_shape"]))
            num_outputs = int(json.loads(meta["num_outputs"]))
        except KeyError as err:
            raise ValueError(f"checkpoint {path} lacks metadata {err.args[0]!r}") from None
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            cfg = self.config
            model = build_model(cfg.model, input_shape, num_outputs, **cfg.model_kwargs)
            add_run_adapters(model, cfg)  # adapter runs: base frozen, adapters trainable
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
        floating tensors in the run's dtype, so that L_c is the loss the clients trained on
        (token ids and class labels stay integers)."""
        ds = self.dataset()
        dtype = getattr(torch, self.config.dtype)
        out = []
        for idx in self.partition().indices:
            index = torch.as_tensor(idx, dtype=torch.long)
            x, y = ds.train_x[index], ds.train_y[index]
            out.append(tuple(t.to(dtype) if t.is_floating_point() else t for t in (x, y)))
        return out

    def task(self) -> Task:
        """The run's task (loss, metrics, feeding; callable as the batch-mean loss
        ``task(outputs, targets)``)."""
        return self.dataset().task

    def metrics(self) -> pandas.DataFrame:
        """metrics.jsonl as a DataFrame, one row per logged round (empty before round 0).

        Raises:
            ValueError: a damaged line (names file and line), or a run with checkpoints whose
                metrics.jsonl is missing or lacks rows (its history is lost; one line).
        """
        import pandas as pd

        rounds = self.rounds()
        path = self.path / METRICS_FILE
        if not rounds:
            return pd.DataFrame(read_metrics(path) if path.is_file() else [])
        rows = check_history(path, rounds[-1])
        rows += [r for r in read_metrics(path) if r["round"] > rounds[-1]]
        return pd.DataFrame(rows)
