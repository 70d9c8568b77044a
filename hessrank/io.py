"""Files written so that a kill never leaves half of one: atomic writes and safetensors.

The lowest layer of hessrank (it imports nothing of hessrank). Every file a run or an
analysis writes goes through :func:`atomic_write_bytes`: a temporary file in the same
directory, ``fsync``, then ``os.replace``, so a reader sees either the old file or the new
one. Tensor files are safetensors (no pickle: loading never runs code) with string
metadata.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> write_tensors(path, {"w": torch.ones(2)}, {"round": "3"})
    >>> read_tensors(path)[1]["round"]
    '3'
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
    "read_tensors",
    "split_prefix",
    "tensor_digest",
    "write_tensors",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_tensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write named tensors (moved to the CPU, made contiguous) and string metadata to a
    safetensors file, atomically."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(cpu, metadata=dict(metadata or {})))


def read_tensors(path: str | Path, what: str = "file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file.

    Args:
        what: how the error message names the file ("checkpoint", "update file", ...).
    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} {path}")
    try:
        tensors = st_load(path.read_bytes())
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{what} {path} is corrupt or not a safetensors file ({first})") from None
    return tensors, meta


def split_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries ``prefix.<key>`` of a tensor dict, keyed by ``<key>``."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over named tensors: for each key in sorted order, the key, dtype, shape and the
    raw bytes (row-major). Equal digests: the same names with bit-identical values; any
    change of a value, a dtype or a name changes it. Independent of how a file stores them.
    """
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
