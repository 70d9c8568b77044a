"""Controls that isolate sample size from label skew (docs/design.md, analysis).

A client differs from the server in two ways: fewer samples (n_c < N) and a skewed label
histogram. The controls separate them:

    matched-size    for client c, random subsets of the server's data of size n_c
    matched-label   for client c, random subsets with c's label histogram (per class k,
                    h_c(k) samples drawn without replacement from the server's class-k data)
    nested          one random permutation π of the training data; subsets π[:n] for
                    n = n_1 < n_2 < … (so S_{n_1} ⊂ S_{n_2} ⊂ …, as in the theorem)

and :func:`rank_regression` fits log srank = β₀ + β_n log n + β_H H(labels) (+ round
effects) by OLS with cluster-robust standard errors by replicate (statsmodels), so the
effect of n is estimated at fixed label entropy H = −Σ_k p_k log p_k.

The index-drawing functions are pure (numpy, seeded); :func:`control_groups` turns them into
:class:`~hessrank.analysis.subjects.SubjectGroup` s and :func:`analyze_controls` estimates
their stable ranks at saved rounds of a run (one stacked operator per group, as
``analyze`` does), writing the same tidy columns plus ``label_entropy`` and ``client``.
The centralized setting ("server = all samples") is a run with one client (``clients = 1``).

Example:
    >>> [len(i) for i in nested_indices(100, [10, 50], seed=0).values()]
    [10, 50]
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hessrank.analysis.settings import probe_seed
from hessrank.analysis.store import COLUMNS
from hessrank.analysis.subjects import Subject, SubjectGroup, build_operator, draw_subset
from hessrank.fl.rundir import RunDir
from hessrank.io import atomic_write_bytes, atomic_write_text
from hessrank.linalg import stable_rank

__all__ = [
    "CONTROL_KINDS",
    "analyze_controls",
    "control_groups",
    "label_entropy",
    "label_matched_indices",
    "nested_indices",
    "rank_regression",
    "size_matched_indices",
    "subject_label_entropy",
]

CONTROL_KINDS = ("matched-size", "matched-label", "nested")
"""``subject_kind`` values of control subjects."""


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


def size_matched_indices(num_train: int, sizes: Sequence[int], draws: int,
                         seed: int) -> list[list[np.ndarray]]:
    """For each client size n_c, ``draws`` sorted random subsets of range(num_train) of size
    n_c (draw d of client c uses stream (seed, 1, c, d))."""
    out = []
    for c, n in enumerate(sizes):
        if n > num_train:
            raise ValueError(f"client {c} has {n} samples, more than the {num_train} available")
        out.append([np.sort(_rng(seed, 1, c, d).choice(num_train, size=int(n), replace=False))
                    for d in range(draws)])
    return out


def label_matched_indices(train_labels: np.ndarray, client_labels: Sequence[np.ndarray],
                          draws: int, seed: int) -> list[list[np.ndarray]]:
    """For each client, ``draws`` subsets of the training data with exactly the client's label
    histogram: per class k, h_c(k) indices drawn without replacement among the class-k ones."""
    y = np.asarray(train_labels)
    by_class = {k: np.flatnonzero(y == k) for k in np.unique(y)}
    out = []
    for c, yc in enumerate(client_labels):
        ks, counts = np.unique(np.asarray(yc), return_counts=True)
        for k, h in zip(ks, counts):
            if k not in by_class or h > by_class[k].size:
                raise ValueError(f"client {c} has {h} samples of class {k}; the training data "
                                 f"has {by_class.get(k, np.array([])).size}")
        draws_c = []
        for d in range(draws):
            rng = _rng(seed, 2, c, d)
            idx = np.concatenate([rng.choice(by_class[k], size=int(h), replace=False)
                                  for k, h in zip(ks, counts)])
            draws_c.append(np.sort(idx))
        out.append(draws_c)
    return out


def nested_indices(num_train: int, sizes: Sequence[int], seed: int,
                   draw: int = 0) -> dict[int, np.ndarray]:
    """Nested subsets: size n → the first n entries of one seeded permutation (sorted), so a
    smaller subset is contained in every larger one."""
    sizes = sorted({int(n) for n in sizes})
    if sizes and (sizes[0] < 1 or sizes[-1] > num_train):
        raise ValueError(f"nested sizes must be in 1..{num_train}, got {sizes}")
    perm = _rng(seed, 3, draw).permutation(num_train)
    return {n: np.sort(perm[:n]) for n in sizes}


def label_entropy(labels: np.ndarray | Tensor) -> float:
    """Shannon entropy −Σ_k p_k log p_k (nats) of a label sample's histogram."""
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    _, counts = np.unique(y, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---- subjects ---------------------------------------------------------------------------------
def control_groups(client_data: Sequence[tuple[Tensor, Tensor]], *, matched_draws: int = 0,
                   nested_sizes: Sequence[int] = (), nested_draws: int = 1, seed: int = 0):
    """Subject groups of the controls over the union of the clients' data (the server's).

    Subjects: ``client{c}_size{d}`` (kind matched-size), ``client{c}_label{d}``
    (matched-label), ``nested{n}_{d}`` (nested; draw d is its own nested chain). One group per
    (kind, client) or per nested draw — a stack of equal-size operators. Returns
    (groups, info) with info: subject name → {"client": c or −1, "label_entropy": H}.
    """
    x = torch.cat([d[0] for d in client_data])
    y = torch.cat([d[1] for d in client_data])
    sizes = [int(d[1].shape[0]) for d in client_data]
    groups, info = [], {}

    def group(label: str, named: list[tuple[str, str, np.ndarray]], client: int):
        subjects = []
        for name, kind, idx in named:
            t = torch.as_tensor(idx)
            subjects.append(Subject(name, kind, len(idx), data=(x[t], y[t])))
            info[name] = {"client": client, "label_entropy": label_entropy(y[t])}
        groups.append(SubjectGroup(label=label, subjects=tuple(subjects),
                                   index=tuple(range(len(subjects)))))

    if matched_draws > 0:
        if y.ndim > 1:  # label_matched_indices would match flattened token positions
            raise ValueError(
                f"matched controls draw subsets with a client's class-label histogram, one "
                f"label per sample; these targets have shape {tuple(y.shape)} (a sequence per "
                "sample): set matched_draws to 0 (nested controls and subset subjects work)"
            )
        size_m = size_matched_indices(len(y), sizes, matched_draws, seed)
        label_m = label_matched_indices(y.numpy(), [d[1].numpy() for d in client_data],
                                        matched_draws, seed)
        for c in range(len(sizes)):
            group(f"matched-size-c{c}", [(f"client{c}_size{d}", "matched-size", i)
                                         for d, i in enumerate(size_m[c])], c)
            group(f"matched-label-c{c}", [(f"client{c}_label{d}", "matched-label", i)
                                          for d, i in enumerate(label_m[c])], c)
    if nested_sizes:
        for d in range(nested_draws):
            chain = nested_indices(len(y), nested_sizes, seed, draw=d)
            for n, idx in chain.items():
                group(f"nested{n}-d{d}", [(f"nested{n}_{d}", "nested", idx)], -1)
    return groups, info


def analyze_controls(run_dir: str | Path, *, rounds: Sequence[int], matched_draws: int = 0,
                     nested_sizes: Sequence[int] = (), nested_draws: int = 1,
                     matvecs: int = 40, seed: int = 0, out: str | Path | None = None
                     ) -> pd.DataFrame:
    """Stable rank of the control subjects at the given rounds of a hessrank run.

    Same columns as :data:`hessrank.analysis.trajectory.COLUMNS` (quantity "stable-rank") plus
    ``client`` (the matched client, −1 for nested) and ``label_entropy``. The estimator seed
    of each (round, group) is derived from ``seed`` as in ``analyze``
    (:func:`hessrank.analysis.settings.probe_seed`); subsets are drawn from streams of
    ``seed``. Written to ``out/controls.parquet`` (with its settings in ``out/controls.json``)
    when ``out`` is given, and reused from there by a call with the same settings and
    checkpoints.
    """
    run = RunDir(run_dir)
    settings = {"rounds": [int(r) for r in rounds], "matched_draws": int(matched_draws),
                "nested_sizes": sorted(int(n) for n in nested_sizes),
                "nested_draws": int(nested_draws), "matvecs": int(matvecs), "seed": int(seed),
                "probe_streams": "per-round-group",
                "checkpoints": [run.checkpoint_path(int(r)).stat().st_mtime_ns for r in rounds]}
    if out is not None:
        done, key = Path(out) / "controls.parquet", Path(out) / "controls.json"
        if done.is_file() and key.is_file() and json.loads(key.read_text()) == settings:
            return pd.read_parquet(done)  # computed before with the same settings: reuse
    client_data = run.client_data()
    groups, info = control_groups(client_data, matched_draws=matched_draws,
                                  nested_sizes=nested_sizes, nested_draws=nested_draws,
                                  seed=seed)
    loss_fn = run.task()
    rows = []
    for r in rounds:
        model = run.load_model(int(r))
        for g in groups:
            op = build_operator(g, model, loss_fn)
            t0 = time.perf_counter()
            probe = probe_seed(seed, int(r), f"lanczos:{g.label}")
            res = stable_rank(op, num_matvecs=matvecs, seed=probe)
            dt = time.perf_counter() - t0
            for s, j in zip(g.subjects, g.index):
                rows.append({"round": int(r), "subject": s.name, "subject_kind": s.kind,
                             "subject_size": s.size, "quantity": "stable-rank", "k": 0,
                             "layer": "", "value": float(res.value[j]),
                             "stderr": float(res.stderr[j]), "matvecs": res.num_matvecs,
                             "seconds": dt, "seed": probe, "data_seed": -1,
                             **info[s.name]})
    table = pd.DataFrame(rows, columns=[*COLUMNS, "client", "label_entropy"])
    if out is not None:
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        atomic_write_bytes(Path(out) / "controls.parquet", buf.getvalue())
        atomic_write_text(Path(out) / "controls.json", json.dumps(settings))
    return table


def subject_label_entropy(table: pd.DataFrame, client_data: Sequence[tuple[Tensor, Tensor]]
                          ) -> pd.Series:
    """Label entropy of each row's subject of an ``analyze`` table: clients from their data,
    the server from all of it, subset draws re-drawn from ``data_seed`` (the same indices
    ``analyze`` used), controls from their ``label_entropy`` column. NaN otherwise."""
    y = torch.cat([d[1] for d in client_data]).numpy()
    per_client = [label_entropy(d[1]) for d in client_data]
    server = label_entropy(y)
    cache: dict[tuple[int, int], float] = {}
    out = []
    for row in table.itertuples():
        kind = row.subject_kind
        if "label_entropy" in table.columns and np.isfinite(getattr(row, "label_entropy", np.nan)):
            out.append(float(row.label_entropy))
        elif kind == "client":
            out.append(per_client[int(str(row.subject).removeprefix("client"))])
        elif kind == "server":
            out.append(server)
        elif kind == "subset":
            key = (int(row.subject_size), int(row.data_seed))
            if key not in cache:
                cache[key] = label_entropy(y[draw_subset(len(y), *key)])
            out.append(cache[key])
        else:
            out.append(float("nan"))
    return pd.Series(out, index=table.index, name="label_entropy")


def rank_regression(table: pd.DataFrame, *, quantity: str = "stable-rank",
                    round_effects: bool = True) -> pd.DataFrame:
    """OLS of log value on log n and label entropy, cluster-robust by replicate.

        log srank_{s,r} = β₀ + β_n log n_s + β_H H_s (+ γ_r round fixed effects) + ε

    Args:
        table: rows with ``value``, ``subject_size``, ``label_entropy``, ``round`` and
            (optionally) ``replicate``.
        round_effects: add a fixed effect per round (rounds differ a lot in level).
    Returns:
        One row per term (log_n, label_entropy, and Intercept) with coef, stderr, ci_low,
        ci_high, p_value, n_obs, n_clusters and cov_type ("cluster" with ≥ 2 replicates, else
        "HC1": then the standard errors ignore the correlation within the single run).
    """
    import statsmodels.formula.api as smf

    t = table[(table["quantity"] == quantity) & (table["value"] > 0)].copy()
    t = t.dropna(subset=["label_entropy"])
    if len(t) < 4:
        raise ValueError(f"rank_regression needs >= 4 rows with a label entropy, got {len(t)}")
    t["log_value"] = np.log(t["value"].astype(float))
    t["log_n"] = np.log(t["subject_size"].astype(float))
    t["label_entropy"] = t["label_entropy"].astype(float)
    groups = t["replicate"] if "replicate" in t.columns else pd.Series(0, index=t.index)
    formula = "log_value ~ log_n + label_entropy"
    if round_effects and t["round"].nunique() > 1:
        formula += " + C(round)"
    model = smf.ols(formula, data=t)
    if groups.nunique() >= 2:
        fit = model.fit(cov_type="cluster", cov_kwds={"groups": groups.to_numpy()})
        cov = "cluster"
    else:
        fit = model.fit(cov_type="HC1")
        cov = "HC1"
    ci = fit.conf_int()
    rows = []
    for term in ("log_n", "label_entropy", "Intercept"):
        rows.append({"term": term, "coef": float(fit.params[term]),
                     "stderr": float(fit.bse[term]), "ci_low": float(ci.loc[term, 0]),
                     "ci_high": float(ci.loc[term, 1]), "p_value": float(fit.pvalues[term]),
                     "n_obs": int(fit.nobs), "n_clusters": int(groups.nunique()),
                     "cov_type": cov})
    return pd.DataFrame(rows)
