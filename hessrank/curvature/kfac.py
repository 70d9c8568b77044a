"""KFACOperator: the Kronecker-factored approximate curvature (K-FAC, Martens & Grosse 2015;
KFC for convolutions, Grosse & Martens 2016) of the GGN, for Linear and Conv2d layers.

**An approximation, not the GGN.** For a layer s = W a + b applied to rows r (samples, and
positions or pixels where the weight is shared), the GGN block of (W, b) is
Σ_r Σ_r' (a_r a_r'ᵀ) ⊗ (g_r g_r'ᵀ) summed over the columns of the output Hessian's square
root; K-FAC keeps r = r' and factorizes the expectation of a product as the product of
expectations ("expand", Eschenhagen et al. 2023):

    C_l ≈ G_l ⊗ A_l,   A_l = (1/R) Σ_r ã_r ã_rᵀ,   G_l = Σ_r Σ_c g_rc g_rcᵀ,

ã = (a, 1) when the bias is selected, R the rows of the batch, g_rc = ∂(uᵀ_c f)/∂s_r the
gradient at the layer output of the c-th column u_c of the loss Hessian's square root in the
outputs (1/n weights folded in): every column for ``kind="ggn"`` (exact output Hessian,
C backward passes per batch for C classes), one drawn label for ``kind="mc"`` (the task's
``draw_targets``, seeded), the data's labels for ``kind="empirical"``. Layers are independent
(block diagonal); cross-layer terms are dropped. In the flat order of θ (W row-major, then b),
a product is vec(G_l [V_W V_b] A_l) per layer. Batches of sizes n_b combine as
A = Σ_b (n_b/N) A_b and G = Σ_b (n_b/N) G_b, so unequal batches give the factors of one
big batch; weights w_c combine clients' factors the same way (:meth:`KFACOperator.combine`),
which with w_c = n_c/N is exactly the K-FAC of the pooled data. Because A⊗G of the means is
not the mean of the A_c⊗G_c, K-FAC is not *additive*: the federated composition asks
``combine`` for the server's operator (:mod:`hessrank.curvature.protocol`).

The spectrum is exact: the eigenvalues of G⊗A are the products λ_G λ_A, so
:meth:`KFACOperator.spectrum`, ``trace``, ``frobenius_sq`` and the stable rank need no
estimator; the operator also has the estimators' interface (``shape``, ``matmat``) so every
estimator of :mod:`hessrank.linalg` runs on it unchanged. How well its stable rank, top
eigenvalues and trace track the exact GGN's along a trajectory, and where they do not:
``experiments/benchmarks/results/kfac.md``.

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    >>> KFACOperator(model, nn.functional.cross_entropy, (x, y)).shape
    (1, 23, 23)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.curvature.base import (
    OperatorOnSpace,
    all_reduce_sum,
    check_finite_product,
    check_no_labels_in_inputs,
)
from hessrank.curvature.data import Batches, as_batches
from hessrank.curvature.params import LossFn, ParameterSpace
from hessrank.curvature.routes import ATTENTION_KERNELS
from hessrank.data.task import ClassificationTask, NextTokenTask, RegressionTask, Task, as_task

KINDS = ("ggn", "mc", "empirical")
LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class KroneckerBlock:
    """One layer's factors: rows ``slices`` of θ (weight, then bias) hold vec(M), M of shape
    (out, in [+ 1]); the block is G ⊗ A (G: out × out, A: in [+1] × in [+1])."""

    module: str
    weight: str | None
    bias: str | None
    out_features: int
    in_features: int
    A: Tensor
    G: Tensor

    @property
    def columns(self) -> int:
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)


def output_hessian_columns(task: Task, out: Tensor, y: Tensor, kind: str,
                           generator: torch.Generator) -> list[Tensor]:
    """Cotangents u_c shaped like ``out`` with Σ_c J_rᵀ u_rc u_rcᵀ J_r the batch loss's GGN
    (``kind="ggn"``), or one cotangent per sample's gradient scaled by 1/√n ("mc": at labels
    drawn from the model; "empirical": at the data's labels)."""
    n = int(y.shape[0])
    if kind in ("mc", "empirical"):
        target = task.draw_targets(out, y, generator) if kind == "mc" else y
        z = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(task(z, target), z)
        return [g * n**0.5]  # rows of √n ∂L/∂f = ∇ℓ_i/√n
    if isinstance(task, (ClassificationTask, NextTokenTask)):
        if isinstance(task, NextTokenTask):
            logits = out.detach()
            keep = (y != task.ignore_index).to(out.dtype)
            w = keep / (n * keep.sum(-1, keepdim=True))  # (n, T): 1 / (n |T_i|)
        else:
            logits = out.detach().movedim(1, -1)  # classes last; extra dims are positions
            w = torch.full(logits.shape[:-1], 1.0 / logits[..., 0].numel(), dtype=out.dtype,
                           device=out.device)
        p = torch.softmax(logits, -1)
        scale = w.sqrt().unsqueeze(-1) * p.sqrt()  # column c: √w √p_c (e_c − p)
        cols = []
        for c in range(p.shape[-1]):
            u = -p * scale[..., c:c + 1]
            u[..., c] += scale[..., c]
            cols.append(u if isinstance(task, NextTokenTask) else u.movedim(-1, 1))
        return cols
    if isinstance(task, RegressionTask):  # ½‖f − y‖² per row, mean over rows: H = I / R
        rows = out[..., 0].numel()
        cols = []
        for c in range(out.shape[-1]):
            u = torch.zeros_like(out)
            u[..., c] = rows**-0.5
            cols.append(u)
        return cols
    raise ValueError(
        f"kind='ggn' needs the output Hessian of the loss, which {type(task).__name__} does not "
        "give (a plain loss function); pass a task (ClassificationTask, NextTokenTask, "
        "RegressionTask) or use kind='mc' or kind='empirical'")


class KFACOperator(OperatorOnSpace):
    """K-FAC of a model's mean loss over ``data`` (module docstring) as a (1, p, p) operator.

    Args:
        model, loss_fn, data, params, mode, batch_size, check_determinism, sdpa, space,
            process_group: as :class:`~hessrank.curvature.base.CurvatureOperator`.
        kind: "ggn" (exact output Hessian, default), "mc" (one label per sample drawn from the
            model, seeded) or "empirical" (the data's labels).
        seed: seeds the "mc" draws (a CPU generator; batches drawn in order).
        cache_budget_mb: accepted for a uniform interface (the factors are always kept).
    Raises:
        ValueError: a selected parameter is not the weight or bias of a Linear or Conv2d
            layer (grouped and non-zero-padded convolutions included), naming it.
    """

    curvature = "kfac"
    additive = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Task | LossFn,
        data: Iterable | tuple | Batches,
        params: Sequence[str] | None = None,
        mode: str = "eval",
        *,
        kind: str = "ggn",
        seed: int = 0,
        batch_size: int | None = None,
        check_determinism: bool = True,
        cache_budget_mb: float = 2048.0,
        sdpa: str = "math",
        space: ParameterSpace | None = None,
        process_group=None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if sdpa not in ATTENTION_KERNELS:
            raise ValueError(f"sdpa must be one of {ATTENTION_KERNELS}, got {sdpa!r}")
        self.kind, self.seed, self.sdpa = kind, int(seed), sdpa
        self.cache_budget_mb = float(cache_budget_mb)
        self.space = space if space is not None else ParameterSpace(model, params, mode)
        self.task = as_task(loss_fn)
        s = self.space
        self.batches = as_batches(data, dtype=s.dtype, device=s.device, batch_size=batch_size)
        check_no_labels_in_inputs(self.batches)
        self.process_group = process_group
        local = self.batches.num_samples
        self.total_samples = int(all_reduce_sum(torch.tensor(float(local), dtype=torch.float64),
                                                process_group))
        local_loss, probe = s.checked_losses(self.task, self.batches)
        self.loss_value = float(all_reduce_sum(torch.tensor(
            local_loss * local / self.total_samples, dtype=torch.float64), process_group))
        self.route = {"curvature": self.curvature, "kind": kind, "mode": s.mode}
        if probe.attention:
            self.route["attention"] = sdpa
        self.blocks = self._layout()
        self.route["layers"] = len(self.blocks)
        if check_determinism:
            with self.context():
                s.check_determinism(self.task, self.batches.inputs[0], self.batches.targets[0])
        self._fit_factors()
        self.num_matvecs = 0

    # ---- layout and factors -----------------------------------------------------------------
    def _layout(self) -> list[KroneckerBlock]:
        s = self.space
        selected, blocks, covered = set(s.names), [], set()
        for name, m in s.model.named_modules():
            if type(m) not in LAYERS:
                continue
            w, b = f"{name}.weight", f"{name}.bias"
            w = w if w in selected else None
            b = b if (m.bias is not None and b in selected) else None
            if w is None and b is None:
                continue
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                             or isinstance(m.padding, str)):
                raise ValueError(f"K-FAC supports Conv2d with groups=1, zero padding given as "
                                 f"numbers; {name!r} is not; leave its parameters out (params=)")
            out_f = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            in_f = m.in_features if isinstance(m, nn.Linear) else \
                m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            blocks.append(KroneckerBlock(name, w, b, out_f, in_f, A=torch.empty(0),
                                         G=torch.empty(0)))
            covered.update(x for x in (w, b) if x)
        missing = [n for n in s.names if n not in covered]
        if missing:
            raise ValueError(
                f"K-FAC covers the weights and biases of Linear and Conv2d layers; "
                f"{', '.join(repr(n) for n in missing[:5])}{' ...' if len(missing) > 5 else ''}"
                f" {'is' if len(missing) == 1 else 'are'} not; select the parameters of those "
                "layers with params=, or use an exact curvature (ggn, hessian)")
        order = {n: i for i, n in enumerate(s.names)}
        return sorted(blocks, key=lambda bl: order[bl.weight or bl.bias])

    def _fit_factors(self) -> None:
        """A_l and G_l over every batch (module docstring), all-reduced under a process group."""
        gen = torch.Generator().manual_seed(self.seed)
        dt, dev = self.space.dtype, self.space.device
        acc_A = [torch.zeros(bl.columns, bl.columns, dtype=dt, device=dev) for bl in self.blocks]
        acc_G = [torch.zeros(bl.out_features, bl.out_features, dtype=dt, device=dev)
                 for bl in self.blocks]
        for b, n_b in enumerate(self.batches.sizes):
            w = n_b / self.total_samples
            A_b, G_b = self._batch_factors(self.batches.inputs[b], self.batches.targets[b], gen)
            for acc, new in ((acc_A, A_b), (acc_G, G_b)):
                for t, x in zip(acc, new):
                    t.add_(x, alpha=w)
        for bl, A, G in zip(self.blocks, acc_A, acc_G):
            bl.A = all_reduce_sum(A, self.process_group)
            bl.G = all_reduce_sum(G, self.process_group)

    def _batch_factors(self, x, y: Tensor, gen: torch.Generator
                       ) -> tuple[list[Tensor], list[Tensor]]:
        s = self.space
        modules = dict(s.model.named_modules())
        records: dict[str, list[tuple[Tensor, Tensor]]] = {bl.module: [] for bl in self.blocks}

        def hook(name):
            def record(_m, inputs, out):
                records[name].append((inputs[0].detach(), out))
            return record

        handles = [modules[bl.module].register_forward_hook(hook(bl.module))
                   for bl in self.blocks]
        leaves = {n: t.detach().requires_grad_(True) for n, t in s.params.items()}
        try:
            with torch.enable_grad(), self.context():
                out = s.outputs(self.task, leaves, x)
        finally:
            for h in handles:
                h.remove()
        cols = output_hessian_columns(self.task, out, y, self.kind, gen)
        outs = [o for bl in self.blocks for _, o in records[bl.module]]
        G = [torch.zeros(bl.out_features, bl.out_features, dtype=out.dtype, device=out.device)
             for bl in self.blocks]
        with self.context():
            for i, u in enumerate(cols):
                grads = torch.autograd.grad(out, outs, u, retain_graph=i < len(cols) - 1,
                                            allow_unused=True)
                it = iter(grads)
                for bl, Gl in zip(self.blocks, G):
                    for _ in records[bl.module]:
                        g = next(it)
                        if g is not None:
                            rows = self._rows_out(modules[bl.module], g)
                            Gl.addmm_(rows.T, rows)
        A = []
        for bl in self.blocks:
            m = modules[bl.module]
            rows = torch.cat([self._rows_in(m, a, bl) for a, _ in records[bl.module]])
            A.append(rows.T @ rows / rows.shape[0])
        return A, G

    @staticmethod
    def _rows_out(m: nn.Module, g: Tensor) -> Tensor:
        """Output gradients as rows (R, out)."""
        if isinstance(m, nn.Conv2d):
            return g.movedim(1, -1).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    @staticmethod
    def _rows_in(m: nn.Module, a: Tensor, bl: KroneckerBlock) -> Tensor:
        """Layer inputs as rows (R, in [+1]): patches for a convolution, a 1 for the bias."""
        if isinstance(m, nn.Conv2d):
            patches = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = a.reshape(-1, a.shape[-1])
        parts = [rows] if bl.weight else []
        if bl.bias:
            parts.append(torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    # ---- the federated composition ----------------------------------------------------------
    @classmethod
    def combine(cls, clients: Sequence[KFACOperator], weights: Sequence[float]) -> KFACOperator:
        """The server's K-FAC from the clients': A = Σ_c w_c A_c, G = Σ_c w_c G_c (with
        w_c = n_c/N exactly the K-FAC of the pooled data)."""
        first = clients[0]
        server = object.__new__(cls)
        server.__dict__.update({k: v for k, v in first.__dict__.items()
                                if k not in ("blocks", "batches")})
        server.batches = None
        server.total_samples = sum(c.total_samples for c in clients)
        server.loss_value = float(sum(w * c.loss_value for w, c in zip(weights, clients)))
        server.blocks = [
            KroneckerBlock(bl.module, bl.weight, bl.bias, bl.out_features, bl.in_features,
                           A=sum(w * c.blocks[i].A for w, c in zip(weights, clients)),
                           G=sum(w * c.blocks[i].G for w, c in zip(weights, clients)))
            for i, bl in enumerate(first.blocks)]
        server.num_matvecs = 0
        return server

    # ---- operator protocol ------------------------------------------------------------------
    def apply_rows(self, R: Tensor, reduce: bool = True) -> Tensor:
        """(k, p) rows → (k, p) rows of C v. The factors are global (all-reduced once), so
        ``reduce=False`` under a process group returns the product on rank 0 and zeros on
        the others (their sum over the ranks is the product)."""
        R = R.to(dtype=self.dtype, device=self.device)
        T = self.space.tangents(R)
        out = torch.empty_like(R)
        O = self.space.tangents(out)
        for bl in self.blocks:
            parts = []
            if bl.weight:
                parts.append(T[bl.weight].reshape(R.shape[0], bl.out_features, -1))
            if bl.bias:
                parts.append(T[bl.bias].reshape(R.shape[0], bl.out_features, 1))
            M = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
            P = bl.G @ M @ bl.A
            if bl.weight:
                O[bl.weight].copy_(P[..., :bl.in_features].reshape(O[bl.weight].shape))
            if bl.bias:
                O[bl.bias].copy_(P[..., -1].reshape(O[bl.bias].shape))
        self.num_matvecs += R.shape[0]
        pg = self.process_group
        if pg is not None and not reduce and torch.distributed.get_rank(
                None if pg is True else pg) != 0:
            out.zero_()
        if reduce:
            check_finite_product(out, self.curvature)
        return out

    # ---- the exact spectrum -----------------------------------------------------------------
    def spectrum(self) -> Tensor:
        """All p eigenvalues (float64, descending): λ_G,i λ_A,j of every layer."""
        vals = []
        for bl in self.blocks:
            la = torch.linalg.eigvalsh(bl.A.double()).clamp_min(0)
            lg = torch.linalg.eigvalsh(bl.G.double()).clamp_min(0)
            vals.append(torch.outer(lg, la).reshape(-1))
        return torch.cat(vals).sort(descending=True).values

    def trace(self) -> float:
        """tr(C) = Σ_l tr(G_l) tr(A_l)."""
        return float(sum(torch.trace(bl.G.double()) * torch.trace(bl.A.double())
                         for bl in self.blocks))

    def frobenius_sq(self) -> float:
        """‖C‖_F² = Σ_l ‖G_l‖_F² ‖A_l‖_F²."""
        return float(sum(bl.G.double().pow(2).sum() * bl.A.double().pow(2).sum()
                         for bl in self.blocks))

    def stable_rank(self) -> float:
        """‖C‖_F² / ‖C‖₂², exact."""
        return self.frobenius_sq() / float(self.spectrum()[0]) ** 2
