"""What is analyzed: a hessrank run directory or a folder of ``state_dict`` files
(docs/design.md §6).

A *source* gives the saved rounds, each round's model, the clients' data, the test set and the
loss, and says what it is by content:

- ``fingerprint()``: the run's identity — SHA-256 of ``config.json`` (minus the bookkeeping
  keys that may change when a run is continued: rounds, save/eval cadence, data location) and
  of ``partition.json``; for a state_dict folder, of the model factory (its name and the
  architecture it builds), the data set and the client split. An analysis directory belongs to
  one fingerprint.
- ``checkpoint_hash(round)``: SHA-256 of the checkpoint file's bytes.
- :func:`data_hash`: SHA-256 of a subject's (inputs, targets) tensors.

Unit keys include all three, so a changed run or checkpoint is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from hessrank.analysis.settings import AnalysisSettings, digest
from hessrank.data.task import Task
from hessrank.fl.rundir import RunDir

__all__ = [
    "RunSource",
    "Source",
    "StateDictDir",
    "data_hash",
    "file_hash",
    "load_factory",
    "open_source",
    "select_rounds",
]

_ROUND_FILE = re.compile(r"(\d+)(?!.*\d)")
_BOOKKEEPING = ("rounds", "save_every", "eval_every", "data_root")
"""config.json keys left out of a run's fingerprint: continuing a run (more rounds) or moving
its data keeps the checkpoints' meaning."""

Pair = tuple[Tensor, Tensor]


class Source(Protocol):
    """What :func:`hessrank.analysis.trajectory.analyze` needs from a run."""

    path: Path
    kind: str
    native_dtype: str  # the dtype the checkpoints hold ("float32")

    def fingerprint(self) -> str: ...
    def rounds(self) -> list[int]: ...
    def checkpoint_path(self, round: int) -> Path: ...
    def checkpoint_hash(self, round: int) -> str: ...
    def load_model(self, round: int) -> nn.Module: ...
    def client_data(self) -> list[Pair]: ...
    def test(self) -> Pair: ...
    def task(self) -> Task: ...


def file_hash(path: Path) -> str:
    """SHA-256 (hex, 16 characters) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def data_hash(*tensors: Tensor) -> str:
    """SHA-256 (hex, 16 characters) of tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---- parsing ------------------------------------------------------------------------------------
def select_rounds(spec: str | Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """Rounds to analyze among the saved ones.

    ``None``: all. A slice string "start:stop:step" keeps saved rounds r with
    start ≤ r ≤ stop (stop inclusive; empty parts mean open) and (r − start) divisible by step.
    A list (or "5,10,20") names rounds exactly; a missing one is an error listing the saved.
    """
    avail = sorted(set(int(r) for r in available))
    if spec is None:
        return avail
    bad = f"bad --rounds {spec!r}; use start:stop:step (0:50:5) or a list (5,10,20)"
    if isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        if len(parts) > 3:
            raise ValueError(bad)
        try:
            vals = [int(p) if p.strip() else None for p in parts] + [None] * (3 - len(parts))
        except ValueError:
            raise ValueError(bad) from None
        start, stop, step = vals
        start = 0 if start is None else start
        step = 1 if step is None else step
        if step < 1:
            raise ValueError(f"bad --rounds {spec!r}: step must be >= 1")
        chosen = [r for r in avail
                  if r >= start and (stop is None or r <= stop) and (r - start) % step == 0]
    else:
        if isinstance(spec, str):
            try:
                wanted = [int(t) for t in spec.split(",") if t.strip()]
            except ValueError:
                raise ValueError(bad) from None
        else:
            wanted = [int(r) for r in spec]
        missing = [r for r in wanted if r not in avail]
        if missing:
            raise ValueError(f"rounds {missing} have no checkpoint; saved rounds: {avail}")
        chosen = sorted(set(wanted))
    if not chosen:
        raise ValueError(f"--rounds {spec!r} selects none of the saved rounds {avail}")
    return chosen


def load_factory(spec: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Resolve "package.module:function" (or pass a callable through); the function must take
    no arguments (ValueError otherwise)."""
    if callable(spec):
        factory, name = spec, getattr(spec, "__qualname__", repr(spec))
    else:
        mod, sep, fn = str(spec).partition(":")
        if not sep or not mod or not fn:
            raise ValueError(f"bad model factory {spec!r}; use module:function, e.g. "
                             "mypkg.nets:make")
        try:
            module = importlib.import_module(mod)
        except ImportError as err:
            raise ValueError(f"cannot import module {mod!r} of model factory {spec!r}: "
                             f"{err}") from None
        except Exception as err:  # the user's module raised while importing
            raise ValueError(f"importing module {mod!r} of model factory {spec!r} failed: "
                             f"{type(err).__name__}: {err}") from None
        factory, name = getattr(module, fn, None), str(spec)
        if not callable(factory):
            raise ValueError(f"module {mod!r} has no callable {fn!r} (model factory {spec!r})")
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return factory
    needed = [p.name for p in sig.parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                     p.KEYWORD_ONLY)]
    if needed:
        raise ValueError(f"model factory {name} takes arguments ({', '.join(needed)}); pass a "
                         "function of no arguments, e.g. def make(): return Net(width=64)")
    return factory


def _build(factory: Callable[[], nn.Module], name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        try:
            model = factory()
        except Exception as err:  # the user's code: any error is reported in one line
            raise ValueError(f"model factory {name} raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name} returned {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


# ---- sources ----------------------------------------------------------------------------------
class StateDictDir:
    """A plain directory of ``state_dict`` files for models hessrank did not train.

    Files ``*.pt``/``*.pth`` (read with ``torch.load(weights_only=True)``) or ``*.safetensors``;
    the round is the last integer in the file name (``epoch_12.pt`` → 12). The model comes from
    ``factory()`` and the data from :func:`hessrank.data.datasets.load_dataset` with a seeded iid
    split among ``clients`` clients. The factory is checked up front: it must return an
    ``nn.Module`` whose forward pass accepts the data.
    """

    SUFFIXES = (".pt", ".pth", ".safetensors")
    kind = "state_dicts"

    def __init__(self, path: str | Path, factory: str | Callable[[], nn.Module], dataset: str,
                 clients: int, *, seed: int = 0, dtype: torch.dtype | None = None,
                 data_root: str | None = None) -> None:
        from hessrank.data.datasets import load_dataset
        from hessrank.data.partition import make_partition

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {self.path}")
        self.factory_name = factory if isinstance(factory, str) else getattr(
            factory, "__qualname__", repr(factory))
        self.factory, self.dtype = load_factory(factory), dtype
        self._files: dict[int, Path] = {}
        for p in sorted(self.path.iterdir()):
            if p.suffix not in self.SUFFIXES or p.name.startswith("."):
                continue
            m = _ROUND_FILE.search(p.stem)
            if m is None:
                raise ValueError(
                    f"cannot tell the round of {p.name}; put the round number in the file name "
                    "(e.g. round_00010.pt)"
                )
            r = int(m.group(1))
            if r in self._files:
                raise ValueError(f"{self._files[r].name} and {p.name} both claim round {r}")
            self._files[r] = p
        if not self._files:
            raise ValueError(
                f"{self.path} holds no *.pt or *.safetensors state_dict files (and no "
                "config.json of a hessrank run)"
            )
        if clients < 1:
            raise ValueError(f"--clients must be >= 1, got {clients}")
        self.dataset_name, self.clients, self.seed = dataset, clients, seed
        self.data = load_dataset(dataset, root=data_root, seed=0)
        self.partition = make_partition(self.data.train_y, clients, "iid", seed=seed)
        self._arch = self._check_factory()

    def _check_factory(self) -> str:
        """Build the model once and run 2 training samples through it (before any work)."""
        model = _build(self.factory, self.factory_name)
        if self.dtype is not None:
            model = model.to(self.dtype)
        x = self.data.train_x[:2]
        if x.is_floating_point():
            x = x.to(next((p.dtype for p in model.parameters()), x.dtype))
        try:
            with torch.no_grad():
                model.eval()(x)
        except Exception as err:  # shape mismatches surface as several error types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"model factory {self.factory_name} does not fit the data of "
                             f"{self.dataset_name!r} (inputs {tuple(x.shape[1:])}): "
                             f"{first}") from None
        self.native_dtype = str(next((p.dtype for p in model.parameters()), torch.float32))
        return repr(model)

    def fingerprint(self) -> str:
        return digest({"kind": self.kind, "factory": self.factory_name, "arch": self._arch,
                       "dataset": self.dataset_name, "clients": self.clients})

    def rounds(self) -> list[int]:
        return sorted(self._files)

    def checkpoint_path(self, round: int) -> Path:
        return self._files[round]

    def checkpoint_hash(self, round: int) -> str:
        return file_hash(self._files[round])

    def load_model(self, round: int) -> nn.Module:
        path = self._files[round]
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch/safetensors raise many types for a corrupt file
            raise ValueError(f"checkpoint {path} is corrupt or unreadable ({err})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"checkpoint {path} is not a state_dict (a dict of tensors)")
        model = _build(self.factory, self.factory_name)
        if self.dtype is not None:
            model = model.to(self.dtype)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"checkpoint {path} does not match the model: {first}") from None
        return model.eval()

    def client_data(self) -> list[Pair]:
        x, y = self.data.train_x, self.data.train_y
        return [(x[torch.as_tensor(i)], y[torch.as_tensor(i)]) for i in self.partition.indices]

    def test(self) -> Pair:
        return self.data.test_x, self.data.test_y

    def task(self) -> Task:
        return self.data.task


class RunSource:
    """A hessrank run directory (:class:`hessrank.fl.rundir.RunDir`) as a source."""

    kind = "run"

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        self.run = RunDir(path)
        self.path, self.dtype = self.run.path, dtype
        self.native_dtype = self.run.config.dtype

    def fingerprint(self) -> str:
        cfg = json.loads((self.path / "config.json").read_text())
        kept = {k: v for k, v in cfg.items() if k not in _BOOKKEEPING}
        part = self.path / "partition.json"
        return digest({"kind": self.kind, "config": kept,
                       "partition": file_hash(part) if part.is_file() else None})

    def rounds(self) -> list[int]:
        return self.run.rounds()

    def checkpoint_path(self, round: int) -> Path:
        return self.run.checkpoint_path(round)

    def checkpoint_hash(self, round: int) -> str:
        return file_hash(self.run.checkpoint_path(round))

    def load_model(self, round: int) -> nn.Module:
        return self.run.load_model(round, dtype=self.dtype)

    def client_data(self) -> list[Pair]:
        return self.run.client_data()

    def test(self) -> Pair:
        ds = self.run.dataset()
        return ds.test_x, ds.test_y

    def task(self) -> Task:
        return self.run.task()


def open_source(run_dir: str | Path, settings: AnalysisSettings) -> RunSource | StateDictDir:
    """The source at ``run_dir``: a run directory, or with ``settings.model_factory`` a folder
    of state_dict files."""
    run_dir = Path(run_dir)
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    if settings.model_factory is None:
        if not run_dir.exists():
            raise FileNotFoundError(f"no run directory at {run_dir}; train one first")
        if not (run_dir / "config.json").is_file():
            raise ValueError(
                f"{run_dir} has no config.json of a hessrank run; for other checkpoints pass "
                "--model-factory module:function --dataset NAME --clients K"
            )
        return RunSource(run_dir, dtype)
    if settings.dataset is None or settings.clients is None:
        raise ValueError("a model factory needs --dataset NAME and --clients K for the data")
    return StateDictDir(run_dir, settings.model_factory, settings.dataset, int(settings.clients),
                        seed=settings.seed, dtype=dtype, data_root=settings.data_root)
