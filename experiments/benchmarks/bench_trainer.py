"""Federated trainer benchmark: communication, client compute and accuracy per algorithm.

Two settings: scikit-learn digits with the MLP, and CIFAR-shaped synthetic data (10 classes of
noisy upsampled random 3×4×4 patterns, see ``_cifar_shaped``) with ResNet-8. Every algorithm
starts from the same initialization, sees the same client data, and is run *interleaved*
round by round (the order rotated each round), so slow drifts of a shared machine hit all
algorithms alike.

Reported per algorithm, relative to FedAvg in the same setting:
  * floats/round: Σ over rounds of floats up + down over all sampled clients, divided by
    FedAvg's (the same clients are sampled: every algorithm uses generators of one seed);
  * client time: median over rounds of (Σ_c client seconds) / FedAvg's in the same round;
    FeDLRT does not report client seconds, so its entry is the whole round's wall time over
    FedAvg's (marked †; includes its server-side SVDs);
  * final test accuracy of the global model; for pFedLoRU also "personal": the mean over
    clients of their own model's test accuracy reweighted to their training label histogram.

Run: ``.venv/bin/python experiments/benchmarks/bench_trainer.py [--fast]``; writes
``experiments/benchmarks/results/trainer.md``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from hessrank.data.datasets import Dataset, load_dataset
from hessrank.data.partition import make_partition
from hessrank.fl.config import TrainConfig
from hessrank.fl.evaluation import label_weighted_accuracy
from hessrank.fl.loop import Federation, sample_clients
from hessrank.fl.protocol import ClientData
from hessrank.fl.registry import ALGORITHMS
from hessrank.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

ALGOS = ["fedavg", "fedlora", "fedloru", "pfedloru", "mfedloru", "fedlrt"]
RESULTS = Path(__file__).resolve().parent / "results" / "trainer.md"


def _cifar_shaped(seed: int, n: int) -> Dataset:
    """10 classes of 3×32×32 images: x = m_y + ε, ε ~ N(0, I). Each class mean m_k is a random
    3×4×4 pattern (unit-variance entries) upsampled to 32×32 (8×8 blocks), so the class signal
    is spatial, as in natural images, at a per-pixel SNR of 1. Split 80/20."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(10, 3, 4, 4, generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    y = torch.randperm(n, generator=g) % 10
    x = means[y] + torch.randn(n, 3, 32, 32, generator=g)
    cut = int(0.8 * n)
    return Dataset(
        name="blocks-3x32x32", train_x=x[:cut], train_y=y[:cut], test_x=x[cut:],
        test_y=y[cut:], num_classes=10, input_shape=(3, 32, 32), task="classification",
    )  # fmt: skip


def _available(algos: list[str]) -> list[str]:
    out = []
    for name in algos:
        if name in ALGORITHMS:
            out.append(name)
        else:
            print(f"skipping {name}: not registered")
    return out


def run_setting(label: str, ds: Dataset, model_name: str, cfg: TrainConfig, algos: list[str]):
    """Interleaved rounds of every algorithm on one dataset/model; returns table rows."""
    part = make_partition(ds.train_y, cfg.clients, cfg.partition, alpha=cfg.dirichlet_alpha,
                          min_size=cfg.min_client_size, seed=cfg.seed)  # fmt: skip
    clients = [ClientData(c, ds.train_x[torch.as_tensor(i)], ds.train_y[torch.as_tensor(i)])
               for c, i in enumerate(part.indices)]  # fmt: skip
    runs = {}
    for name in algos:
        c = TrainConfig.from_dict({**cfg.to_dict(), "algo": name, "notes": {}})
        torch.manual_seed(c.seed)
        model = build_model(model_name, ds.input_shape, ds.output_dim)
        fed = Federation.build(model, c, ds.task)
        runs[name] = {"fed": fed, "gen": torch.Generator().manual_seed(c.seed + 1),
                      "floats": 0, "client": [], "wall": []}  # fmt: skip
    for t in range(1, cfg.rounds + 1):
        k = t % len(algos)
        for name in algos[k:] + algos[:k]:
            r = runs[name]
            sampled = sample_clients(cfg.clients, cfg.client_fraction, r["gen"])
            t0 = time.perf_counter()
            stats = r["fed"].round(t, [clients[i] for i in sampled], cfg.lr, r["gen"])
            r["wall"].append(time.perf_counter() - t0)
            r["client"].append(stats.extra.get("client_seconds"))
            r["floats"] += sum(stats.floats_up.values()) + sum(stats.floats_down.values())
        print(f"{label}: round {t}/{cfg.rounds} done", flush=True)
    base = runs["fedavg"]
    rows = []
    for name in algos:
        r = runs[name]
        if all(s is not None for s in r["client"]):
            ratios = [a / b for a, b in zip(r["client"], base["client"])]
            mark = ""
        else:
            ratios = [a / b for a, b in zip(r["wall"], base["wall"])]
            mark = " †"
        fed = r["fed"]
        acc = ds.task.evaluate(fed.strategy.effective_model(), ds.test_x, ds.test_y)
        acc_text = f"{acc['accuracy']:.3f}"
        if fed.strategy.personalized:
            personal = [
                label_weighted_accuracy(
                    fed.strategy.client_model(c.client_id, fed.states.get(c.client_id)),
                    ds.test_x, ds.test_y, c.targets, ds.num_classes)
                for c in clients
            ]  # fmt: skip
            acc_text += f" (personal: {statistics.mean(personal):.3f})"
        rows.append([
            label, name, f"{r['floats'] / base['floats']:.3f}",
            f"{statistics.median(ratios):.2f}{mark}", acc_text,
        ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--fast", action="store_true", help="fewer rounds and samples (a few minutes)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    algos = _available(ALGOS)
    common = {"clients": 10, "partition": "dirichlet", "dirichlet_alpha": 0.5, "batch_size": 32,
              "momentum": 0.0, "rank": 8, "lora_alpha": 16.0, "merge_every": 2, "seed": 0,
              "min_client_size": 8, "r_max": 32}  # fmt: skip
    digits = TrainConfig(**common, rounds=6 if args.fast else 20, local_epochs=2, lr=0.3)
    cifar = TrainConfig(**common, rounds=3 if args.fast else 8, local_steps=5, lr=0.1)
    rows = run_setting("digits / mlp", load_dataset("digits", seed=0), "mlp", digits, algos)
    n = 500 if args.fast else 1000
    rows += run_setting("3×32×32 blocks / resnet8", _cifar_shaped(0, n), "resnet8", cifar, algos)
    header = ["setting", "algorithm", "floats/round vs FedAvg", "client time vs FedAvg",
              "final test acc."]  # fmt: skip
    text = "\n".join([
        "# Federated trainer benchmark",
        "",
        f"{datetime.date.today().isoformat()}; {_timing.machine_line(args.threads)}; "
        f"{'--fast' if args.fast else 'full'} run.",
        "",
        f"digits/mlp (64-64-64-10): {digits.clients} clients (Dirichlet 0.5), {digits.rounds} "
        f"rounds of {digits.local_epochs} local epochs; 3×32×32 blocks/resnet8: {cifar.clients} "
        f"clients, {cifar.rounds} rounds of "
        f"{cifar.local_steps} local steps. Rank {common['rank']} (mFedLoRU client ranks "
        "8, 4, 2 cycled; FeDLRT starts at rank 8, full correction), merge every "
        f"{common['merge_every']} rounds; plain SGD (FeDLRT requires it), batch 32, "
        f"lr {digits.lr} / {cifar.lr}. Default factorized layers: all Linear/Conv2d but the "
        "first and last.",
        "",
        _timing.markdown_table(header, rows),
        "",
        "† FeDLRT reports no client time; its entry is whole-round wall time (includes the "
        "server's SVDs and the gradient exchanges). pFedLoRU's client time covers two local "
        "phases (personal, then global pair) of the full schedule each.",
        "",
    ])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
