"""Batch spectral analysis of a training trajectory, resumable (DESIGN.md §6).

For each saved round and each *group* of subjects (:mod:`hessrank.analysis.subjects`) one
stacked operator is built — server and clients together as a FederatedHessian, the D draws of
a subset size as a stack — and each estimator runs once on it:

    stable-rank   srank(H) = ‖H‖_F²/‖H‖₂² ± delta-method stderr; also logs the top-k stable
                  rank Σ_{i≤k} θ_i²/θ_1² and the intrinsic dimension tr(H)/‖H‖₂
    top-eig       the top Ritz values by magnitude (k = 1..10, signed); stderr of k = 1 is the
                  error bound min(r, r²/gap) from its Ritz residual r
    trace         tr(H) (Krylov-deflated)     frobenius   ‖H‖_F² (Krylov-deflated)
    density       SLQ; raw tridiagonals to densities/round_XXXXX_<subject>.npz and the entropy
                  effective rank exp(−Σ q log q), q = |λ|/Σ|λ|, in the table
    alignment     mean pairwise cosine of client gradients per weight matrix and rank
                  (:mod:`hessrank.analysis.alignment`), subject "clients"

stable-rank, top-eig, trace and frobenius share ONE deflated Lanczos run of ``matvecs``
products. Each (round × group) unit is written atomically to ``out/units/`` and skipped on a
rerun, so killing the analysis at any moment and rerunning completes the table with no
duplicate and no lost row. The table is the concatenation of the units, written to
``out/results.parquet`` and ``out/results.csv``. A checkpoint that cannot be loaded, or a unit
whose estimate fails, is warned about, listed in ``out/errors.csv`` and skipped.

Example:
    >>> table = analyze("runs/x", rounds="0:50:10", subjects="server,clients")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessrank.analysis.alignment import gradient_alignment
from hessrank.analysis.subjects import (
    Subject,
    SubjectGroup,
    build_operator,
    parse_subjects,
    realize,
)
from hessrank.checkpoints import RunDir, atomic_write_bytes, atomic_write_text
from hessrank.curvature.operator import LossFn
from hessrank.linalg import spectral_density, stable_rank

__all__ = [
    "COLUMNS",
    "QUANTITIES",
    "StateDictDir",
    "analyze",
    "load_factory",
    "parse_quantities",
    "select_rounds",
]

QUANTITIES = ("stable-rank", "top-eig", "trace", "frobenius", "density", "alignment")
"""Quantities ``analyze`` accepts."""

COLUMNS = [
    "round", "subject", "subject_kind", "subject_size", "quantity", "k", "layer", "value",
    "stderr", "matvecs", "seconds", "seed", "data_seed",
]
"""Columns of the tidy table. ``k``: eigenvalue index (top-eig), truncation rank (alignment,
0 = full gradient), else 0. ``layer``: weight name (alignment), else "". ``seconds``: wall time
of the stacked estimator call that produced the row (shared by the subjects of its unit).
``data_seed``: the seed that drew a subset's indices, -1 for other subjects."""

_LANCZOS_FAMILY = ("stable-rank", "top-eig", "trace", "frobenius")
_K_TOP = 10
_ROUND_FILE = re.compile(r"(\d+)(?!.*\d)")


# ---- parsing --------------------------------------------------------------------------------
def parse_quantities(spec: str | Sequence[str]) -> list[str]:
    """Quantity names from "stable-rank,top-eig" or a sequence; ValueError on unknown ones."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [q.strip() for q in items if q.strip()]
    if not names:
        raise ValueError(f"no quantities given; valid quantities: {', '.join(QUANTITIES)}")
    for q in names:
        if q not in QUANTITIES:
            raise ValueError(f"unknown quantity {q!r}; valid quantities: {', '.join(QUANTITIES)}")
    return list(dict.fromkeys(names))


def select_rounds(spec: str | Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """Rounds to analyze among the saved ones.

    ``None``: all. A slice string "start:stop:step" keeps saved rounds r with
    start ≤ r ≤ stop (stop inclusive; empty parts mean open) and (r − start) divisible by step.
    A list (or "5,10,20") names rounds exactly; a missing one is an error listing the saved.
    """
    avail = sorted(set(int(r) for r in available))
    if spec is None:
        return avail
    if isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        if len(parts) > 3:
            raise ValueError(f"bad rounds {spec!r}; use start:stop:step, e.g. 0:50:5")
        try:
            vals = [int(p) if p.strip() else None for p in parts] + [None] * (3 - len(parts))
        except ValueError:
            raise ValueError(f"bad rounds {spec!r}; use start:stop:step, e.g. 0:50:5") from None
        start, stop, step = vals
        start = 0 if start is None else start
        step = 1 if step is None else step
        if step < 1:
            raise ValueError(f"bad rounds {spec!r}: step must be >= 1")
        chosen = [r for r in avail
                  if r >= start and (stop is None or r <= stop) and (r - start) % step == 0]
    else:
        if isinstance(spec, str):
            try:
                wanted = [int(t) for t in spec.split(",") if t.strip()]
            except ValueError:
                raise ValueError(
                    f"bad rounds {spec!r}; use start:stop:step (0:50:5) or a list (5,10,20)"
                ) from None
        else:
            wanted = [int(r) for r in spec]
        missing = [r for r in wanted if r not in avail]
        if missing:
            raise ValueError(f"rounds {missing} have no checkpoint; saved rounds: {avail}")
        chosen = sorted(set(wanted))
    if not chosen:
        raise ValueError(f"rounds {spec!r} select none of the saved rounds {avail}")
    return chosen


def load_factory(spec: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Resolve "package.module:function" (or pass a callable through)."""
    if callable(spec):
        return spec
    mod, sep, fn = str(spec).partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"bad model factory {spec!r}; use module:function, e.g. mypkg.nets:make")
    try:
        module = importlib.import_module(mod)
    except ImportError as err:
        raise ValueError(f"cannot import module {mod!r} of model factory {spec!r}: {err}") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise ValueError(f"module {mod!r} has no callable {fn!r} (model factory {spec!r})")
    return factory


# ---- sources of checkpoints -------------------------------------------------------------------
class StateDictDir:
    """A plain directory of ``state_dict`` files for models hessrank did not train.

    Files ``*.pt``/``*.pth`` (read with ``torch.load(weights_only=True)``) or ``*.safetensors``;
    the round is the last integer in the file name (``epoch_12.pt`` → 12). The model comes from
    ``factory()`` and the data from :func:`hessrank.datasets.load_dataset` with a seeded iid
    split among ``clients`` clients.
    """

    SUFFIXES = (".pt", ".pth", ".safetensors")

    def __init__(self, path: str | Path, factory: Callable[[], nn.Module], dataset: str,
                 clients: int, *, seed: int = 0, dtype: torch.dtype | None = None,
                 data_root: str | None = None) -> None:
        from hessrank.datasets import load_dataset
        from hessrank.fl.partition import make_partition

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {self.path}")
        self.factory, self.dtype = factory, dtype
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
            raise ValueError(f"clients must be >= 1, got {clients}")
        self.data = load_dataset(dataset, root=data_root, seed=0)
        self.partition = make_partition(self.data.train_y, clients, "iid", seed=seed)

    def rounds(self) -> list[int]:
        return sorted(self._files)

    def checkpoint_path(self, round: int) -> Path:
        return self._files[round]

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
        with torch.random.fork_rng(devices=[]):
            model = self.factory()
        if self.dtype is not None:
            model = model.to(self.dtype)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"checkpoint {path} does not match the model: {first}") from None
        return model.eval()

    def client_data(self) -> list[tuple[Tensor, Tensor]]:
        x, y = self.data.train_x, self.data.train_y
        return [(x[torch.as_tensor(i)], y[torch.as_tensor(i)]) for i in self.partition.indices]

    def test(self) -> tuple[Tensor, Tensor]:
        return self.data.test_x, self.data.test_y

    def loss_fn(self) -> LossFn:
        return self.data.loss_fn()


class _RunSource:
    """Adapter of a hessrank RunDir to the source interface above."""

    def __init__(self, run: RunDir, dtype: torch.dtype | None) -> None:
        self.run, self.dtype, self.path = run, dtype, run.path

    def rounds(self) -> list[int]:
        return self.run.rounds()

    def checkpoint_path(self, round: int) -> Path:
        return self.run.checkpoint_path(round)

    def load_model(self, round: int) -> nn.Module:
        return self.run.load_model(round, dtype=self.dtype)

    def client_data(self) -> list[tuple[Tensor, Tensor]]:
        return self.run.client_data()

    def test(self) -> tuple[Tensor, Tensor]:
        ds = self.run.dataset()
        return ds.test_x, ds.test_y

    def loss_fn(self) -> LossFn:
        return self.run.loss_fn()


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return getattr(torch, dtype)


def _open_source(run_dir: Path, model_factory, dataset, clients, seed, dtype, data_root):
    if model_factory is None:
        if not (run_dir / "config.json").is_file() and run_dir.is_dir():
            raise ValueError(
                f"{run_dir} has no config.json of a hessrank run; for other checkpoints pass "
                "--model-factory module:function --dataset NAME --clients K"
            )
        return _RunSource(RunDir(run_dir), dtype)
    if dataset is None or clients is None:
        raise ValueError("a model factory needs --dataset NAME and --clients K for the data")
    return StateDictDir(run_dir, load_factory(model_factory), dataset, int(clients), seed=seed,
                        dtype=dtype, data_root=data_root)


# ---- units of work ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    round: int
    label: str  # group label or "alignment"
    group: SubjectGroup | None
    key: str  # hash of the settings that produce this unit's rows

    @property
    def filename(self) -> str:
        return f"round_{self.round:05d}__{self.label}__{self.key}.parquet"


def _settings_key(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def _row(r: int, subject, quantity: str, value, stderr, matvecs: int, seconds: float,
         seed: int, *, k: int = 0, layer: str = "") -> dict[str, Any]:
    return {
        "round": int(r), "subject": subject.name, "subject_kind": subject.kind,
        "subject_size": int(subject.size), "quantity": quantity, "k": int(k), "layer": layer,
        "value": float(value), "stderr": float(stderr), "matvecs": int(matvecs),
        "seconds": float(seconds), "seed": int(seed), "data_seed": int(subject.data_seed),
    }


def _save_density(out: Path, r: int, name: str, alpha, beta, dim: int, num_matvecs: int,
                  seed: int) -> None:
    buf = io.BytesIO()
    np.savez(buf, alpha=alpha, beta=beta, dim=dim, num_matvecs=num_matvecs, seed=seed,
             round=r, subject=name)
    atomic_write_bytes(out / "densities" / f"round_{r:05d}_{name}.npz", buf.getvalue())


def _run_group(unit: _Unit, model: nn.Module, loss_fn: LossFn, quantities: Sequence[str],
               cfg: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    group, r, seed, mv = unit.group, unit.round, cfg["seed"], cfg["matvecs"]
    op = build_operator(group, model, loss_fn, **cfg["operator_kwargs"])
    rows: list[dict[str, Any]] = []
    pairs = list(zip(group.subjects, group.index))
    if any(q in quantities for q in _LANCZOS_FAMILY):
        t0 = time.perf_counter()
        res = stable_rank(op, num_matvecs=mv, seed=seed, k_top=_K_TOP)
        dt = time.perf_counter() - t0
        n = res.num_matvecs
        nan = float("nan")
        for s, j in pairs:
            if "stable-rank" in quantities:
                rows.append(_row(r, s, "stable-rank", res.value[j], res.stderr[j], n, dt, seed))
                rows.append(_row(r, s, "top-k-stable-rank", res.top_k_stable_rank[j], nan, n,
                                 dt, seed, k=res.top_eigenvalues.shape[1]))
                rows.append(_row(r, s, "intrinsic-dimension", res.intrinsic_dimension[j], nan,
                                 n, dt, seed))
            if "top-eig" in quantities:
                for i, lam in enumerate(res.top_eigenvalues[j]):
                    err = res.spectral_norm_error[j] if i == 0 else nan
                    rows.append(_row(r, s, "top-eig", lam, err, n, dt, seed, k=i + 1))
            if "trace" in quantities:
                rows.append(_row(r, s, "trace", res.trace[j], res.trace_stderr[j], n, dt, seed))
            if "frobenius" in quantities:
                rows.append(_row(r, s, "frobenius", res.frobenius_sq[j],
                                 res.frobenius_sq_stderr[j], n, dt, seed))
    if "density" in quantities:
        t0 = time.perf_counter()
        dens = spectral_density(op, num_probes=cfg["density_probes"],
                                lanczos_steps=cfg["density_steps"], seed=seed)
        erank, erank_se = dens.effective_rank()
        dt = time.perf_counter() - t0
        for s, j in pairs:
            _save_density(out, r, s.name, dens.alpha[j], dens.beta[j], dens.dim,
                          dens.num_matvecs, seed)
            rows.append(_row(r, s, "effective-rank", erank[j], erank_se[j], dens.num_matvecs,
                             dt, seed))
    return rows


def _run_alignment(unit: _Unit, model: nn.Module, loss_fn: LossFn, client_data, cfg) -> list:
    t0 = time.perf_counter()
    params = cfg["operator_kwargs"].get("params")
    layers = None
    if params is not None:
        named = dict(model.named_parameters())
        layers = [n for n in params if n not in named or named[n].ndim >= 2]  # bad: reported
    table = gradient_alignment(model, loss_fn, client_data, ranks=cfg["alignment_ranks"],
                               layers=layers, mode=cfg["operator_kwargs"].get("mode", "eval"),
                               batch_size=cfg["operator_kwargs"].get("batch_size"))
    dt = time.perf_counter() - t0
    subj = Subject("clients", "client", sum(int(y.shape[0]) for _, y in client_data))
    return [_row(unit.round, subj, "alignment", t.value, t.stderr, 0, dt, cfg["seed"],
                 k=int(t.rank), layer=str(t.layer)) for t in table.itertuples()]


def _write_unit(path: Path, rows: list[dict[str, Any]]) -> None:
    """The commit point of a unit: its rows land in one atomic file write."""
    buf = io.BytesIO()
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _read_unit(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path)
    except Exception:  # an unreadable unit (disk trouble) is recomputed
        return None


def _write_errors(out: Path, errors: list[dict[str, Any]]) -> None:
    cols = ["round", "unit", "path", "error"]
    atomic_write_text(out / "errors.csv", pd.DataFrame(errors, columns=cols).to_csv(index=False))


# ---- the driver -----------------------------------------------------------------------------
def analyze(
    run_dir: str | Path,
    *,
    rounds: str | Sequence[int] | None = None,
    subjects: str | Sequence[str] = ("server", "clients"),
    quantities: str | Sequence[str] = ("stable-rank",),
    matvecs: int = 40,
    seed: int = 0,
    out: str | Path | None = None,
    model_factory: str | Callable[[], nn.Module] | None = None,
    dataset: str | None = None,
    clients: int | None = None,
    data_root: str | None = None,
    params: Sequence[str] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    mode: str = "eval",
    density_probes: int = 4,
    density_steps: int | None = None,
    alignment_ranks: Sequence[int | None] = (1, 2, 4, 8, None),
) -> pd.DataFrame:
    """Estimate Hessian quantities of every subject at every selected round (module doc).

    Args:
        run_dir: a hessrank run directory, or (with ``model_factory``) a directory of
            ``state_dict`` files.
        rounds: "start:stop:step" (stop inclusive), "5,10", a list, or None for all saved.
        subjects: "server,clients,subset:50x5,test" or a sequence (see
            :func:`~hessrank.analysis.subjects.parse_subjects`).
        quantities: any of :data:`QUANTITIES`.
        matvecs: products per stacked operator for the Lanczos family (≥ 4).
        seed: seeds every estimator (the same in every round) and the subset draws.
        out: output directory (default ``run_dir/analysis``).
        model_factory: "module:function" or a callable returning the model, for state_dict
            directories; then ``dataset`` (a :func:`~hessrank.datasets.load_dataset` name) and
            ``clients`` (iid split seeded by ``seed``) give the data.
        params: parameter names to differentiate (default all).
        progress: show a tqdm bar over rounds × units.
        batch_size: split each subject's data into batches of this size (memory).
        dtype: "float32"/"float64" for the analysis (default: as trained).
        device: where products run (default CPU).
        mode: network mode, "eval" (default) or "train".
        density_probes, density_steps: SLQ probes and Lanczos steps (default ``matvecs``).
        alignment_ranks: truncation ranks for ``alignment`` (None: full gradient).
    Returns:
        The tidy table (:data:`COLUMNS`), also written to ``out/results.{parquet,csv}``.
        ``table.attrs["errors"]`` lists failed units (also in ``out/errors.csv``).
    """
    run_dir = Path(run_dir)
    qs = parse_quantities(quantities)
    specs = parse_subjects(subjects)
    if matvecs < 4:
        raise ValueError(f"matvecs must be >= 4 (Lanczos steps plus 2 probes), got {matvecs}")
    tdtype = _dtype(dtype)
    source = _open_source(run_dir, model_factory, dataset, clients, seed, tdtype, data_root)
    if not source.rounds():
        raise ValueError(f"{run_dir} has no saved checkpoints to analyze; train with "
                         "save_every > 0 or point at the run's directory")
    chosen = select_rounds(rounds, source.rounds())
    out = Path(out) if out is not None else run_dir / "analysis"
    client_data = source.client_data()
    test = source.test() if any(s.kind == "test" for s in specs) else None
    groups = realize(specs, client_data=client_data, test=test, seed=seed)
    loss_fn = source.loss_fn()
    cfg: dict[str, Any] = {
        "matvecs": int(matvecs), "seed": int(seed),
        "density_probes": int(density_probes),
        "density_steps": int(density_steps or matvecs),
        "alignment_ranks": list(alignment_ranks),
        "operator_kwargs": {"params": list(params) if params is not None else None,
                            "mode": mode, "batch_size": batch_size},
    }
    base = {"matvecs": cfg["matvecs"], "seed": cfg["seed"], "dtype": str(tdtype),
            "operator_kwargs": cfg["operator_kwargs"]}
    lanczos_qs = sorted(q for q in qs if q != "alignment")
    units: list[_Unit] = []
    for r in chosen:
        if lanczos_qs:
            for g in groups:
                settings = {**base, "quantities": lanczos_qs, "group": g.label,
                            "subjects": [s.name for s in g.subjects],
                            "data_seeds": [s.data_seed for s in g.subjects]}
                if "density" in qs:
                    settings.update(density=[cfg["density_probes"], cfg["density_steps"]])
                units.append(_Unit(r, g.label, g, _settings_key(settings)))
        if "alignment" in qs:
            settings = {**base, "alignment_ranks": cfg["alignment_ranks"]}
            units.append(_Unit(r, "alignment", None, _settings_key(settings)))
    units_dir = out / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.json", json.dumps({
        "run_dir": str(run_dir), "rounds": chosen, "subjects": [s.label for s in specs],
        "quantities": qs, "matvecs": matvecs, "seed": seed, "dtype": str(tdtype), "mode": mode,
        "params": cfg["operator_kwargs"]["params"], "density_probes": cfg["density_probes"],
        "density_steps": cfg["density_steps"],
        "alignment_ranks": [0 if x is None else x for x in alignment_ranks],
        "subset_data_seeds": {s.name: s.data_seed for g in groups for s in g.subjects
                              if s.kind == "subset"},
    }, indent=2))

    errors: list[dict[str, Any]] = []
    frames: dict[_Unit, pd.DataFrame] = {}
    bar = tqdm(total=len(units), desc="analyze", unit="unit", disable=not progress)
    try:
        for r in chosen:
            todo = []
            for u in (u for u in units if u.round == r):
                done = (units_dir / u.filename)
                frame = _read_unit(done) if done.is_file() else None
                if frame is not None:
                    frames[u] = frame
                    bar.update(1)
                else:
                    todo.append(u)
            if not todo:
                continue
            bar.set_postfix(round=r)
            try:
                model = source.load_model(r)
                if device is not None:
                    model = model.to(device)
            except (ValueError, OSError, RuntimeError) as err:
                path = _safe_path(source, r)
                warnings.warn(f"skipping round {r}: {err}", stacklevel=2)
                errors.extend({"round": r, "unit": u.label, "path": path, "error": str(err)}
                              for u in todo)
                _write_errors(out, errors)
                bar.update(len(todo))
                continue
            for u in todo:
                try:
                    if u.group is None:
                        rows = _run_alignment(u, model, loss_fn, client_data, cfg)
                    else:
                        rows = _run_group(u, model, loss_fn, qs, cfg, out)
                except (ValueError, FloatingPointError) as err:
                    warnings.warn(f"round {r}, {u.label}: {err}", stacklevel=2)
                    errors.append({"round": r, "unit": u.label, "path": _safe_path(source, r),
                                   "error": str(err)})
                    _write_errors(out, errors)
                    bar.update(1)
                    continue
                _write_unit(units_dir / u.filename, rows)
                frames[u] = pd.DataFrame(rows, columns=COLUMNS)
                bar.update(1)
    finally:
        bar.close()
    _write_errors(out, errors)
    ordered = [frames[u] for u in units if u in frames]
    table = (pd.concat(ordered, ignore_index=True) if ordered
             else pd.DataFrame(columns=COLUMNS))
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(out / "results.parquet", buf.getvalue())
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    table.attrs["errors"] = errors
    table.attrs["out"] = str(out)
    return table


def _safe_path(source, r: int) -> str:
    try:
        return str(source.checkpoint_path(r))
    except (ValueError, KeyError):
        return ""
