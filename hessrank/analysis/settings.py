"""The settings of one trajectory analysis, typed and validated in one place (docs/design.md).

:class:`AnalysisSettings` holds every choice of ``hessrank analyze`` (and of
:func:`hessrank.analysis.trajectory.analyze`). :meth:`AnalysisSettings.validate` checks every
value that needs no data — before any checkpoint is read or any file written — and names the
flag in its one-line message, so a bad flag fails once, not once per round. Checks that need the
data (parameter names, client ids, subset sizes, whether a model factory fits the data, the
checkpoints' identities) run in :func:`hessrank.analysis.executor.open_call` right after the
source is opened, still before any unit is computed or any output written.

This module imports only the standard library and the estimator registry at module level, so
the command line reads its defaults (and ``--help`` answers) without importing torch; the
checks that need torch, the subject parser or the curvature registry import them when
:meth:`AnalysisSettings.validate` runs.

Example:
    >>> AnalysisSettings(matvecs=40, seed=0).validate().matvecs
    40
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hessrank.analysis.quantities import FAMILIES, parse_quantities
from hessrank.curvature.registry import CURVATURES as CURVATURE_REGISTRY  # imports no torch

__all__ = ["CURVATURES", "MAX_SEED", "AnalysisSettings", "default_threads", "digest"]

CURVATURES = tuple(CURVATURE_REGISTRY)
"""Curvature matrices ``--curvature`` names (:mod:`hessrank.curvature.registry`)."""

MAX_SEED = 2**63 - 1
"""Largest accepted seed (torch generators take 64-bit seeds)."""

_DTYPES = ("float32", "float64")
_MODES = ("eval", "train")


def digest(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 prefix of the canonical JSON of ``obj`` (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def default_threads() -> int:
    """torch CPU threads when ``--threads`` is not given: half the cores, at most 4.

    Measured on the 2-core development machine with other work running (docs in the issue
    note): the README example's round 0 took 148 s at torch's default (2 threads) and 21 s at
    1 thread; small Hessian products gain little from more threads and lose much under load.
    """
    cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def _split(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    return tuple(t.strip() for t in items if t.strip())


@dataclass(frozen=True)
class AnalysisSettings:
    """Every choice of one analysis call.

    What to compute (these enter the unit keys and the ``settings`` column):
        quantities, matvecs, seed, curvature, rtol, max_matvecs, params, batch_size, dtype,
        mode, density_probes, density_steps (default ``matvecs``), alignment_ranks (None = the
        full gradient).
    Which part of the run: rounds ("start:stop:step", "5,10" or a list; None = all saved),
        subjects (see :func:`hessrank.analysis.subjects.parse_subjects`).
    For a folder of checkpoints of another trainer (:class:`hessrank.analysis.sources.
        CheckpointDir`): model_factory ("module:function" or a callable of no arguments), and
        the data: data ("module:function" returning the clients' datasets, optionally a test
        set) or dataset, clients, data_root (a built-in dataset split iid); loss
        ("module:name" or an object: a task or a plain ``loss_fn(outputs, targets)``).
    How to run: device, threads (None: leave torch's setting), memory_mb (each operator's
        ``cache_budget_mb``: linearizations beyond it are not kept and products stream over
        micro-batches; the route changes, the numbers only by floating-point order), progress,
        force (analyze a
        different run into a directory that holds another run's analysis, dropping its rows),
        prune (drop the rows this call does not select), lock_timeout (seconds to wait for
        another writer; negative: forever).
    Splitting the work (none of these changes a number): shard (I, N) — the I-th of N
        deterministic slices of the (round × subject group) units, for job arrays writing into
        one directory; workers — a local pool of that many processes, each running one shard
        with its share of ``threads``.
    """

    rounds: str | tuple[int, ...] | None = None
    subjects: tuple[str, ...] = ("server", "clients")
    quantities: tuple[str, ...] = ("stable-rank",)
    matvecs: int = 40
    seed: int = 0
    curvature: str = "hessian"
    rtol: float | None = None
    max_matvecs: int = 400
    params: tuple[str, ...] | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    mode: str = "eval"
    density_probes: int = 4
    density_steps: int | None = None
    alignment_ranks: tuple[int | None, ...] = (1, 2, 4, 8, None)
    model_factory: str | Callable | None = field(default=None, compare=False)
    data: str | Callable | None = field(default=None, compare=False)
    loss: str | Callable | Any | None = field(default=None, compare=False)
    dataset: str | None = None
    clients: int | None = None
    data_root: str | None = None
    threads: int | None = None
    memory_mb: float = 2048.0
    progress: bool = True
    force: bool = False
    prune: bool = False
    lock_timeout: float = -1.0
    shard: tuple[int, int] | None = None
    workers: int = 1

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, **kwargs: Any) -> AnalysisSettings:
        """Settings from loose values (strings, lists, torch dtypes), normalized; unknown names
        are a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown analysis settings {unknown}; valid: {sorted(known)}")
        kw = dict(kwargs)
        for name in ("subjects", "quantities", "params"):
            if name in kw:
                kw[name] = _split(kw[name])
        if isinstance(kw.get("rounds"), (list, tuple)):
            kw["rounds"] = tuple(int(r) for r in kw["rounds"])
        if "alignment_ranks" in kw:
            kw["alignment_ranks"] = _ranks(kw["alignment_ranks"])
        if kw.get("dtype") is not None and not isinstance(kw["dtype"], str):
            kw["dtype"] = str(kw["dtype"]).replace("torch.", "")
        if isinstance(kw.get("shard"), str):
            kw["shard"] = _shard(kw["shard"])
        elif kw.get("shard") is not None:
            kw["shard"] = tuple(int(v) for v in kw["shard"])
        if kw.get("device") is None:
            kw["device"] = "cpu"
        kw["device"] = str(kw["device"])
        return cls(**kw)

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> AnalysisSettings:
        """Check every value that needs no data; ValueError naming the flag. Returns self."""
        # the subject parser and the estimators' minimum budget live beside torch code: they
        # are imported here, when a call is checked, so that --help stays fast
        from hessrank.analysis.subjects import parse_subjects
        from hessrank.linalg.deflated import MIN_PROBES, min_budget

        parse_quantities(self.quantities or ())
        parse_subjects(self.subjects or ())
        if self.curvature not in CURVATURES:
            raise ValueError(f"--curvature {self.curvature}: unknown curvature "
                             f"{self.curvature!r}; choose from {', '.join(CURVATURES)}")

        _int_at_least("--matvecs", self.matvecs, min_budget("stable_rank"),
                      f"({MIN_PROBES} residual probes for a calibrated error bar plus Lanczos "
                      "steps)")
        _int_at_least("--max-matvecs", self.max_matvecs, self.matvecs, "(at least --matvecs)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not (
                0 <= self.seed <= MAX_SEED):
            raise ValueError(f"--seed must be an integer in [0, 2**63 - 1], got {self.seed}")
        if self.rtol is not None and not (0.0 < float(self.rtol) < 1.0):
            raise ValueError(f"--rtol must be in (0, 1), e.g. 0.01, got {self.rtol}")
        if self.params is not None and not self.params:
            raise ValueError("--params is empty; give parameter names or leave it out")
        if self.batch_size is not None:
            _int_at_least("--batch-size", self.batch_size, 1)
        if self.dtype not in (None, *_DTYPES):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.mode not in _MODES:
            raise ValueError(f"--mode must be eval or train, got {self.mode!r}")
        _int_at_least("--density-probes", self.density_probes, 1)
        if self.density_steps is not None:
            _int_at_least("--density-steps", self.density_steps, 1)
        for r in self.alignment_ranks:
            if r is not None and (not isinstance(r, int) or r < 1):
                raise ValueError(f"--alignment-ranks must be ranks >= 1 or 'full', got {r!r}")
        if not self.alignment_ranks:
            raise ValueError("--alignment-ranks is empty; e.g. 1,2,4,full")
        if self.clients is not None:
            _int_at_least("--clients", self.clients, 1)
        if self.threads is not None:
            _int_at_least("--threads", self.threads, 1)
        if not (isinstance(self.memory_mb, (int, float)) and 0 < self.memory_mb < float("inf")):
            raise ValueError(f"--memory-mb must be a positive number of MiB, got "
                             f"{self.memory_mb!r}")
        if self.model_factory is not None and self.data is None and (
                self.dataset is None or self.clients is None):
            raise ValueError("a model factory needs its data: --data module:function (the "
                             "clients' datasets), or --dataset NAME --clients K (a built-in "
                             "dataset split iid)")
        if self.model_factory is None and (self.data is not None or self.loss is not None):
            raise ValueError("--data and --loss go with --model module:function (checkpoints "
                             "of another trainer); a hessrank run directory has its own")
        if self.data is not None and self.dataset is not None:
            raise ValueError("give --data or --dataset, not both")
        _int_at_least("--workers", self.workers, 1)
        if self.shard is not None:
            i, n = self.shard
            if not 1 <= i <= n:
                raise ValueError(f"--shard must be I/N with 1 <= I <= N, got {i}/{n}")
            if self.prune:
                raise ValueError("--prune with --shard would drop the other shards' rows; "
                                 "prune in a call without --shard")
            if self.workers > 1:
                raise ValueError("--workers runs its own shards; leave out --shard")
        _check_device(self.device)
        return self

    # ---- keys -------------------------------------------------------------------------------
    def family_settings(self, family: str) -> dict[str, Any]:
        """The settings that determine the numbers of one estimator family
        (:data:`hessrank.analysis.quantities.FAMILIES`); hashed into the ``settings`` column
        and the unit keys."""
        if family not in FAMILIES:
            raise ValueError(f"unknown estimator family {family!r}; valid: {', '.join(FAMILIES)}")
        return FAMILIES[family].settings(self)

    def to_json(self) -> dict[str, Any]:
        """JSON form for analysis.json (user objects by name)."""
        out = dataclasses.asdict(self)
        for name in ("model_factory", "data", "loss"):
            f = getattr(self, name)
            if f is not None and not isinstance(f, str):
                qual = getattr(f, "__qualname__", None) or type(f).__qualname__
                out[name] = f"{getattr(f, '__module__', '?')}:{qual}"
        out["alignment_ranks"] = [0 if r is None else r for r in self.alignment_ranks]
        return out


def _ranks(spec: Any) -> tuple[int | None, ...]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int | None] = []
    for t in items:
        if t is None:
            out.append(None)
            continue
        s = str(t).strip()
        if not s:
            continue
        if s in ("0", "full", "None"):
            out.append(None)
            continue
        try:
            out.append(int(s))
        except ValueError:
            raise ValueError(f"--alignment-ranks must be ranks >= 1 or 'full', got {s!r}") from None
    return tuple(out)


def _shard(spec: str) -> tuple[int, int]:
    i, sep, n = spec.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(i), int(n)
    except ValueError:
        raise ValueError(f"--shard must be I/N (e.g. 2/8), got {spec!r}") from None


def probe_seed(seed: int, round_idx: int, label: str) -> int:
    """The estimator seed of one (round, subject group, estimator family) unit.

    ``SeedSequence([seed, round, crc32(label)])``: every unit draws its own probes and start
    vectors, so estimator errors are independent across rounds and subject groups (with one
    seed for all, the same probes came back at every round and errors correlated at ~0.9
    between subjects), while the same command still gives the same bits. Subset draws keep
    their own round-independent seeds (``data_seed``), so the same subsets are compared at
    every round.
    """
    import numpy as np  # when a unit runs: keeps --help fast

    ss = np.random.SeedSequence([int(seed), int(round_idx), zlib.crc32(label.encode())])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def _int_at_least(flag: str, value: Any, low: int, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{flag} must be >= {low}{' ' + why if why else ''}, got {value!r}")


def _check_device(device: str) -> None:
    import torch  # when a call is checked: keeps --help fast

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch "
                         f"{torch.__version__}); use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r} is not supported; use cpu or cuda")
