"""Controls that isolate sample size from label skew (docs/design.md, analysis).

A client differs from the server in two ways: fewer samples (n_c < N) and a skewed label
histogram. The controls separate them:

    matched-size       for client c, random subsets of the server's data of size n_c
    matched-label      for client c, random subsets with c's label histogram (per class k,
                       h_c(k) samples drawn without replacement from the server's class-k data)
    matched-histogram  next-token data (a sample is a sequence, no class label): random
                       subsets of n_c sequences whose pooled target-token histogram is close
                       to c's in total variation (:func:`histogram_matched_indices`)
    nested             one random permutation π of the training data; subsets π[:n] for
                       n = n_1 < n_2 < … (so S_{n_1} ⊂ S_{n_2} ⊂ …, as in the theorem)

Which matched kinds a run gets follows its targets (:func:`matched_kinds`): class labels get
matched-size and matched-label, token sequences matched-size and matched-histogram, anything
else (regression targets, a user's own loss on float targets) matched-size only. Each matched
row carries ``histogram_tv``, the total-variation distance between its targets' histogram
and its client's (labels or tokens; 0 for a label-matched draw), and ``client_share``, the
fraction of its samples that are the client's own, so a reader sees how well a control
matched and how much of it is the client itself.

:func:`rank_regression` fits log srank = β₀ + β_n log n + β_H H(labels) (+ round
effects) by OLS with cluster-robust standard errors by replicate (statsmodels), so the
effect of n is estimated at fixed label entropy H = −Σ_k p_k log p_k (for token sequences:
the entropy of the target-token histogram).

The index-drawing functions are pure (numpy, seeded); :func:`control_groups` turns them into
:class:`~hessrank.analysis.subjects.SubjectGroup` s and :func:`analyze_controls` estimates
their stable ranks at saved rounds of a run (one stacked operator per group, as
``analyze`` does), writing the same tidy columns plus ``client``, ``label_entropy``,
``histogram_tv`` and ``client_share``.
The centralized setting ("server = all samples") is a run with one client (``clients = 1``).

Example:
    >>> [len(i) for i in nested_indices(100, [10, 50], seed=0).values()]
    [10, 50]
"""

from __future__ import annotations

import io
import json
import shutil
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
from hessrank.data.inputs import cat_inputs, index_inputs
from hessrank.data.task import Task
from hessrank.fl.rundir import RunDir
from hessrank.io import atomic_write_bytes, atomic_write_text
from hessrank.linalg import stable_rank

__all__ = [
    "CONTROL_COLUMNS",
    "CONTROL_KINDS",
    "analyze_controls",
    "control_groups",
    "histogram_matched_indices",
    "histogram_tv",
    "label_entropy",
    "label_matched_indices",
    "matched_kinds",
    "nested_indices",
    "rank_regression",
    "size_matched_indices",
    "subject_label_entropy",
    "target_histograms",
]

CONTROL_KINDS = ("matched-size", "matched-label", "matched-histogram", "nested")
"""``subject_kind`` values of control subjects."""

CONTROL_COLUMNS = ("client", "label_entropy", "histogram_tv", "client_share")
"""Columns of a controls table beyond :data:`hessrank.analysis.store.COLUMNS` (module doc)."""

_SUFFIX = {"matched-size": "size", "matched-label": "label", "matched-histogram": "hist"}


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


def size_matched_indices(num_train: int, sizes: Sequence[int], draws: int,
                         seed: int) -> list[list[np.ndarray]]:
    """For each client size n_c, ``draws`` sorted random subsets of range(num_train) of size
    n_c (draw d of client c uses stream (seed, 1, c, d)). A sample may be anything, a
    sequence included: n_c counts samples."""
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


def target_histograms(targets: np.ndarray | Tensor, num_tokens: int | None = None,
                      ignore_index: int | None = -100) -> np.ndarray:
    """Per sample, the counts of its target tokens: an (n, V) int64 array whose row i is
    h_i(k) = #{t : y_{i,t} = k}. Targets are (n,) class labels (one count per row) or (n, T)
    token ids; positions equal to ``ignore_index`` are not counted. V = ``num_tokens`` or
    1 + the largest target."""
    y = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
    if y.dtype.kind not in "iu":
        raise ValueError(f"token histograms need integer targets, got dtype {y.dtype}")
    y = y.reshape(len(y), -1)
    keep = np.ones(y.shape, dtype=bool) if ignore_index is None else y != ignore_index
    if (y[keep] < 0).any():
        raise ValueError(f"targets hold negative ids {sorted(set(y[keep & (y < 0)].tolist()))[:5]}"
                         f" other than ignore_index={ignore_index}")
    size = int(num_tokens) if num_tokens is not None else int(y[keep].max(initial=-1)) + 1
    rows = np.broadcast_to(np.arange(len(y))[:, None], y.shape)[keep]
    flat = rows * size + y[keep]
    return np.bincount(flat, minlength=len(y) * size).reshape(len(y), size).astype(np.int64)


def histogram_tv(counts: np.ndarray, reference: np.ndarray) -> float:
    """Total-variation distance ½ Σ_k |a_k/|a| − b_k/|b|| between the distributions of two
    count vectors (0: the same histogram up to scale, 1: disjoint supports)."""
    a, b = np.asarray(counts, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    m, M = int(a.sum()), int(b.sum())
    if m == 0 or M == 0:
        raise ValueError("histogram_tv needs two non-empty histograms")
    return float(np.abs(a * M - b * m).sum() / (2 * m * M))


def histogram_matched_indices(train_hists: np.ndarray, client_hists: Sequence[np.ndarray],
                              draws: int, seed: int, *, proposals: int = 64,
                              patience: int = 20) -> list[list[np.ndarray]]:
    """For each client, ``draws`` random subsets of the pool with the client's number of
    samples whose pooled token histogram is close to the client's in total variation.

    The sequence analogue of :func:`label_matched_indices`: a next-token sample is a window
    of T tokens, not one label, so the histogram cannot be matched class by class. Let h_i be
    sample i's token counts (:func:`target_histograms`), p_c = Σ_{i∈c} h_i / Σ_{i∈c} |h_i|
    the client's token distribution and, for a subset S with s = Σ_{i∈S} h_i,

        TV(S) = ½ Σ_k |s_k / |s| − p_c(k)|.

    Draw d of client c (stream (seed, 4, c, d)) starts from a uniform random subset S₀ of
    n_c samples (a size-matched draw) and improves it by random swaps: each step proposes
    ``proposals`` pairs (i ∈ S, j ∉ S), each uniform, and takes the pair whose swap gives the
    smallest TV if that is strictly below the current TV; it stops after ``patience``
    steps in a row without an improvement (or after 50·n_c + 100 steps). So |S| = n_c
    always, the subset is a random draw (random start, random proposals: draws differ and
    the same seed gives the same subset), and TV never exceeds that of its starting size-
    matched draw. It is a local search, not a uniform draw among matched subsets: it keeps
    most of the random start and swaps in the windows that correct the start's excess
    tokens, and it favours the client's own windows more than a size-matched draw does
    (they have its histogram); ``analyze_controls`` reports both the achieved TV and that
    share. TV is compared in exact integer arithmetic (Σ_k |s_k·M − c_k·|s|| over 2|s|M, with
    c the client's counts, M = |c|), so the choice does not depend on rounding.

    Args:
        train_hists: (N, V) token counts of the pool's samples.
        client_hists: per client, its (n_c, V) token counts (its rows of the pool, or any
            sample with the client's histogram and size).
        draws: subsets per client; seed: the draws' streams.
        proposals, patience: the search (above); larger values give smaller TV at a higher
            client share (measured in ``experiments/benchmarks/results/matched_controls.md``).
    Returns:
        Per client, ``draws`` sorted index arrays of length n_c.
    """
    H = np.asarray(train_hists, dtype=np.int64)
    N = len(H)
    if proposals < 1 or patience < 1:
        raise ValueError(f"proposals and patience must be >= 1, got {proposals}, {patience}")
    out = []
    for c, hc in enumerate(client_hists):
        hc = np.asarray(hc, dtype=np.int64)
        n = len(hc)
        if n > N:
            raise ValueError(f"client {c} has {n} samples, more than the {N} available")
        if hc.shape[1:] != H.shape[1:]:
            raise ValueError(f"client {c}'s histograms have {hc.shape[1:]} tokens, the pool's "
                             f"{H.shape[1:]}")
        target = hc.sum(0)
        M = int(target.sum())
        if M == 0:
            raise ValueError(f"client {c} has no counted target token")
        out.append([_swap_search(H, target, M, n, _rng(seed, 4, c, d), proposals, patience)
                    for d in range(draws)])
    return out


def _swap_search(H: np.ndarray, target: np.ndarray, M: int, n: int,
                 rng: np.random.Generator, proposals: int, patience: int) -> np.ndarray:
    """One draw of :func:`histogram_matched_indices`."""
    N = len(H)
    S = rng.choice(N, size=n, replace=False)
    if n in (0, N):
        return np.sort(S)
    inside = np.zeros(N, dtype=bool)
    inside[S] = True
    sizes = H.sum(1)
    s = H[S].sum(0)
    m = int(s.sum())

    def tv(counts: np.ndarray, total: np.ndarray) -> np.ndarray:
        num = np.abs(counts * M - target * total[..., None]).sum(-1)
        return num / (2.0 * np.maximum(total, 1) * M)  # a subset of empty windows: |s| = 0

    current = float(tv(s, np.array(m)))
    fails = steps = 0
    while fails < patience and steps < 50 * n + 100 and current > 0:
        steps += 1
        out_pos = rng.integers(0, n, size=proposals)
        outside = np.flatnonzero(~inside)
        cand = outside[rng.integers(0, len(outside), size=proposals)]
        drop = S[out_pos]
        new = s[None] - H[drop] + H[cand]
        totals = m - sizes[drop] + sizes[cand]
        score = tv(new, totals)
        k = int(np.argmin(score))
        if score[k] < current:
            inside[drop[k]], inside[cand[k]] = False, True
            S[out_pos[k]] = cand[k]
            s, m, current = new[k], int(totals[k]), float(score[k])
            fails = 0
        else:
            fails += 1
    return np.sort(S)


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
    """Shannon entropy −Σ_k p_k log p_k (nats) of a label sample's histogram (of all its
    entries: for (n, T) token targets, of the token histogram)."""
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    _, counts = np.unique(y, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---- subjects ---------------------------------------------------------------------------------
def _target_kind(targets: Tensor, task: Task | str | None) -> str:
    """"labels" (one class per sample), "tokens" (a sequence of ids per sample) or "values"."""
    name = task.name if isinstance(task, Task) else task
    if name == "classification":
        return "labels"
    if name == "next-token":
        return "tokens"
    if name == "regression" or targets.is_floating_point() or targets.is_complex():
        return "values"
    return "labels" if targets.ndim == 1 else "tokens"


def matched_kinds(targets: Tensor, task: Task | str | None = None) -> tuple[str, ...]:
    """The matched control kinds meaningful for these targets (module doc): matched-size
    always, matched-label for class labels, matched-histogram for token sequences. ``task``
    (a :class:`~hessrank.data.task.Task` or its name) decides; without one (or for a user's
    own loss) integer (n,) targets are labels, integer (n, T) targets are tokens and float
    targets are values."""
    kind = _target_kind(targets, task)
    return ("matched-size", *{"labels": ("matched-label",),
                              "tokens": ("matched-histogram",)}.get(kind, ()))


def control_groups(client_data: Sequence[tuple], *, matched_draws: int = 0,
                   nested_sizes: Sequence[int] = (), nested_draws: int = 1, seed: int = 0,
                   task: Task | str | None = None, proposals: int = 64, patience: int = 20):
    """Subject groups of the controls over the union of the clients' data (the server's).

    Subjects: ``client{c}_size{d}`` (kind matched-size), ``client{c}_label{d}``
    (matched-label, class labels), ``client{c}_hist{d}`` (matched-histogram, token
    sequences; ``proposals`` and ``patience`` of :func:`histogram_matched_indices`),
    ``nested{n}_{d}`` (nested; draw d is its own nested chain). Which matched kinds come is
    :func:`matched_kinds` of the targets and ``task``. One group per (kind, client) or per
    nested draw — a stack of equal-size operators. Inputs may be tensors, tuples or dicts of
    tensors. Returns (groups, info) with info: subject name → {"client": c or −1,
    "label_entropy": H, "histogram_tv": TV to the client's target histogram (NaN for
    nested and float targets), "client_share": fraction of the subject's samples that are
    the client's own (NaN for nested)}.
    """
    x = cat_inputs([d[0] for d in client_data])
    y = torch.cat([d[1] for d in client_data])
    sizes = [int(d[1].shape[0]) for d in client_data]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    kinds = matched_kinds(y, task)
    counted = "values" != _target_kind(y, task)
    ignore = getattr(task, "ignore_index", -100) if isinstance(task, Task) else -100
    hists = target_histograms(y, ignore_index=ignore) if counted and matched_draws > 0 else None
    groups, info = [], {}

    def group(label: str, named: list[tuple[str, str, np.ndarray]], client: int):
        subjects = []
        for name, kind, idx in named:
            t = torch.as_tensor(idx, dtype=torch.long)
            subjects.append(Subject(name, kind, len(idx), data=(index_inputs(x, t), y[t])))
            meta = {"client": client, "label_entropy": label_entropy(y[t]),
                    "histogram_tv": float("nan"), "client_share": float("nan")}
            if client >= 0:
                meta["client_share"] = float((owner[idx] == client).mean())
                if hists is not None:
                    own = hists[owner == client].sum(0)
                    meta["histogram_tv"] = histogram_tv(hists[idx].sum(0), own)
            info[name] = meta
        groups.append(SubjectGroup(label=label, subjects=tuple(subjects),
                                   index=tuple(range(len(subjects)))))

    if matched_draws > 0:
        draws = {"matched-size": size_matched_indices(len(y), sizes, matched_draws, seed)}
        if "matched-label" in kinds:
            draws["matched-label"] = label_matched_indices(
                y.numpy(), [d[1].numpy() for d in client_data], matched_draws, seed)
        if "matched-histogram" in kinds:
            draws["matched-histogram"] = histogram_matched_indices(
                hists, [hists[owner == c] for c in range(len(sizes))], matched_draws, seed,
                proposals=proposals, patience=patience)
        for c in range(len(sizes)):
            for kind, per_client in draws.items():
                group(f"{kind}-c{c}", [(f"client{c}_{_SUFFIX[kind]}{d}", kind, i)
                                       for d, i in enumerate(per_client[c])], c)
    if nested_sizes:
        for d in range(nested_draws):
            chain = nested_indices(len(y), nested_sizes, seed, draw=d)
            for n, idx in chain.items():
                group(f"nested{n}-d{d}", [(f"nested{n}_{d}", "nested", idx)], -1)
    return groups, info


def analyze_controls(run_dir: str | Path, *, rounds: Sequence[int], matched_draws: int = 0,
                     nested_sizes: Sequence[int] = (), nested_draws: int = 1,
                     matvecs: int = 40, seed: int = 0, out: str | Path | None = None,
                     proposals: int = 64, patience: int = 20) -> pd.DataFrame:
    """Stable rank of the control subjects at the given rounds of a hessrank run.

    Same columns as :data:`hessrank.analysis.trajectory.COLUMNS` (quantity "stable-rank") plus
    :data:`CONTROL_COLUMNS`: ``client`` (the matched client, −1 for nested),
    ``label_entropy``, ``histogram_tv`` and ``client_share`` (module doc). The matched kinds
    follow the run's task (:func:`matched_kinds`); ``proposals`` and ``patience`` are the
    histogram search's (:func:`histogram_matched_indices`, token sequences only). The
    estimator seed of each (round, group) is derived from ``seed`` as in ``analyze``
    (:func:`hessrank.analysis.settings.probe_seed`); subsets are drawn from streams of
    ``seed``. Written to ``out/controls.parquet`` (with its settings in ``out/controls.json``)
    when ``out`` is given, and reused from there by a call with the same settings and
    checkpoints (by content, so a copied or moved run keeps its controls); until the call
    finishes, each finished round's rows wait in ``out/rounds``, so an interrupted call
    resumes at its first unfinished round.
    """
    run = RunDir(run_dir)
    loss_fn = run.task()
    settings = {"rounds": [int(r) for r in rounds], "matched_draws": int(matched_draws),
                "nested_sizes": sorted(int(n) for n in nested_sizes),
                "nested_draws": int(nested_draws), "matvecs": int(matvecs), "seed": int(seed),
                "probe_streams": "per-round-group",
                "checkpoints": [run.checkpoint_hash(int(r)) for r in rounds]}
    if loss_fn.name == "next-token" and matched_draws > 0:  # only runs that draw them
        settings["histogram_search"] = {"proposals": int(proposals), "patience": int(patience)}
    if out is not None:
        done, key = Path(out) / "controls.parquet", Path(out) / "controls.json"
        former = _mtime_keyed(settings, run, rounds)
        if done.is_file() and key.is_file():
            stored = json.loads(key.read_text())
            if stored in (settings, former):
                if stored != settings:  # the former key: record the content hashes now
                    atomic_write_text(key, json.dumps(settings))
                return pd.read_parquet(done)  # computed before with the same settings: reuse
    client_data = run.client_data()
    groups, info = control_groups(client_data, matched_draws=matched_draws,
                                  nested_sizes=nested_sizes, nested_draws=nested_draws,
                                  seed=seed, task=loss_fn, proposals=proposals,
                                  patience=patience)
    parts = _round_parts(Path(out), settings, former) if out is not None else None
    rows = []
    for r in rounds:
        part = parts / f"round_{int(r)}.parquet" if parts is not None else None
        if part is not None and part.is_file():  # this round finished before an interruption
            rows.extend(pd.read_parquet(part).to_dict("records"))
            continue
        start = len(rows)
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
        if part is not None:
            _write_parquet(part, pd.DataFrame(rows[start:],
                                              columns=[*COLUMNS, *CONTROL_COLUMNS]))
    table = pd.DataFrame(rows, columns=[*COLUMNS, *CONTROL_COLUMNS])
    if out is not None:
        _write_parquet(Path(out) / "controls.parquet", table)
        atomic_write_text(Path(out) / "controls.json", json.dumps(settings))
        shutil.rmtree(parts, ignore_errors=True)
    return table


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _mtime_keyed(settings: dict, run: RunDir, rounds: Sequence[int]) -> dict:
    """``settings`` as controls written before content hashes keyed them: the checkpoints by
    their files' modification times (which a copy of the run changes). A table stored under
    that key with the current files' times was computed from these checkpoints."""
    times = [run.checkpoint_path(int(r)).stat().st_mtime_ns for r in rounds]
    return {**settings, "checkpoints": times}


def _round_parts(out: Path, settings: dict, former: dict) -> Path:
    """``out/rounds``: each finished round's rows of an unfinished call, so an interrupted
    call resumes at the first unfinished round; parts written under other settings (or an
    older format) are dropped, being this function's own scratch. Parts stamped with the
    ``former`` key of the same settings (:func:`_mtime_keyed`) are kept and restamped."""
    parts = out / "rounds"
    stamp = parts / "settings.json"
    stored = json.loads(stamp.read_text()) if stamp.is_file() else None
    if parts.is_dir() and stored not in (settings, former):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if stored != settings:
        atomic_write_text(stamp, json.dumps(settings))
    return parts


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
