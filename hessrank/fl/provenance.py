"""What reproduces a training run: versions, revision, threads, device, command, data, times.

``RUN/provenance.json`` holds ``{"sessions": [record, ...]}``, one record per call of
:func:`hessrank.fl.train` that trained (a resumed run appends a session). A record has
``hessrank``, ``git_revision`` (None outside a git checkout), ``torch``, ``numpy``, ``python``,
``platform``, ``threads`` (``torch.get_num_threads()``), ``device``, ``dtype``, ``command``
(the command as parsed), ``argv`` (``sys.argv``; the value of any flag whose name holds
``token``, ``secret`` or ``password`` is replaced by ``<redacted>``: a Flower deployment
starts its ServerApp with a session token), ``dataset_fingerprint`` (see
:func:`dataset_fingerprint`), ``resumed_from`` (round or None), ``started`` and ``finished``
(UTC ISO-8601; ``finished`` is None for a session that did not complete).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hessrank
from hessrank.fl.config import TrainConfig
from hessrank.io import atomic_write_text

__all__ = ["PROVENANCE_FILE", "dataset_fingerprint", "git_revision", "redacted", "start_record"]

PROVENANCE_FILE = "provenance.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding the hessrank package (None if it is not
    in a git checkout or git is unavailable); ``+dirty`` when tracked files are modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + "+dirty" if dirty else rev) or None


_SECRET_FLAGS = ("token", "secret", "password")


def redacted(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret-bearing flags (``--token X``, ``--token=X``, any
    flag naming a token, secret or password) replaced by ``<redacted>``."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("<redacted>")
            hide = False
            continue
        flag, eq, _ = arg.partition("=")
        secret = flag.startswith("-") and any(w in flag.lower() for w in _SECRET_FLAGS)
        if secret and eq:
            out.append(f"{flag}=<redacted>")
        else:
            out.append(arg)
            hide = secret
    return out


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 over the dataset's train and test arrays (dtype, shape and bytes of each), so
    two runs with equal fingerprints trained and tested on bit-identical data."""
    h = hashlib.sha256()
    for name in ("train_x", "train_y", "test_x", "test_y"):
        t = getattr(dataset, name).detach().cpu().contiguous()
        arr = t.numpy()
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def start_record(
    config: TrainConfig,
    dataset: Any,
    device: torch.device,
    command: list[str] | None,
    resumed_from: int | None,
) -> dict[str, Any]:
    """The provenance record of a training session that starts now."""
    return {
        "hessrank": hessrank.__version__,
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": config.dtype,
        "command": redacted(list(command) if command is not None else list(sys.argv)),
        "argv": redacted(list(sys.argv)),
        "dataset": config.dataset,
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "resumed_from": resumed_from,
        "started": _now(),
        "finished": None,
    }


def _read(out: Path) -> dict[str, Any]:
    path = out / PROVENANCE_FILE
    if not path.is_file():
        return {"sessions": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"sessions": []}
    return data if isinstance(data.get("sessions"), list) else {"sessions": []}


def write_provenance(out: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as a new session (atomic rewrite of provenance.json)."""
    data = _read(out)
    data["sessions"].append(record)
    atomic_write_text(out / PROVENANCE_FILE, json.dumps(data, indent=2))


def finish_record(out: Path, record: dict[str, Any]) -> None:
    """Stamp the session ``record`` (the last one in the file) as finished now."""
    data = _read(out)
    if data["sessions"] and data["sessions"][-1].get("started") == record["started"]:
        data["sessions"][-1]["finished"] = _now()
        atomic_write_text(out / PROVENANCE_FILE, json.dumps(data, indent=2))
