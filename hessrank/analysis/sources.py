"""What is analyzed: the :class:`Source` protocol and its three kinds (docs/design.md, analysis).

A *source* gives the saved rounds, each round's model, the clients' data, the test set and the
task, and says what it is by content:

- ``fingerprint()``: the run's identity. A run directory: SHA-256 of ``config.json`` minus
  the bookkeeping keys that may change when a run is continued (save/eval cadence, data
  location; ``rounds`` too, unless the learning-rate schedule depends on it: cosine) and of
  ``partition.json``. A checkpoint folder: the data (every client's data hash, the test set's)
  and how the model is built from it (the factory's name). An analysis directory belongs to
  one fingerprint.
- ``checkpoint_hash(round)``: SHA-256 of the checkpoint (the unit keys' ingredient): for a
  hessrank run its :func:`content_hash` (a safetensors file's bytes change with every write:
  its header orders the metadata at random), for a folder the file's bytes; after checking the
  checkpoint is this run's: a hessrank checkpoint must carry its own round, and where it
  carries its run's fingerprint and a content hash (written by the trainer,
  :func:`hessrank.fl.rundir.RunDir.read` checks them) they must match;
  :class:`CheckpointMismatchError` (the call is refused) otherwise.
- ``checkpoint_content(round)``: a hash of the checkpoint's tensors and metadata whatever
  order its file stores them in (:func:`content_hash`); the analysis store remembers it per
  round and refuses a checkpoint overwritten since (another run's, or garbage).
- ``code_hash()``: for a model built by the user's code, SHA-256 of that code (the module
  files and the functions' source of the model factory and the loss), None for hessrank's own.
- :func:`data_hash`: SHA-256 of a subject's (inputs, targets), inputs any pytree.

Unit keys include all of them (:mod:`hessrank.analysis.planner`), so a changed run,
checkpoint or factory is recomputed, never reused.

Sources:

- :class:`RunSource`: a hessrank run directory (:class:`hessrank.fl.rundir.RunDir`).
- :class:`CheckpointDir` (``--model pkg.mod:make``): a folder of checkpoints of a model
  hessrank did not train — one file per round (``*.pt``/``*.pth`` read with
  ``torch.load(weights_only=True)``, or ``*.safetensors``) holding a ``state_dict``, also
  wrapped as ``{"model_state_dict": ...}`` (or ``state_dict``, ``model``) and with
  ``nn.DataParallel``'s ``module.`` prefix; or one folder per round with a PEFT adapter
  (``adapter_model.safetensors`` and ``adapter_config.json``) on the base model ``make()``
  builds. The round is the last integer in the name (``epoch_12.pt`` → 12). The data: the
  user's (``--data pkg.mod:clients``, :func:`user_data`) or a built-in dataset split iid
  (``--dataset NAME --clients K``); the loss: ``--loss pkg.mod:loss`` (a task or a plain
  ``loss_fn(outputs, targets)``, :func:`hessrank.data.task.as_task`), else the dataset's
  task, else cross-entropy for integer targets.

Modules named ``pkg.mod:attr`` are imported with the working directory on ``sys.path`` (as
``python -m`` does), so ``hessrank analyze`` finds a module next to the user without
``PYTHONPATH=.``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as safetensors_load
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from hessrank.analysis.settings import AnalysisSettings, digest
from hessrank.data.datasets import load_dataset
from hessrank.data.inputs import batch_size_of, call_model, slice_inputs
from hessrank.data.partition import make_partition
from hessrank.data.task import ClassificationTask, Task, as_task
from hessrank.fl.rundir import RunDir
from hessrank.io import read_tensors

__all__ = [
    "CheckpointDir",
    "CheckpointMismatchError",
    "RunSource",
    "Source",
    "StateDictDir",
    "UserData",
    "data_hash",
    "content_hash",
    "file_hash",
    "load_factory",
    "load_object",
    "load_state_dict",
    "open_source",
    "select_rounds",
    "source_hash",
    "user_data",
]

_ROUND_FILE = re.compile(r"(\d+)(?!.*\d)")
_BOOKKEEPING = ("rounds", "save_every", "eval_every", "data_root")
"""config.json keys left out of a run's fingerprint: continuing a run (more rounds) or moving
its data keeps the checkpoints' meaning (``rounds`` is kept when the schedule depends on it)."""
_ROUNDS_MATTER = {"lr_schedule": ("cosine",)}
"""Config values under which the number of rounds changes every round's weights (a cosine
learning rate decays to 0 at the last round)."""
_WRAPPERS = ("model_state_dict", "state_dict", "model")
"""Keys under which training loops commonly nest the state_dict in a checkpoint dict."""
ADAPTER_FILE = "adapter_model.safetensors"

Pair = tuple[Any, Tensor]


class CheckpointMismatchError(ValueError):
    """A checkpoint that is not this run's (another run's, another round's, or changed after
    it was written): the analysis is refused."""


class Source(Protocol):
    """What :func:`hessrank.analysis.trajectory.analyze` needs from a run (module docstring).

    ``checkpoint_hash`` raises :class:`CheckpointMismatchError` for a checkpoint that is not
    the run's (the call is refused) and ValueError/OSError for one that cannot be read (that
    round is reported and skipped). ``test()`` returns None when there is no test set.
    """

    path: Path
    kind: str
    native_dtype: str  # the dtype the checkpoints hold ("float32")

    def fingerprint(self) -> str: ...
    def rounds(self) -> list[int]: ...
    def checkpoint_path(self, round: int) -> Path: ...
    def checkpoint_hash(self, round: int) -> str: ...
    def checkpoint_content(self, round: int) -> str: ...
    def load_model(self, round: int) -> nn.Module: ...
    def client_data(self) -> list[Pair]: ...
    def test(self) -> Pair | None: ...
    def task(self) -> Task: ...
    def code_hash(self) -> str | None: ...


# ---- hashes -------------------------------------------------------------------------------------
def file_hash(path: Path) -> str:
    """SHA-256 (hex, 16 characters) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def data_hash(*parts: Any) -> str:
    """SHA-256 (hex, 16 characters) of tensors' dtypes, shapes and bytes, in order; a
    structured input (tuple, list, dict of tensors) by its structure and its tensors."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            leaves = [part]
        else:
            leaves, spec = pytree.tree_flatten(part)
            h.update(repr(spec).encode())
        for t in leaves:
            if not isinstance(t, Tensor):
                h.update(repr(t).encode())
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def content_hash(tensors: dict[str, Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 (16 hex) of named tensors (by name: dtype, shape, bytes) and string metadata,
    independent of the order a file stores them in (a safetensors header orders its metadata
    differently in every process that writes it, so file bytes are no identity of content)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        h.update(data_hash(tensors[name]).encode())
    h.update(json.dumps(dict(sorted((meta or {}).items()))).encode())
    return h.hexdigest()[:16]


def source_hash(*objects: Any) -> str:
    """SHA-256 (16 hex) of user code: per object, its module file's bytes and its own source
    (``inspect.getsource``; for an instance, its class's). An object without a source file
    (defined at a prompt) counts by its qualified name only, so an edit of it goes unseen."""
    parts = []
    for obj in objects:
        if obj is None:
            parts.append(None)
            continue
        target = obj if inspect.isroutine(obj) or inspect.isclass(obj) else type(obj)
        module = sys.modules.get(getattr(target, "__module__", "") or "")
        path = getattr(module, "__file__", None)
        try:
            source = inspect.getsource(target)
        except (OSError, TypeError):
            source = None
        parts.append({"name": f"{getattr(target, '__module__', '?')}:"
                              f"{getattr(target, '__qualname__', repr(target))}",
                      "file": file_hash(Path(path)) if path and Path(path).is_file() else None,
                      "source": source})
    return digest(parts)


# ---- user code ---------------------------------------------------------------------------------
def load_object(spec: str | Any, what: str) -> Any:
    """The object "package.module:name" names (anything else is returned as is), imported with
    the working directory on ``sys.path``; ValueError in one line naming ``what``."""
    if not isinstance(spec, str):
        return spec
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"bad {what} {spec!r}; use module:function, e.g. mypkg.nets:make")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # as `python -m` does: find the user's
        sys.path.insert(0, cwd)  # modules next to them, without PYTHONPATH=.
    try:
        module = importlib.import_module(mod)
    except ImportError as err:
        raise ValueError(f"cannot import module {mod!r} of {what} {spec!r} (from {cwd}): "
                         f"{err}") from None
    except Exception as err:  # the user's module raised while importing
        raise ValueError(f"importing module {mod!r} of {what} {spec!r} failed: "
                         f"{type(err).__name__}: {err}") from None
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"module {mod!r} has no callable {name!r} ({what} {spec!r})")
    return obj


def _no_arguments(fn: Callable, name: str, what: str, example: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    needed = [p.name for p in sig.parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                     p.KEYWORD_ONLY)]
    if needed:
        raise ValueError(f"{what} {name} takes arguments ({', '.join(needed)}); pass a "
                         f"function of no arguments, e.g. {example}")


def load_factory(spec: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Resolve "package.module:function" (or pass a callable through); the function must take
    no arguments (ValueError otherwise)."""
    factory = load_object(spec, "model factory")
    name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
    if not callable(factory):
        mod = str(spec).partition(":")[0]
        fn = str(spec).partition(":")[2]
        raise ValueError(f"module {mod!r} has no callable {fn!r} (model factory {spec!r})")
    _no_arguments(factory, name, "model factory", "def make(): return Net(width=64)")
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


class UserData:
    """The clients' data (and optionally a test set) a user's function returns.

    ``clients()`` (no arguments) returns a list of client datasets, or ``(clients, test)``, or
    ``{"clients": [...], "test": ...}``. A dataset is an ``(inputs, targets)`` pair — inputs a
    tensor, a tuple or a dict of tensors (``model(x)``, ``model(*x)``, ``model(**x)``), batch
    first — or a map-style ``torch.utils.data.Dataset`` of ``(input, target)`` samples
    (collated with ``default_collate``). The clients' order is their ids.
    """

    def __init__(self, spec: str | Callable[[], Any]) -> None:
        self.name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
        self.fn = load_object(spec, "data function")
        if not callable(self.fn):
            raise ValueError(f"--data {self.name} is not a function")
        _no_arguments(self.fn, self.name, "data function", "def clients(): return [(x, y), ...]")
        try:
            got = self.fn()
        except Exception as err:  # the user's code
            raise ValueError(f"data function {self.name} raised {type(err).__name__}: "
                             f"{err}") from None
        clients, test = got, None
        if isinstance(got, dict):
            if "clients" not in got:
                raise ValueError(f"data function {self.name} returned a dict without "
                                 "'clients'; return {'clients': [...], 'test': (x, y)}")
            clients, test = got["clients"], got.get("test")
        elif isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], (list, tuple)) \
                and not isinstance(got[0], Tensor) and _is_dataset_list(got[0]):
            clients, test = got
        if not isinstance(clients, (list, tuple)) or not clients:
            raise ValueError(f"data function {self.name} must return a non-empty list of "
                             f"client datasets, got {type(clients).__name__}")
        self.clients = [self._pair(d, f"client {c}") for c, d in enumerate(clients)]
        self.test = None if test is None else self._pair(test, "the test set")

    def _pair(self, d: Any, what: str) -> Pair:
        if isinstance(d, TorchDataset) and not isinstance(d, (tuple, list)):
            try:
                samples = [d[i] for i in range(len(d))]
                x, y = default_collate(samples)
            except Exception as err:  # the user's dataset
                raise ValueError(f"{what} of {self.name}: cannot collate its samples into "
                                 f"(inputs, targets) ({type(err).__name__}: {err})") from None
            d = (x, y)
        if not (isinstance(d, (tuple, list)) and len(d) == 2 and isinstance(d[1], Tensor)):
            raise ValueError(f"{what} of {self.name} is not an (inputs, targets) pair with "
                             f"tensor targets nor a torch Dataset (got {type(d).__name__})")
        x, y = d
        try:
            n = batch_size_of(x)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what} of {self.name}: {err}") from None
        if n != int(y.shape[0]) or n == 0:
            raise ValueError(f"{what} of {self.name} has {n} inputs and {int(y.shape[0])} "
                             "targets; give the same number (at least one)")
        return x, y


def _is_dataset_list(items: Sequence[Any]) -> bool:
    return all(isinstance(d, TorchDataset) or (isinstance(d, (tuple, list)) and len(d) == 2)
               for d in items)


def user_data(spec: str | Callable[[], Any]) -> UserData:
    """:class:`UserData` of a ``--data`` function."""
    return UserData(spec)


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """The state_dict in a checkpoint file, in the common layouts (module docstring)."""
    try:
        if path.suffix == ".safetensors":
            state: Any = safetensors_load(path.read_bytes())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a corrupt file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({first})") from None
    if isinstance(state, dict):
        for key in _WRAPPERS:
            inner = state.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor)
                                                         for v in inner.values()):
                state = inner
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, Tensor) for v in state.values()):
        keys = sorted(state)[:6] if isinstance(state, dict) else []
        raise ValueError(f"checkpoint {path} is not a state_dict (a dict of tensors, or one "
                         f"under {', '.join(_WRAPPERS)}); its keys: {keys}")
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _fit(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Load ``state`` into ``model``; ValueError naming the missing and unexpected keys."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing keys "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines or ["?"])[0]
        raise ValueError(f"checkpoint {path} does not match the model: {detail}") from None


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


# ---- sources ----------------------------------------------------------------------------------
class CheckpointDir:
    """A folder of checkpoints of a model hessrank did not train (module docstring).

    Args:
        path: the folder.
        factory: "module:function" or a callable of no arguments returning the model (for
            adapter rounds: the base model).
        data: the user's data (:class:`UserData` or a ``--data`` spec), or None for
            ``dataset`` split iid among ``clients``.
        loss: a task or a plain ``loss_fn(outputs, targets)`` (or its "module:name").
        seed: seeds the iid split of a built-in dataset.
        dtype: parameter dtype (default: as the factory builds it).
    """

    SUFFIXES = (".pt", ".pth", ".safetensors")
    kind = "state_dicts"

    def __init__(self, path: str | Path, factory: str | Callable[[], nn.Module],
                 dataset: str | None = None, clients: int | None = None, *, seed: int = 0,
                 dtype: torch.dtype | None = None, data_root: str | None = None,
                 data: UserData | str | Callable | None = None,
                 loss: str | Task | Callable | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {self.path}")
        self.factory_name = factory if isinstance(factory, str) else getattr(
            factory, "__qualname__", repr(factory))
        self.factory, self.dtype = load_factory(factory), dtype
        self._files = self._scan()
        self.loss_obj = None if loss is None else load_object(loss, "loss")
        if data is not None:
            self.data = data if isinstance(data, UserData) else UserData(data)
            self._clients, self._test = self.data.clients, self.data.test
            self.data_name = f"data {self.data.name}"
            self._task = self._user_task(self._clients[0][1])
            self._identity: dict[str, Any] = {"data": self.data.name}
        else:
            if dataset is None or clients is None:
                raise ValueError("a model factory needs its data: --data module:function (the "
                                 "clients' datasets), or --dataset NAME --clients K (a built-in "
                                 "dataset split iid)")
            if clients < 1:
                raise ValueError(f"--clients must be >= 1, got {clients}")
            ds = load_dataset(dataset, root=data_root, seed=0)
            part = make_partition(ds.train_y, clients, "iid", seed=seed)
            x, y = ds.train_x, ds.train_y
            self._clients = [(x[torch.as_tensor(i)], y[torch.as_tensor(i)])
                             for i in part.indices]
            self._test = (ds.test_x, ds.test_y)
            self.data_name = f"dataset {dataset!r}"
            self._task = as_task(self.loss_obj) if self.loss_obj is not None else ds.task
            self._identity = {"dataset": dataset, "clients": clients}
        self._check_factory()

    def _scan(self) -> dict[int, Path]:
        files: dict[int, Path] = {}
        for p in sorted(self.path.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if not (p / ADAPTER_FILE).is_file():
                    continue
            elif p.suffix not in self.SUFFIXES:
                continue
            m = _ROUND_FILE.search(p.stem if p.is_file() else p.name)
            if m is None:
                raise ValueError(f"cannot tell the round of {p.name}; put the round number in "
                                 "the name (e.g. round_00010.pt)")
            r = int(m.group(1))
            if r in files:
                raise ValueError(f"{files[r].name} and {p.name} both claim round {r}")
            files[r] = p
        if not files:
            raise ValueError(f"{self.path} holds no *.pt or *.safetensors state_dict files, no "
                             f"folders with {ADAPTER_FILE} (and no config.json of a hessrank "
                             "run)")
        return files

    def _user_task(self, targets: Tensor) -> Task:
        if self.loss_obj is not None:
            obj = self.loss_obj
            if inspect.isclass(obj) and issubclass(obj, Task):
                obj = obj()
            return as_task(obj)
        if targets.is_floating_point():
            raise ValueError("the targets are floating point: pass their loss with --loss "
                             "module:name (a task or loss_fn(outputs, targets))")
        return ClassificationTask()

    def _check_factory(self) -> None:
        """Build the model once and run 2 training samples through it (before any work)."""
        model = _build(self.factory, self.factory_name)
        if self.dtype is not None:
            model = model.to(self.dtype)
        x = slice_inputs(self._clients[0][0], 0, 2)
        p_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        x = pytree.tree_map(lambda t: t.to(p_dtype) if isinstance(t, Tensor)
                            and t.is_floating_point() else t, x)
        try:
            with torch.no_grad():
                call_model(model.eval(), x)
        except Exception as err:  # shape mismatches surface as several error types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"model factory {self.factory_name} does not fit the "
                             f"{self.data_name} (inputs {shape}): {first}") from None
        self.native_dtype = str(p_dtype)

    def fingerprint(self) -> str:
        identity = dict(self._identity)
        if "data" in identity:
            identity["hashes"] = [data_hash(x, y) for x, y in self._clients]
            identity["test"] = None if self._test is None else data_hash(*self._test)
        return digest({"kind": self.kind, **identity})

    def code_hash(self) -> str | None:
        fn = self.data.fn if isinstance(getattr(self, "data", None), UserData) else None
        return source_hash(self.factory, self.loss_obj, fn)

    def rounds(self) -> list[int]:
        return sorted(self._files)

    def checkpoint_path(self, round: int) -> Path:
        return self._files[round]

    def checkpoint_hash(self, round: int) -> str:
        p = self._files[round]
        return file_hash(p / ADAPTER_FILE if p.is_dir() else p)

    def checkpoint_content(self, round: int) -> str:
        return self.checkpoint_hash(round)  # torch.save and safetensors files of one state
        # written twice hold the same bytes (safetensors: no metadata here)

    def load_model(self, round: int) -> nn.Module:
        path = self._files[round]
        if path.is_dir():
            return self._load_adapter(path)
        state = load_state_dict(path)
        model = _build(self.factory, self.factory_name)
        if self.dtype is not None:
            model = model.to(self.dtype)
        _fit(model, state, path)
        return model.eval()

    def _load_adapter(self, folder: Path) -> nn.Module:
        """The base model with round ``folder``'s PEFT adapter, adapters trainable (so the
        analysis differentiates the adapters; name others with ``--params``)."""
        try:
            from peft import PeftModel  # optional dependency, only for adapter folders
        except ImportError:
            raise ValueError(f"{folder} holds a PEFT adapter; install peft to analyze it "
                             "(pip install 'hessrank[hf]' peft)") from None
        base = _build(self.factory, self.factory_name)
        try:
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
        except Exception as err:  # peft raises many types for a bad folder
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"adapter {folder} does not fit the base model of "
                             f"{self.factory_name}: {first}") from None
        if self.dtype is not None:
            model = model.to(self.dtype)
        return model.eval()

    def client_data(self) -> list[Pair]:
        return list(self._clients)

    def test(self) -> Pair | None:
        return self._test

    def task(self) -> Task:
        return self._task


StateDictDir = CheckpointDir
"""The folder source under its earlier name (a folder of state_dict files)."""


class RunSource:
    """A hessrank run directory (:class:`hessrank.fl.rundir.RunDir`) as a source."""

    kind = "run"

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        self.run = RunDir(path)
        self.path, self.dtype = self.run.path, dtype
        self.native_dtype = self.run.config.dtype
        self._content: dict[int, str] = {}

    def fingerprint(self) -> str:
        cfg = json.loads((self.path / "config.json").read_text())
        dropped = [k for k in _BOOKKEEPING if not (k == "rounds" and _rounds_matter(cfg))]
        kept = {k: v for k, v in cfg.items() if k not in dropped}
        part = self.path / "partition.json"
        return digest({"kind": self.kind, "config": kept,
                       "partition": file_hash(part) if part.is_file() else None})

    def code_hash(self) -> str | None:
        return None  # hessrank's own models: the version and revision are in analysis.json

    def rounds(self) -> list[int]:
        return self.run.rounds()

    def checkpoint_path(self, round: int) -> Path:
        return self.run.checkpoint_path(round)

    def checkpoint_hash(self, round: int) -> str:
        """The checkpoint's :func:`content_hash`, once it is known to be this run's round
        ``round``: not its file's bytes, whose safetensors header orders the metadata
        differently at every write, so the same command would record other hashes."""
        path = self.run.checkpoint_path(round)
        tensors, meta = read_tensors(path, "checkpoint")  # unreadable: the round fails
        saved = meta.get("round")
        if saved is not None and saved.strip().isdigit() and int(saved) != int(round):
            raise CheckpointMismatchError(
                f"checkpoint {path} is round {int(saved)}'s (its metadata), not round {round}'s "
                f"of run {self.path}: it was copied in from elsewhere; restore it or retrain")
        try:
            self.run.read(round)  # the trainer's own checks where its checkpoints carry them
        except ValueError as err:
            raise CheckpointMismatchError(str(err)) from None
        self._content[round] = content_hash(tensors, meta)
        return self._content[round]

    def checkpoint_content(self, round: int) -> str:
        """:func:`content_hash` of the checkpoint (after :meth:`checkpoint_hash`)."""
        if round not in self._content:
            self.checkpoint_hash(round)
        return self._content[round]

    def load_model(self, round: int) -> nn.Module:
        return self.run.load_model(round, dtype=self.dtype)

    def client_data(self) -> list[Pair]:
        return self.run.client_data()

    def test(self) -> Pair | None:
        ds = self.run.dataset()
        return ds.test_x, ds.test_y

    def task(self) -> Task:
        return self.run.task()


def _rounds_matter(config: dict[str, Any]) -> bool:
    return any(config.get(k) in values for k, values in _ROUNDS_MATTER.items())


def open_source(run_dir: str | Path, settings: AnalysisSettings) -> Source:
    """The source at ``run_dir``: a run directory, or with ``settings.model_factory`` a
    checkpoint folder."""
    run_dir = Path(run_dir)
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    if settings.model_factory is None:
        if not run_dir.exists():
            raise FileNotFoundError(f"no run directory at {run_dir}; train one first")
        if not (run_dir / "config.json").is_file():
            raise ValueError(
                f"{run_dir} has no config.json of a hessrank run; for other checkpoints pass "
                "--model module:function and --data module:function (or --dataset NAME "
                "--clients K)"
            )
        return RunSource(run_dir, dtype)
    return CheckpointDir(run_dir, settings.model_factory, settings.dataset, settings.clients,
                         seed=settings.seed, dtype=dtype, data_root=settings.data_root,
                         data=settings.data, loss=settings.loss)
