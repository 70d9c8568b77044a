"""FeDLRT: federated dynamical low-rank training (Schotthöfer & Laiu, 2024, arXiv:2406.17887).

Every factorized layer keeps a *global* low-rank form W = U S Vᵀ (U: m × r, S: r × r, V: n × r,
U and V orthonormal; :mod:`hessrank.fl.dlrt_layers`); clients only ever train the small
coefficient matrix, in a basis the server built from the averaged basis gradients. With client
weights w_c (``fedlrt_weighting``: ``uniform``, w_c = 1/|S| over the sampled clients S — the
paper's objective L = (1/C) Σ_c L_c — by default, or ``size``, w_c = n_c / Σ_{c∈S} n_c, the
FedAvg convention and DESIGN.md §1's server loss), L = Σ_c w_c L_c and L_c the mean loss over
client c's local data, one round (DESIGN.md §5) is:

1. *Basis gradients.* Clients get the global model and send, at the global point,
   G_U,c = ∇_U L_c = ∇_W L_c V Sᵀ (m × r) and G_V,c = ∇_V L_c = ∇_W L_cᵀ U S (n × r)
   (full local batch). The server averages G_U = Σ_c w_c G_U,c, G_V likewise.
2. *Augmentation.* Ũ = [U | Ū] with Ū an orthonormal basis of range((I − UUᵀ) G_U), Ṽ = [V | V̄]
   likewise, S̃ = [[S, 0], [0, 0]] (so Ũ S̃ Ṽᵀ = W). The server broadcasts Ū and V̄ only.
   Ū has a ≤ min(r, m − r) columns: directions of (I − UUᵀ)G_U with singular value
   ≤ sqrt(eps) · ‖G_U‖₂ are dropped (numerically inside span(U)), so a rank-deficient gradient
   or r = m adds fewer (possibly zero) columns, and S̃ is (r + a) × (r + b), possibly rectangular.
3. *Variance correction* 𝒱_c. ``full``: clients send ∇_S̃ L_c = Ũᵀ ∇_W L_c Ṽ at the round start,
   the server averages to ∇_S̃ L and broadcasts it, 𝒱_c = ∇_S̃ L − ∇_S̃ L_c. ``simplified``:
   ∇_S L_c = Uᵀ ∇_W L_c V (r × r) travels up with step 1, the server broadcasts the average ∇_S L
   with step 2, and 𝒱_c = [[∇_S L − ∇_S L_c, 0], [0, 0]]. ``none``: 𝒱_c = 0.
4. *Local coefficient steps.* Starting from S̃, each client takes s* plain SGD steps
   S̃ ← S̃ − λ (∇_S̃ L_c,B(Ũ S̃ Ṽᵀ) + 𝒱_c) with Ũ, Ṽ frozen, where L_c,B is the mean loss over a
   minibatch B drawn exactly as in FedAvg (:func:`hessrank.fl.local.batch_indices`: s* =
   ``local_steps`` batches of min(batch_size, n_c) samples, or ``local_epochs`` passes when
   ``local_steps`` = 0); batch_size ≥ n_c gives full-batch gradient descent, the setting of the
   paper's analysis. The non-factorized parameters (biases, unfactorized layers) take the same
   plain SGD steps on L_c,B, without correction, starting from the global values (as in FedAvg).
5. *Aggregation and truncation.* The server averages S̃ = Σ_c w_c S̃_c (and the non-factorized
   floating-point state; integer buffers come from the first client, as in FedAvg), takes the
   SVD S̃ = P Σ Qᵀ and keeps the smallest r' with ‖(σ_{r'+1}, σ_{r'+2}, …)‖₂ ≤ ϑ ‖Σ‖_F,
   clamped to [r_min, r_max] and to min(r + a, r + b) (≤ 2r, ≤ min(m, n));
   U ← Ũ P[:, :r'], V ← Ṽ Q[:, :r'], S ← Σ[:r', :r']. Then U and V are
   re-orthonormalized by QR with the triangular factors absorbed into S (W unchanged up to
   rounding) so rounding errors do not accumulate over rounds.

*Non-factorized layers* (biases, the first and last layer, BatchNorm, any layer not listed in
``factorize``) are trained like FedAvg: plain SGD on L_c,B from the global values, averaged
with the weights w_c. They get **no variance correction**: with heterogeneous clients and
several local steps their average drifts towards a mixture of the clients' minimizers exactly
as in FedAvg (client drift), so the global-loss descent guarantee of the paper covers the
coefficients of the factorized layers only. When the non-factorized layers are a small part of
the model (the default leaves only the first and last layer dense) the effect is FedAvg's drift
on those layers.

*Initialization* (``fedlrt_init``). ``scaled-svd`` (default): the rank-r truncated SVD of the
dense init, with S rescaled to keep the dense init's Frobenius norm; ``svd``: the plain
truncated SVD. *Truncation*: ϑ is relative (‖σ_tail‖ ≤ ϑ‖σ‖_F), default 0.02. Why both
(experiments/benchmarks/bench_fedlrt_init.py, results/trainer.md; digits CNN, r = 8, K = 20,
Dirichlet 0.5, 30 rounds): the plain truncation of a random init keeps only part of each
layer's norm, so with two factorized layers the network started nearly silent and FeDLRT sat
at chance (test accuracy 0.103 at lr 0.3, 0.475 at lr 1.0; FedAvg 0.733 / 0.758); and at
ϑ = 0.1 a round's new directions (under ϑ² = 1 % of the coefficient energy) were always
truncated, so the rank never left 8–9. scaled-svd alone: 0.319 / 0.636; with ϑ = 0.02 the
rank grows (22 and 17) and FeDLRT reaches 0.858 at lr 1.0 (MLP: 0.906, FedAvg 0.933).

With one client and full-batch steps the correction vanishes and a round is s* steps of gradient
descent on S̃ for the augmented factorization, followed by truncation; with full correction the
first local step is exactly the centralized step S̃ − λ ∇_S̃ L.

Communication, per sampled client and round, in floats (scalars such as the loss and n_c are
metadata and not counted, as in FedAvg). Per factorized layer ℓ: m × n matrix view, rank r at the
round start, a new U columns and b new V columns, k = r + a, l = r + b. D is the number of
floating-point entries of the non-factorized state (parameters, biases and floating buffers):

    down = D + Σ_ℓ [(m + n) r + r²]        phase 1: global model (U, S, V, dense state)
         + Σ_ℓ [m a + n b]                 phase 2: new basis columns Ū, V̄
         + Σ_ℓ k l   (full)  |  Σ_ℓ r²  (simplified)  |  0 (none)     phase 3: ∇_S̃ L or ∇_S L
    up   = Σ_ℓ (m + n) r  (+ Σ_ℓ r² if simplified)      phase 1: G_U,c, G_V,c (∇_S L_c)
         + Σ_ℓ k l   (full only)                       phase 3: ∇_S̃ L_c
         + Σ_ℓ k l + D                                 phase 5: S̃_c and dense state

A dense FedAvg round of the same model moves Σ_ℓ m n + D floats each way. The global model is
broadcast in full every round because clients are stateless (a client sampled this round need
not have seen last round's Ũ, Ṽ).

Example:
    >>> import torch
    >>> from hessrank.fl.base import ClientData
    >>> from hessrank.fl.config import TrainConfig
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    >>> cfg = TrainConfig(algo="fedlrt", rank=2, factorize=["0"], local_steps=3, batch_size=64)
    >>> algo = FeDLRT(net, cfg)
    >>> x = torch.randn(40, 8)
    >>> data = [ClientData(0, x[:20], x[:20]), ClientData(1, x[20:], x[20:])]
    >>> stats = algo.run_round(0, data, lr=0.5, generator=torch.Generator().manual_seed(0))
    >>> sorted(stats.ranks), stats.extra["rank_pre/0"]
    (['0'], 4.0)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.fl.base import (
    ClientData,
    ClientReply,
    ClientTask,
    Execute,
    FederatedAlgorithm,
    NonFiniteError,
    RoundStats,
    check_finite_reply,
)
from hessrank.fl.config import TrainConfig
from hessrank.fl.dlrt_layers import USVConv2d, USVLinear, usv_from_dense
from hessrank.fl.fedavg import weighted_average
from hessrank.fl.layers import check_factorizable, default_factorizable, set_submodule
from hessrank.fl.local import batch_indices

LossFn = Callable[[Tensor, Tensor], Tensor]

_CHUNK = 4096  # samples per forward pass when a full local batch is evaluated


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean per-sample loss: 0.5 ‖ŷ − y‖² for floating targets (regression), else cross-entropy.

    The regression form is the one of ``load_dataset("lowrank-lsq").task``:
    0.5 · (1/n) Σ_i ‖ŷ_i − y_i‖².
    """
    if targets.is_floating_point():
        diff = outputs - targets.reshape(outputs.shape)
        return 0.5 * diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1).mean()
    return F.cross_entropy(outputs, targets)


def augment_basis(basis: Tensor, grad: Tensor) -> Tensor:
    """Orthonormal new directions Ū spanning range((I − BBᵀ) G) numerically.

    Args:
        basis: B, shape (m, r), orthonormal columns.
        grad: G, shape (m, r), the averaged basis gradient.
    Returns:
        Ū of shape (m, a) with a ≤ min(r, m − r), ŪᵀŪ = I, BᵀŪ ≈ 0 to rounding. Directions of
        (I − BBᵀ) G with singular value ≤ sqrt(eps) · ‖G‖₂ are dropped; a = 0 when G = 0 or
        B already spans R^m. The projection is applied twice ("twice is enough") and the kept
        directions are re-orthonormalized by QR.
    """
    m, r = basis.shape
    room = m - r
    if room <= 0 or grad.numel() == 0:
        return basis.new_zeros(m, 0)
    gnorm = torch.linalg.matrix_norm(grad, ord=2)
    if not torch.isfinite(gnorm):
        raise FloatingPointError(
            "basis gradient is not finite; lower the learning rate or check the data"
        )
    x = grad - basis @ (basis.T @ grad)
    x = x - basis @ (basis.T @ x)
    left, sigma, _ = torch.linalg.svd(x, full_matrices=False)
    tol = math.sqrt(torch.finfo(grad.dtype).eps) * gnorm
    a = min(int((sigma > tol).sum()), room)
    if a == 0:
        return basis.new_zeros(m, 0)
    new = left[:, :a]
    new = new - basis @ (basis.T @ new)
    q, _ = torch.linalg.qr(new)
    return q


def truncation_rank(sigma: Tensor, theta: float, r_min: int, r_max: int) -> int:
    """Smallest r' with ‖σ[r':]‖₂ ≤ θ ‖σ‖₂, clamped to [r_min, r_max] and to len(σ).

    ``sigma`` holds the singular values in decreasing order.
    """
    k = int(sigma.numel())
    # tail[j] = ‖σ[j:]‖₂ for j = 0..k (tail[k] = 0)
    sq = sigma.detach().to(torch.float64).pow(2)
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)]).sqrt()
    bound = theta * float(tail[0])
    keep = int(torch.nonzero(tail <= bound)[0, 0]) if k > 0 else 0
    return max(1, min(max(keep, r_min), r_max, k))


@dataclass
class _Augmented:
    """Server-side view of one layer during a round."""

    U: Tensor  # Ũ, m × k
    V: Tensor  # Ṽ, n × l
    r: int  # rank at the round start
    a: int  # new U columns
    b: int  # new V columns


class FeDLRT(FederatedAlgorithm):
    """Federated dynamical low-rank training; see the module docstring for the round.

    Args:
        model: the dense model built from the config; the layers named in ``config.factorize``
            (default: every Linear/Conv2d but the first and last) are replaced in place by
            U S Vᵀ layers initialized by truncated SVD at rank ``min(config.rank, m, n)``.
        config: uses ``rank``, ``correction``, ``trunc_theta`` (ϑ), ``r_min``, ``r_max``,
            ``local_steps`` (s*; 0 means ``local_epochs`` passes over the local data),
            ``batch_size`` and ``factorize``; records its open choices in ``config.notes``.
        loss_fn: mean per-sample loss ``loss_fn(outputs, targets)``; default :func:`default_loss`
            (0.5‖ŷ − y‖² for floating targets, cross-entropy for integer ones). The attribute
            ``loss_fn`` may be reassigned before the first round.
    """

    name = "fedlrt"
    phases = ("basis", "correction", "train")

    def __init__(
        self, model: nn.Module, config: TrainConfig, loss_fn: LossFn | None = None
    ) -> None:
        self._check_config(config)
        self._template = copy.deepcopy(model)
        names = list(config.factorize) if config.factorize is not None else None
        if names is None:
            names = default_factorizable(model)
        if not names:
            raise ValueError(
                "FeDLRT found no layer to factorize (the default skips the first and last "
                "Linear/Conv2d); pass factorize=[<layer names>], e.g. factorize=['fc'] for a "
                "single-layer model"
            )
        names = check_factorizable(model, names)
        for n in names:
            layer = usv_from_dense(
                model.get_submodule(n), config.rank, keep_norm=config.fedlrt_init == "scaled-svd"
            )
            set_submodule(model, n, layer)
        super().__init__(model, config)
        self.layer_names = names
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else default_loss
        self._factor_keys = {f"{n}.{f}" for n in names for f in ("U", "S", "V")}
        self._work: nn.Module | None = None
        self._record_notes(config)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_config(config: TrainConfig) -> None:
        if config.rank < 1:
            raise ValueError(f"FeDLRT needs rank >= 1, got {config.rank}")
        if config.r_min < 1 or config.r_max < config.r_min:
            raise ValueError(
                f"FeDLRT needs 1 <= r_min <= r_max, got r_min={config.r_min}, r_max={config.r_max}"
            )
        if not 0.0 <= config.trunc_theta < 1.0:
            raise ValueError(f"trunc_theta (ϑ) must be in [0, 1), got {config.trunc_theta}")
        if config.local_steps < 0 or (config.local_steps == 0 and config.local_epochs < 1):
            raise ValueError(
                f"FeDLRT needs local_steps > 0, or local_steps = 0 with local_epochs >= 1; got "
                f"local_steps={config.local_steps}, local_epochs={config.local_epochs}"
            )
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        if config.momentum != 0.0 or config.weight_decay != 0.0:
            raise ValueError(
                "FeDLRT takes plain SGD steps on the coefficients (the variance correction "
                f"assumes it); set momentum=0 and weight_decay=0 (got {config.momentum}, "
                f"{config.weight_decay})"
            )

    @staticmethod
    def _record_notes(config: TrainConfig) -> None:
        notes = {
            "fedlrt.init": f"{config.fedlrt_init}: factorized layers start at the truncated "
            "SVD of the dense init, rank min(rank, m, n)"
            + (", S rescaled to the dense init's Frobenius norm"
               if config.fedlrt_init == "scaled-svd" else ""),
            "fedlrt.weighting": f"{config.fedlrt_weighting} client weights in every average",
            "fedlrt.local_steps": "minibatches as FedAvg (hessrank.fl.local.batch_indices): "
            "local_steps batches of min(batch_size, n_c), else local_epochs passes; "
            "batch_size >= n_c gives full-batch GD; basis and correction gradients always use "
            "the full local batch",
            "fedlrt.dense_params": "non-factorized parameters take the same plain SGD steps "
            "without variance correction and are averaged with the client weights (FedAvg's "
            "weighted_average: integer buffers from the first client)",
            "fedlrt.broadcast": "global U, S, V and dense state broadcast every round "
            "(stateless clients)",
            "fedlrt.augmentation": "new directions of (I-UU^T)G_U with singular value <= "
            "sqrt(eps)*||G_U||_2 dropped; S~ may be rectangular when a side cannot grow",
            "fedlrt.truncation": "smallest r' with ||sigma[r':]|| <= theta*||sigma||_F, clamped "
            "to [r_min, r_max] and the augmented size; bases re-orthonormalized by QR",
            "fedlrt.simplified": "simplified correction: grad_S L_c (r x r) sent with the basis "
            "gradients, averaged grad_S L broadcast with the new columns",
            "fedlrt.train_loss": "weighted loss of the sampled clients at the round-start "
            "global point",
        }
        for key, value in notes.items():
            config.notes.setdefault(key, value)

    # ------------------------------------------------------------------ helpers

    def _layers(self, module: nn.Module) -> dict[str, USVLinear | USVConv2d]:
        return {n: module.get_submodule(n) for n in self.layer_names}  # type: ignore[misc]

    def _dense_state(self, module: nn.Module) -> dict[str, Tensor]:
        """Every state_dict entry except the factors U, S, V (detached references)."""
        return {k: v.detach() for k, v in module.state_dict().items() if k not in self._factor_keys}

    @staticmethod
    def _numel_float(state: dict[str, Tensor]) -> int:
        return sum(t.numel() for t in state.values() if t.is_floating_point())

    def _dtype(self) -> torch.dtype:
        return self._layers(self.model)[self.layer_names[0]].S.dtype

    def _prepare(self, data: ClientData) -> tuple[Tensor, Tensor]:
        dtype = self._dtype()
        x, y = data.inputs, data.targets
        if x.is_floating_point():
            x = x.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        return x, y

    def _load(
        self,
        dense: dict[str, Tensor],
        factors: dict[str, tuple[Tensor, Tensor, Tensor]],
    ) -> nn.Module:
        """Load a message (dense state + factors) into the scratch client module."""
        if self._work is None:
            self._work = copy.deepcopy(self.model)
        work = self._work
        for name, layer in self._layers(work).items():
            layer.set_factors(*factors[name])
        with torch.no_grad():
            for key, t in work.state_dict(keep_vars=True).items():
                if key not in self._factor_keys:
                    t.copy_(dense[key])
        work.train()
        return work

    def _full_batch_grad(
        self, module: nn.Module, x: Tensor, y: Tensor, wrt: list[Tensor]
    ) -> tuple[float, list[Tensor]]:
        """Mean loss over the whole local set and its gradient w.r.t. ``wrt`` (chunked)."""
        n = x.shape[0]
        grads = [torch.zeros_like(t) for t in wrt]
        total = 0.0
        for start in range(0, n, _CHUNK):
            xb, yb = x[start : start + _CHUNK], y[start : start + _CHUNK]
            loss = self.loss_fn(module(xb), yb)
            if xb.shape[0] != n:
                loss = loss * (xb.shape[0] / n)
            gs = torch.autograd.grad(loss, wrt, allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc.add_(g)
            total += float(loss.detach())
        return total, grads

    # ------------------------------------------------------------------ client side

    def _client_basis_grads(
        self,
        dense: dict[str, Tensor],
        factors: dict[str, tuple[Tensor, Tensor, Tensor]],
        data: ClientData,
    ) -> dict[str, object]:
        """Phase 1: loss, ∇_U L_c, ∇_V L_c (and ∇_S L_c) at the global point, full local batch."""
        work = self._load(dense, factors)
        layers = self._layers(work)
        wrt = [t for n in self.layer_names for t in (layers[n].U, layers[n].S, layers[n].V)]
        for t in wrt:
            t.requires_grad_(True)
        x, y = self._prepare(data)
        loss, grads = self._full_batch_grad(work, x, y, wrt)
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"client {data.client_id} got a non-finite loss ({loss}) at the global point",
                client_id=data.client_id,
            )
        out: dict[str, object] = {"loss": loss}
        for i, n in enumerate(self.layer_names):
            out[n] = (grads[3 * i], grads[3 * i + 1], grads[3 * i + 2])  # G_U, G_S, G_V
        return out

    def _client_coef_grad(
        self,
        dense: dict[str, Tensor],
        factors: dict[str, tuple[Tensor, Tensor, Tensor]],
        data: ClientData,
    ) -> dict[str, Tensor]:
        """Phase 3 (full correction): ∇_S̃ L_c at the augmented start point, full local batch."""
        work = self._load(dense, factors)
        layers = self._layers(work)
        wrt = []
        for n in self.layer_names:
            layers[n].U.requires_grad_(False)
            layers[n].V.requires_grad_(False)
            wrt.append(layers[n].S)
        x, y = self._prepare(data)
        _, grads = self._full_batch_grad(work, x, y, wrt)
        return dict(zip(self.layer_names, grads))

    def _client_train(
        self,
        dense: dict[str, Tensor],
        factors: dict[str, tuple[Tensor, Tensor, Tensor]],
        corrections: dict[str, Tensor] | None,
        data: ClientData,
        lr: float,
        generator: torch.Generator,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Phase 4: s* SGD steps on S̃ (+ correction) and on the non-factorized parameters.

        Returns the client's S̃_c per layer and its non-factorized state.
        """
        work = self._load(dense, factors)
        layers = self._layers(work)
        coefs = []
        for n in self.layer_names:
            layers[n].U.requires_grad_(False)
            layers[n].V.requires_grad_(False)
            coefs.append(layers[n].S)
        others = [
            p for k, p in work.named_parameters() if k not in self._factor_keys and p.requires_grad
        ]
        params = coefs + others
        corr = [corrections[n] for n in self.layer_names] if corrections is not None else None
        x, y = self._prepare(data)
        n, cfg = x.shape[0], self.config
        batches = batch_indices(
            n, cfg.batch_size, epochs=cfg.local_epochs, steps=cfg.local_steps, generator=generator
        )
        for step, idx in enumerate(batches):
            # a batch holding every sample is the full local batch: skip the reordering
            xb, yb = (x, y) if idx.numel() == n else (x[idx], y[idx])
            loss = self.loss_fn(work(xb), yb)
            if not bool(torch.isfinite(loss.detach())):
                value = float(loss.detach())
                raise NonFiniteError(
                    f"client {data.client_id} got a non-finite loss ({value}) at local step "
                    f"{step + 1} of {len(batches)}", client_id=data.client_id,
                )  # fmt: skip
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    step = torch.zeros_like(p) if g is None else g
                    if corr is not None and i < len(coefs):
                        step = step + corr[i]
                    p.sub_(lr * step)
        s_out = {nm: layers[nm].S.detach().clone() for nm in self.layer_names}
        dense_out = {k: v.clone() for k, v in self._dense_state(work).items()}
        check_finite_reply({**s_out, **dense_out}, data.client_id)
        return s_out, dense_out

    # ------------------------------------------------------------------ messages

    def _message(
        self,
        dense: dict[str, Tensor],
        factors: dict[str, tuple[Tensor, Tensor, Tensor]],
        corrections: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """A message as one flat tensor dict: the dense state, ``<layer>.U/.S/.V`` and, for the
        training phase with a correction, ``corr.<layer>``."""
        out = dict(dense)
        for n, (U, S, V) in factors.items():
            out.update({f"{n}.U": U, f"{n}.S": S, f"{n}.V": V})
        if corrections is not None:
            out.update({f"corr.{n}": c for n, c in corrections.items()})
        return out

    def _unpack(self, message: dict[str, Tensor]) -> tuple[
        dict[str, Tensor], dict[str, tuple[Tensor, Tensor, Tensor]], dict[str, Tensor] | None
    ]:
        """Inverse of :meth:`_message`."""
        dense = {k: v for k, v in message.items()
                 if k not in self._factor_keys and not k.startswith("corr.")}  # fmt: skip
        factors = {n: (message[f"{n}.U"], message[f"{n}.S"], message[f"{n}.V"])
                   for n in self.layer_names}  # fmt: skip
        corr = {n: message[f"corr.{n}"] for n in self.layer_names if f"corr.{n}" in message}
        return dense, factors, (corr or None)

    def client_work(
        self, task: ClientTask, data: ClientData, generator: torch.Generator
    ) -> ClientReply:
        """The client's side of the three phases (module docstring).

        ``basis``: message = global model; reply ``<layer>.GU/.GS/.GV`` (phase 1), metric
        ``loss``. ``correction``: message = augmented model; reply ``<layer>.GS`` = ∇_S̃ L_c
        (phase 3, full correction). ``train``: message = augmented model (+ ``corr.<layer>``);
        reply ``<layer>.S`` = S̃_c and the client's non-factorized state (phase 4).
        """
        dense, factors, corr = self._unpack(task.message)
        if task.phase == "basis":
            out = self._client_basis_grads(dense, factors, data)
            tensors = {}
            for n in self.layer_names:
                g_u, g_s, g_v = out[n]  # type: ignore[misc]
                tensors.update({f"{n}.GU": g_u, f"{n}.GS": g_s, f"{n}.GV": g_v})
            return ClientReply(tensors, {"loss": float(out["loss"])})  # type: ignore[arg-type]
        if task.phase == "correction":
            grads = self._client_coef_grad(dense, factors, data)
            return ClientReply({f"{n}.GS": g for n, g in grads.items()})
        if task.phase == "train":
            s_out, dense_out = self._client_train(dense, factors, corr, data, task.lr, generator)
            return ClientReply({**dense_out, **{f"{n}.S": s for n, s in s_out.items()}})
        raise ValueError(f"FeDLRT phases are {self.phases}, got {task.phase!r}")

    # ------------------------------------------------------------------ the round

    def run_round(
        self,
        round_idx: int,
        clients: list[ClientData],
        lr: float,
        generator: torch.Generator,
        execute: Execute | None = None,
    ) -> RoundStats:
        """One FeDLRT round (module docstring) over the sampled ``clients`` at step size λ = lr;
        every client computation goes through ``execute`` (default :meth:`client_work`)."""
        if not clients:
            raise ValueError("run_round needs at least one sampled client")
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        run = self._execute(execute)
        correction = self.config.correction
        sizes = torch.tensor([c.size for c in clients], dtype=torch.float64)
        if bool((sizes <= 0).any()):
            raise ValueError("every sampled client needs at least one sample")
        if self.config.fedlrt_weighting == "uniform":
            weights = [1.0 / len(clients)] * len(clients)
        else:
            weights = (sizes / sizes.sum()).tolist()
        glob_layers = self._layers(self.model)
        dense = {k: v.clone() for k, v in self._dense_state(self.model).items()}
        factors = {
            n: (l.U.detach().clone(), l.S.detach().clone(), l.V.detach().clone())
            for n, l in glob_layers.items()
        }
        D = self._numel_float(dense)

        # phase 1: basis gradients (and ∇_S L_c for the simplified correction)
        message = self._message(dense, factors)
        answers = [run(ClientTask("basis", c.client_id, message, lr=lr), c, generator)
                   for c in clients]  # fmt: skip
        replies = [{"loss": a.metrics["loss"], **{
            n: (a.tensors[f"{n}.GU"], a.tensors[f"{n}.GS"], a.tensors[f"{n}.GV"])
            for n in self.layer_names}} for a in answers]  # fmt: skip
        train_loss = sum(w * float(r["loss"]) for w, r in zip(weights, replies))
        aug: dict[str, _Augmented] = {}
        grad_s_local: dict[str, list[Tensor]] = {}
        grad_s_mean: dict[str, Tensor] = {}
        for n in self.layer_names:
            U, S, V = factors[n]
            g_u = sum(w * r[n][0] for w, r in zip(weights, replies))  # type: ignore[index]
            g_v = sum(w * r[n][2] for w, r in zip(weights, replies))  # type: ignore[index]
            grad_s_local[n] = [r[n][1] for r in replies]  # type: ignore[index]
            grad_s_mean[n] = sum(w * g for w, g in zip(weights, grad_s_local[n]))
            # phase 2: augmentation
            new_u = augment_basis(U, g_u)
            new_v = augment_basis(V, g_v)
            aug[n] = _Augmented(
                U=torch.cat([U, new_u], dim=1),
                V=torch.cat([V, new_v], dim=1),
                r=S.shape[0],
                a=new_u.shape[1],
                b=new_v.shape[1],
            )
        aug_factors = {}
        for n, A in aug.items():
            S = factors[n][1]
            s_tilde = S.new_zeros(A.r + A.a, A.r + A.b)
            s_tilde[: A.r, : A.r] = S
            aug_factors[n] = (A.U, s_tilde, A.V)
        aug_message = self._message(dense, aug_factors)

        # phase 3: variance correction
        corrections: list[dict[str, Tensor] | None]
        if correction == "full":
            coef_grads = []
            for c in clients:
                got = run(ClientTask("correction", c.client_id, aug_message, lr=lr), c, generator)
                coef_grads.append({n: got.tensors[f"{n}.GS"] for n in self.layer_names})
            mean = {n: sum(w * g[n] for w, g in zip(weights, coef_grads)) for n in self.layer_names}
            corrections = [{n: mean[n] - g[n] for n in self.layer_names} for g in coef_grads]
        elif correction == "simplified":
            corrections = []
            for ci in range(len(clients)):
                corr = {}
                for n, A in aug.items():
                    c_n = aug_factors[n][1].new_zeros(A.r + A.a, A.r + A.b)
                    c_n[: A.r, : A.r] = grad_s_mean[n] - grad_s_local[n][ci]
                    corr[n] = c_n
                corrections.append(corr)
        else:
            corrections = [None] * len(clients)

        # phase 4: local coefficient training
        results = []
        for i, c in enumerate(clients):
            task = ClientTask("train", c.client_id,
                              self._message(dense, aug_factors, corrections[i]), lr=lr)  # fmt: skip
            out = run(task, c, generator).tensors
            s_c = {n: out[f"{n}.S"] for n in self.layer_names}
            results.append((s_c, {k: out[k] for k in dense}))

        if self.record is not None:
            for c, (s_c, dense_c) in zip(clients, results):
                self.record[c.client_id] = self._effective_state(
                    dense_c, {n: (A.U, s_c[n], A.V) for n, A in aug.items()}
                )

        # phase 5: aggregation and truncation
        new_dense = weighted_average([res[1] for res in results], weights)
        ranks: dict[str, int] = {}
        extra: dict[str, float] = {}
        cfg = self.config
        for n, A in aug.items():
            s_bar = sum(w * res[0][n] for w, res in zip(weights, results))
            P, sigma, Qh = torch.linalg.svd(s_bar, full_matrices=False)
            r_new = truncation_rank(sigma, cfg.trunc_theta, cfg.r_min, cfg.r_max)
            U_new = A.U @ P[:, :r_new]
            V_new = A.V @ Qh[:r_new].T
            qu, ru = torch.linalg.qr(U_new)
            qv, rv = torch.linalg.qr(V_new)
            S_new = ru @ torch.diag(sigma[:r_new]) @ rv.T
            glob_layers[n].set_factors(qu, S_new, qv)
            ranks[n] = r_new
            extra[f"rank_pre/{n}"] = float(max(A.r + A.a, A.r + A.b))
        with torch.no_grad():
            for key, t in self.model.state_dict(keep_vars=True).items():
                if key not in self._factor_keys:
                    t.copy_(new_dense[key])

        # communication (per client; identical for every sampled client)
        counts = self._count(aug, D, correction)
        extra.update({f"floats/{k}": float(v) for k, v in counts.items()})
        up = counts["up_phase1"] + counts["up_phase3"] + counts["up_phase5"]
        down = counts["down_phase1"] + counts["down_phase2"] + counts["down_phase3"]
        return RoundStats(
            train_loss=float(train_loss),
            floats_up={c.client_id: up for c in clients},
            floats_down={c.client_id: down for c in clients},
            ranks=ranks,
            extra=extra,
        )

    def _count(self, aug: dict[str, _Augmented], D: int, correction: str) -> dict[str, int]:
        """Floats per client per phase; the formula of the module docstring."""
        c = dict.fromkeys(
            ("down_phase1", "down_phase2", "down_phase3", "up_phase1", "up_phase3", "up_phase5"), 0
        )
        c["down_phase1"] = D
        c["up_phase5"] = D
        for A in aug.values():
            m, n_ = A.U.shape[0], A.V.shape[0]
            r, k, l = A.r, A.r + A.a, A.r + A.b
            c["down_phase1"] += (m + n_) * r + r * r
            c["down_phase2"] += m * A.a + n_ * A.b
            c["up_phase1"] += (m + n_) * r
            if correction == "full":
                c["down_phase3"] += k * l
                c["up_phase3"] += k * l
            elif correction == "simplified":
                c["up_phase1"] += r * r
                c["down_phase3"] += r * r
            c["up_phase5"] += k * l
        return c

    def dense_floats(self) -> int:
        """Floats one dense FedAvg message of the same model carries (each way, per client)."""
        return self._numel_float(self.effective_model().state_dict())

    # ------------------------------------------------------------------ state

    def _effective_state(
        self, dense: dict[str, Tensor], factors: dict[str, tuple[Tensor, Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """The dense state_dict (keys of the original model) of non-factorized state ``dense``
        and factors U S Vᵀ per layer (a client's Ũ S̃_c Ṽᵀ for update records)."""
        layers = self._layers(self.model)
        state = {}
        for key, ref in self._template.state_dict().items():
            prefix, _, leaf = key.rpartition(".")
            if prefix in layers and leaf == "weight":
                U, S, V = factors[prefix]
                state[key] = (U @ S @ V.T).reshape(ref.shape).detach().clone()
            else:
                state[key] = dense[key].detach().clone()
        return state

    def effective_model(self) -> nn.Module:
        """A fresh dense copy of the original model with W = U S Vᵀ in each factorized layer."""
        dense = copy.deepcopy(self._template)
        fstate = self.model.state_dict()
        layers = self._layers(self.model)
        state = {}
        for key in dense.state_dict():
            prefix, _, leaf = key.rpartition(".")
            if prefix in layers and leaf == "weight":
                state[key] = layers[prefix].dense_weight().detach().clone()
            else:
                state[key] = fstate[key].detach().clone()
        dense.load_state_dict(state)
        return dense

    def state_tensors(self) -> dict[str, Tensor]:
        """The factored model's state_dict (``<layer>.U/.S/.V``, dense entries), cloned."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state_tensors`; factor shapes (ranks) may differ from the current ones."""
        expected = set(self.model.state_dict())
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))
            unknown = sorted(set(tensors) - expected)
            raise ValueError(
                f"FeDLRT state does not match the model: missing {missing}, unknown {unknown}; "
                "load a state saved by FeDLRT.state_tensors() for the same model and factorize"
            )
        for n, layer in self._layers(self.model).items():
            layer.set_factors(tensors[f"{n}.U"], tensors[f"{n}.S"], tensors[f"{n}.V"])
        self.model.load_state_dict(tensors)
