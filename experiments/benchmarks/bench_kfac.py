"""How well K-FAC tracks the exact GGN along a training trajectory, and where it does not.

K-FAC (``KFACOperator``, an approximation: Kronecker factors per layer, cross-layer and
cross-sample terms dropped) against the exact GGN of the same loss, at checkpoints of plain
SGD training on scikit-learn digits (float64, 512 training samples), for a ReLU MLP 64-32-10
and a small CNN (conv 8 - conv 16 - fc). At each checkpoint, for the server (all samples) and
for 4 Dirichlet(0.5) clients:

- exact GGN: dense from the Jacobian of the logits (Jᵀ H_out J, ``torch.func``), eigenvalues;
- K-FAC: its exact spectrum from the factors (eigenvalues λ_G λ_A per layer).

Reported: stable rank, top eigenvalue, 5th eigenvalue and trace of both and K-FAC ÷ GGN;
along the trajectory the Spearman correlation of K-FAC's and the GGN's stable ranks; and the
federated question hessrank asks — is a client's stable rank above the server's? — whether
K-FAC gives the same answer as the GGN (sign agreement of client − server). Timing: K-FAC's
construction and one product against one exact GGN product. Writes ``results/kfac.md``.

    python experiments/benchmarks/bench_kfac.py           # ~10 minutes
    python experiments/benchmarks/bench_kfac.py --fast    # 2 checkpoints, MLP only
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.func import functional_call, hessian, jacfwd

import hessrank as hr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _models  # noqa: E402
import _timing  # noqa: E402

RESULTS = HERE / "results" / "kfac.md"
CE = nn.functional.cross_entropy
STEPS = (0, 30, 100, 300, 1000)


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    return {"MLP 64-32-10": mlp.double(), "CNN conv8-conv16-fc": cnn.double()}


def dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Jᵀ H_out J of the mean cross-entropy, from the Jacobian of the logits."""
    named = dict(model.named_parameters())
    names, sizes = list(named), [t.numel() for t in named.values()]
    theta = torch.cat([t.detach().reshape(-1) for t in named.values()])

    def logits(flat):
        p = {n: t.reshape(named[n].shape) for n, t in zip(names, torch.split(flat, sizes))}
        return functional_call(model, p, (x,))

    out = logits(theta).detach()
    J = jacfwd(logits)(theta).reshape(out.numel(), -1)  # p < n·C columns
    H = hessian(lambda o: CE(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ (H @ J)


def summary(lam: np.ndarray) -> dict[str, float]:
    lam = np.sort(np.abs(lam))[::-1]
    return {"srank": float(np.sum(lam**2) / lam[0] ** 2), "top": float(lam[0]),
            "fifth": float(lam[4]), "trace": float(np.sum(lam))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    steps = STEPS[:2] if args.fast else STEPS
    x_all, y_all = _models.digits(torch.float64)
    x, y = x_all[:512], y_all[:512]
    rng = np.random.default_rng(0)
    props = rng.dirichlet([0.5] * 4, size=10)  # per class, shares of 4 clients
    owner = np.array([rng.choice(4, p=props[int(c)]) for c in y])
    clients = [np.flatnonzero(owner == c) for c in range(4)]
    rows, traj, signs, costs = [], {}, {}, []
    for name, model in list(models().items())[: 1 if args.fast else 2]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        done = 0
        for step in steps:
            model.train()
            while done < step:
                idx = torch.randint(0, len(y), (64,), generator=gen)
                opt.zero_grad()
                CE(model(x[idx]), y[idx]).backward()
                opt.step()
                done += 1
            model.eval()
            subjects = {"server": np.arange(len(y)), **{f"client{c}": i
                                                        for c, i in enumerate(clients)}}
            res = {}
            for subj, idx in subjects.items():
                xs, ys = x[idx], y[idx]
                t0 = time.perf_counter()
                exact = summary(torch.linalg.eigvalsh(dense_ggn(model, xs, ys)).numpy())
                t_dense = time.perf_counter() - t0
                t0 = time.perf_counter()
                kf = hr.KFACOperator(model, CE, (xs, ys))
                t_build = time.perf_counter() - t0
                approx = summary(kf.spectrum().numpy())
                res[subj] = (exact, approx)
                if subj == "server":
                    g = hr.GGNOperator(model, CE, (xs, ys))
                    V = torch.randn(kf.shape[1], 1, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(0))
                    t = _timing.interleaved({"ggn": lambda g=g, V=V: g.matmat(V),
                                             "kfac": lambda k=kf, V=V: k.matmat(V)},
                                            unit="ggn", repeats=5, min_time=0.05)
                    costs.append([name, step, f"{t_build * 1e3:.0f}",
                                  f"{t.seconds('kfac') * 1e3:.2f}",
                                  f"{t.seconds('ggn') * 1e3:.2f}", f"{t.ratio('kfac'):.3f}",
                                  f"{t_dense:.1f}"])
                    rows.append([name, step] + [
                        f"{approx[k]:.4g} / {exact[k]:.4g} = {approx[k] / exact[k]:.2f}"
                        for k in ("srank", "top", "fifth", "trace")])
                    traj.setdefault(name, []).append((exact["srank"], approx["srank"],
                                                      exact["top"], approx["top"]))
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
            srv = res["server"]
            agree = [np.sign(res[c][0]["srank"] - srv[0]["srank"])
                     == np.sign(res[c][1]["srank"] - srv[1]["srank"]) for c in res if c != "server"]
            ratios = [f"{res[c][1]['srank'] / res[c][0]['srank']:.2f}" for c in res]
            signs.setdefault(name, []).append((step, int(sum(agree)), len(agree), ratios))
    lines = [
        "# K-FAC against the exact GGN along a trajectory", "",
        f"Machine: {_timing.machine_line(torch.get_num_threads())}; load average "
        f"{_timing.load_average()}.  ",
        f"Run: `python experiments/benchmarks/bench_kfac.py"
        f"{' ' + ' '.join(argv) if argv else ' ' + ' '.join(sys.argv[1:])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.perf_counter() - started:.0f} s.", "",
        "**K-FAC is an approximation, not the GGN**: per layer G ⊗ A (the expectation of a "
        "product taken as the product of expectations), no cross-layer blocks. Digits, 512 "
        "samples, float64, SGD (batch 64, lr 0.1); checkpoints after the given steps. Each "
        "cell: K-FAC / exact GGN = ratio (spectra exact on both sides: dense eigenvalues of "
        "Jᵀ H_out J, K-FAC's from its factors).", "",
        "## Server (all 512 samples)", "",
        _timing.markdown_table(["model", "SGD steps", "stable rank", "λ₁", "λ₅", "trace"], rows),
        ""]
    lines += ["## Along the trajectory", ""]
    for name, t in traj.items():
        t = np.array(t)
        rho = stats.spearmanr(t[:, 0], t[:, 1]).statistic if len(t) > 2 else float("nan")
        rho_top = stats.spearmanr(t[:, 2], t[:, 3]).statistic if len(t) > 2 else float("nan")
        lines.append(f"- {name}: Spearman correlation of K-FAC's and the GGN's stable rank "
                     f"over the {len(t)} checkpoints {rho:.2f}; of λ₁ {rho_top:.2f}.")
    lines += ["", "## Client vs server: does K-FAC answer the same way?", "",
              "4 Dirichlet(0.5) clients of the 512 samples. Agreement: clients whose sign of "
              "(client − server stable rank) is the same under K-FAC and the GGN. Ratios: "
              "K-FAC ÷ GGN stable rank, server then clients.", ""]
    srows = [[name, step, f"{a}/{n}", ", ".join(r)] for name, s in signs.items()
             for step, a, n, r in s]
    lines += [_timing.markdown_table(["model", "SGD steps", "same sign", "stable-rank ratios"],
                                     srows), "",
              "## Cost", "",
              _timing.markdown_table(["model", "SGD steps", "K-FAC build ms", "K-FAC product ms",
                                      "GGN product ms", "K-FAC ÷ GGN product",
                                      "dense GGN s"], costs), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[-20:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
