"""FeDLRT: federated dynamical low-rank training (Schotthöfer & Laiu, 2024, arXiv:2406.17887).

Every factorized layer keeps a *global* low-rank form W = U S Vᵀ (U: m × r, S: r × r, V: n × r,
U and V orthonormal; :mod:`hessrank.fl.dlrt_layers`); clients only ever train the small
coefficient matrix, in a basis the server built from the averaged basis gradients. With client
weights w_c (``fedlrt_weighting``: ``uniform``, w_c = 1/|S| over the sampled clients S — the
paper's objective L = (1/C) Σ_c L_c — by default, or ``size``, w_c = n_c / Σ_{c∈S} n_c, the
FedAvg convention and the server loss of docs/design.md), L = Σ_c w_c L_c and L_c the mean loss over
client c's local data, one round (docs/design.md) is:

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
   With ``max_grad_norm`` c > 0 the stochastic gradient (of S̃ and the non-factorized
   parameters together) is clipped to 2-norm c before the correction is added, as in FedAvg.
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

*Communication cap* (``rank_cap``). Ranks grow when ϑ lets new directions in, and a grown
rank can make a FeDLRT round send more floats than FedAvg's (issue 23). ``rank_cap =
"fedavg"`` bounds every layer's rank, at the start and after each truncation, by the largest
r whose worst round (a = b = r new columns) sends no more floats for that layer than
FedAvg's round, 2·m·n (:func:`fedavg_rank_cap`); the default ``"none"`` keeps r_max as the
only bound.

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

The server is :class:`FeDLRT` (phases ``basis``, ``correction``, ``train``: configure →
aggregate each; steps 2 and 5 are its aggregations), the client :class:`FeDLRTClient`.

Example:
    >>> import torch
    >>> from hessrank.data.task import RegressionTask
    >>> from hessrank.fl.config import TrainConfig
    >>> from hessrank.fl.loop import Federation
    >>> from hessrank.fl.protocol import ClientData
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    >>> cfg = TrainConfig(algo="fedlrt", rank=2, factorize=["0"], local_steps=3, batch_size=64)
    >>> fed = Federation.build(net, cfg, RegressionTask())
    >>> x = torch.randn(40, 8)
    >>> data = [ClientData(0, x[:20], x[:20]), ClientData(1, x[20:], x[20:])]
    >>> stats = fed.round(1, data, lr=0.5, rng=torch.Generator().manual_seed(0))
    >>> sorted(stats.ranks), stats.extra["rank_pre/0"]
    (['0'], 4.0)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hessrank.data.task import Task
from hessrank.fl.config import TrainConfig
from hessrank.fl.dlrt_layers import USVConv2d, USVLinear, usv_from_dense
from hessrank.fl.fedavg import weighted_average
from hessrank.fl.layers import check_factorizable, default_factorizable, set_submodule
from hessrank.fl.local import batch_indices
from hessrank.fl.protocol import (
    Client,
    ClientData,
    ClientReply,
    ClientState,
    ClientTask,
    NonFiniteError,
    RoundStats,
    Strategy,
)

__all__ = ["FeDLRT", "FeDLRTClient", "augment_basis", "fedlrt_factorize", "truncation_rank"]

_CHUNK = 4096  # samples per forward pass when a full local batch is evaluated


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


def layer_floats(m: int, n: int, r: int, a: int, b: int, correction: str) -> tuple[int, int]:
    """(down, up) floats per client and round for one m × n factorized layer of rank r with a
    and b new basis columns (the module docstring's formula, without the dense state D)."""
    k, l = r + a, r + b
    down = (m + n) * r + r * r + m * a + n * b
    up = (m + n) * r + k * l
    if correction == "full":
        down, up = down + k * l, up + k * l
    elif correction == "simplified":
        down, up = down + r * r, up + r * r
    return down, up


def fedavg_rank_cap(m: int, n: int, correction: str) -> int:
    """The largest rank r (at least 1) whose worst round — a = min(r, m − r), b = min(r, n − r)
    new columns — moves no more floats for an m × n layer than FedAvg's round, 2·m·n
    (``rank_cap = "fedavg"``). Per client and round, with full correction that is
    3(m + n)r + 13r² ≤ 2mn while 2r ≤ min(m, n)."""
    best = 1
    for r in range(1, min(m, n) + 1):
        if sum(layer_floats(m, n, r, min(r, m - r), min(r, n - r), correction)) <= 2 * m * n:
            best = r
    return best


def layer_rank_caps(model: nn.Module, names: list[str], config: TrainConfig) -> dict[str, int]:
    """Per factorized layer (dense ``model``), the rank bound: r_max, and with ``rank_cap =
    "fedavg"`` also :func:`fedavg_rank_cap` of its matrix view."""
    caps = {}
    for name in names:
        w = model.get_submodule(name).weight
        m, n = int(w.shape[0]), int(w[0].numel())
        cap = config.r_max
        if config.rank_cap == "fedavg":
            cap = min(cap, fedavg_rank_cap(m, n, config.correction))
        caps[name] = cap
    return caps


def fedlrt_factorize(model: nn.Module, config: TrainConfig) -> list[str]:
    """Replace the layers of ``config.factorize`` (default: every Linear/Conv2d but the first
    and last) in place by U S Vᵀ layers at rank ``min(config.rank, m, n)`` (truncated SVD of
    the dense init, rescaled with ``fedlrt_init = "scaled-svd"``); returns their names."""
    names = list(config.factorize) if config.factorize is not None else None
    if names is None:
        names = default_factorizable(model, config.factorize_rule)
    if not names:
        raise ValueError(
            "FeDLRT found no layer to factorize (the default skips the first and last "
            "Linear/Conv2d); pass factorize=[<layer names>], e.g. factorize=['fc'] for a "
            "single-layer model"
        )
    names = check_factorizable(model, names)
    caps = layer_rank_caps(model, names, config) if config.rank_cap != "none" else {}
    for n in names:
        layer = usv_from_dense(
            model.get_submodule(n), min(config.rank, caps.get(n, config.rank)),
            keep_norm=config.fedlrt_init == "scaled-svd",
        )  # fmt: skip
        set_submodule(model, n, layer)
    return names


def _layers(module: nn.Module, names: list[str]) -> dict[str, USVLinear | USVConv2d]:
    return {n: module.get_submodule(n) for n in names}  # type: ignore[misc]


def _factor_keys(names: list[str]) -> set[str]:
    return {f"{n}.{f}" for n in names for f in ("U", "S", "V")}


def _dense_state(module: nn.Module, factor_keys: set[str]) -> dict[str, Tensor]:
    """Every state_dict entry except the factors U, S, V (detached references)."""
    return {k: v.detach() for k, v in module.state_dict().items() if k not in factor_keys}


def _numel_float(state: dict[str, Tensor]) -> int:
    return sum(t.numel() for t in state.values() if t.is_floating_point())


Factors = dict[str, tuple[Tensor, Tensor, Tensor]]


def _message(
    dense: dict[str, Tensor], factors: Factors, corrections: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """A message as one flat tensor dict: the dense state, ``<layer>.U/.S/.V`` and, for the
    training phase with a correction, ``corr.<layer>``."""
    out = dict(dense)
    for n, (U, S, V) in factors.items():
        out.update({f"{n}.U": U, f"{n}.S": S, f"{n}.V": V})
    if corrections is not None:
        out.update({f"corr.{n}": c for n, c in corrections.items()})
    return out


def _unpack(
    message: dict[str, Tensor], names: list[str], factor_keys: set[str]
) -> tuple[dict[str, Tensor], Factors, dict[str, Tensor] | None]:
    """Inverse of :func:`_message`."""
    dense = {k: v for k, v in message.items()
             if k not in factor_keys and not k.startswith("corr.")}  # fmt: skip
    factors = {n: (message[f"{n}.U"], message[f"{n}.S"], message[f"{n}.V"]) for n in names}
    corr = {n: message[f"corr.{n}"] for n in names if f"corr.{n}" in message}
    return dense, factors, (corr or None)


@dataclass
class _Augmented:
    """Server-side view of one layer during a round."""

    U: Tensor  # Ũ, m × k
    V: Tensor  # Ṽ, n × l
    r: int  # rank at the round start
    a: int  # new U columns
    b: int  # new V columns


@dataclass
class _Round:
    """What the server holds between the phases of one round."""

    weights: list[float]
    dense: dict[str, Tensor]
    D: int
    train_loss: float = 0.0
    aug: dict[str, _Augmented] = field(default_factory=dict)
    aug_factors: Factors = field(default_factory=dict)
    corrections: list[dict[str, Tensor] | None] = field(default_factory=list)
    client_ids: list[int] = field(default_factory=list)


class FeDLRT(Strategy):
    """FeDLRT's server; see the module docstring for the round.

    Args:
        model: the dense model built from the config; the layers named in ``config.factorize``
            are replaced in place (:func:`fedlrt_factorize`).
        config: uses ``rank``, ``correction``, ``trunc_theta`` (ϑ), ``r_min``, ``r_max``,
            ``fedlrt_init``, ``fedlrt_weighting``, ``local_steps`` / ``local_epochs``,
            ``batch_size`` and ``factorize``.
    """

    name = "fedlrt"
    phases = ("basis", "correction", "train")

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        check_config(config)
        self._template = copy.deepcopy(model)
        self.layer_names = fedlrt_factorize(model, config)
        self.rank_caps = layer_rank_caps(self._template, self.layer_names, config)
        super().__init__(model, config)
        self._factor_keys = _factor_keys(self.layer_names)
        self._round: _Round | None = None

    def notes(self) -> dict[str, str]:
        config = self.config
        return {
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
            "to [r_min, r_max] and the augmented size; bases re-orthonormalized by QR"
            + ("; rank_cap fedavg: per layer also <= the largest rank whose round sends no "
               "more than FedAvg's 2mn floats: " + ", ".join(
                   f"{n} {c}" for n, c in self.rank_caps.items())
               if config.rank_cap == "fedavg" else ""),
            "fedlrt.simplified": "simplified correction: grad_S L_c (r x r) sent with the basis "
            "gradients, averaged grad_S L broadcast with the new columns",
            "fedlrt.train_loss": "weighted loss of the sampled clients at the round-start "
            "global point",
        }  # fmt: skip

    # ---- the round ---------------------------------------------------------------------------
    def configure(
        self, phase: str, round_idx: int, lr: float, clients: list[ClientData]
    ) -> list[ClientTask]:
        if phase == "basis":
            return self._start(lr, clients)
        r = self._current()
        if phase == "correction":
            if self.config.correction != "full":
                return []
            message = _message(r.dense, r.aug_factors)
            return [ClientTask("correction", c.client_id, message, lr=lr) for c in clients]
        if phase == "train":
            return [ClientTask("train", c.client_id,
                               _message(r.dense, r.aug_factors, r.corrections[i]), lr=lr)
                    for i, c in enumerate(clients)]  # fmt: skip
        raise ValueError(f"FeDLRT phases are {self.phases}, got {phase!r}")

    def _start(self, lr: float, clients: list[ClientData]) -> list[ClientTask]:
        """Phase 1's message (the global model) and the round's client weights."""
        if not clients:
            raise ValueError("a FeDLRT round needs at least one sampled client")
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        sizes = torch.tensor([c.size for c in clients], dtype=torch.float64)
        if bool((sizes <= 0).any()):
            raise ValueError("every sampled client needs at least one sample")
        if self.config.fedlrt_weighting == "uniform":
            weights = [1.0 / len(clients)] * len(clients)
        else:
            weights = (sizes / sizes.sum()).tolist()
        dense = {k: v.clone() for k, v in _dense_state(self.model, self._factor_keys).items()}
        factors = {
            n: (l.U.detach().clone(), l.S.detach().clone(), l.V.detach().clone())
            for n, l in _layers(self.model, self.layer_names).items()
        }
        self._round = _Round(weights, dense, _numel_float(dense),
                             aug_factors=factors)  # the round-start factors until step 2
        message = _message(dense, factors)
        return [ClientTask("basis", c.client_id, message, lr=lr) for c in clients]

    def _current(self) -> _Round:
        if self._round is None:
            raise ValueError("a FeDLRT round starts with the phase 'basis'")
        return self._round

    def aggregate(
        self, phase: str, tasks: list[ClientTask], replies: list[ClientReply],
        clients: list[ClientData],
    ) -> None:  # fmt: skip
        r = self._current()
        if phase == "basis":
            self._augment(r, replies)
        elif phase == "correction":
            coef_grads = [{n: a.tensors[f"{n}.GS"] for n in self.layer_names} for a in replies]
            mean = {n: sum(w * g[n] for w, g in zip(r.weights, coef_grads))
                    for n in self.layer_names}  # fmt: skip
            r.corrections = [{n: mean[n] - g[n] for n in self.layer_names} for g in coef_grads]
        elif phase == "train":
            r.client_ids = [t.client_id for t in tasks]
            self._truncate(r, replies)
        else:
            raise ValueError(f"FeDLRT phases are {self.phases}, got {phase!r}")

    def _augment(self, r: _Round, answers: list[ClientReply]) -> None:
        """Steps 1-2 (and the simplified correction): average the basis gradients, augment."""
        weights, factors = r.weights, r.aug_factors
        replies = [{"loss": a.metrics["loss"], **{
            n: (a.tensors[f"{n}.GU"], a.tensors[f"{n}.GS"], a.tensors[f"{n}.GV"])
            for n in self.layer_names}} for a in answers]  # fmt: skip
        r.train_loss = sum(w * float(x["loss"]) for w, x in zip(weights, replies))
        grad_s_local: dict[str, list[Tensor]] = {}
        grad_s_mean: dict[str, Tensor] = {}
        for n in self.layer_names:
            U, S, V = factors[n]
            g_u = sum(w * x[n][0] for w, x in zip(weights, replies))  # type: ignore[index]
            g_v = sum(w * x[n][2] for w, x in zip(weights, replies))  # type: ignore[index]
            grad_s_local[n] = [x[n][1] for x in replies]  # type: ignore[index]
            grad_s_mean[n] = sum(w * g for w, g in zip(weights, grad_s_local[n]))
            new_u = augment_basis(U, g_u)
            new_v = augment_basis(V, g_v)
            r.aug[n] = _Augmented(U=torch.cat([U, new_u], dim=1), V=torch.cat([V, new_v], dim=1),
                                  r=S.shape[0], a=new_u.shape[1], b=new_v.shape[1])  # fmt: skip
        aug_factors = {}
        for n, A in r.aug.items():
            S = factors[n][1]
            s_tilde = S.new_zeros(A.r + A.a, A.r + A.b)
            s_tilde[: A.r, : A.r] = S
            aug_factors[n] = (A.U, s_tilde, A.V)
        r.aug_factors = aug_factors
        if self.config.correction == "simplified":
            r.corrections = []
            for ci in range(len(answers)):
                corr = {}
                for n, A in r.aug.items():
                    c_n = aug_factors[n][1].new_zeros(A.r + A.a, A.r + A.b)
                    c_n[: A.r, : A.r] = grad_s_mean[n] - grad_s_local[n][ci]
                    corr[n] = c_n
                r.corrections.append(corr)
        else:  # "full" fills them in the correction phase
            r.corrections = [None] * len(answers)

    def _truncate(self, r: _Round, answers: list[ClientReply]) -> None:
        """Step 5: weighted average of S̃_c and the dense state, SVD truncation, QR."""
        results = [({n: a.tensors[f"{n}.S"] for n in self.layer_names},
                    {k: a.tensors[k] for k in r.dense}) for a in answers]  # fmt: skip
        new_dense = weighted_average([res[1] for res in results], r.weights)
        glob_layers = _layers(self.model, self.layer_names)
        cfg = self.config
        for n, A in r.aug.items():
            s_bar = sum(w * res[0][n] for w, res in zip(r.weights, results))
            P, sigma, Qh = torch.linalg.svd(s_bar, full_matrices=False)
            r_new = truncation_rank(sigma, cfg.trunc_theta, cfg.r_min, self.rank_caps[n])
            U_new = A.U @ P[:, :r_new]
            V_new = A.V @ Qh[:r_new].T
            qu, ru = torch.linalg.qr(U_new)
            qv, rv = torch.linalg.qr(V_new)
            S_new = ru @ torch.diag(sigma[:r_new]) @ rv.T
            glob_layers[n].set_factors(qu, S_new, qv)
        with torch.no_grad():
            for key, t in self.model.state_dict(keep_vars=True).items():
                if key not in self._factor_keys:
                    t.copy_(new_dense[key])

    def update(self, round_idx: int, rng: torch.Generator) -> RoundStats:
        r = self._current()
        self._round = None
        ranks = self.ranks()
        extra = {f"rank_pre/{n}": float(max(A.r + A.a, A.r + A.b)) for n, A in r.aug.items()}
        counts = self._count(r.aug, r.D, self.config.correction)
        extra.update({f"floats/{k}": float(v) for k, v in counts.items()})
        up = counts["up_phase1"] + counts["up_phase3"] + counts["up_phase5"]
        down = counts["down_phase1"] + counts["down_phase2"] + counts["down_phase3"]
        return RoundStats(
            train_loss=float(r.train_loss),
            floats_up=dict.fromkeys(r.client_ids, up),
            floats_down=dict.fromkeys(r.client_ids, down),
            ranks=ranks,
            extra=extra,
        )

    def ranks(self) -> dict[str, int]:
        layers = _layers(self.model, self.layer_names)
        return {n: int(layer.S.shape[0]) for n, layer in layers.items()}

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
        return _numel_float(self.effective_model().state_dict())

    # ---- state -------------------------------------------------------------------------------
    def client_effective(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        """Ũ S̃_c Ṽᵀ (the task's augmented bases, the reply's coefficients) per factorized
        layer and the client's non-factorized state, as a dense state_dict."""
        dense, factors, _ = _unpack(task.message, self.layer_names, self._factor_keys)
        state = {}
        for key, ref in self._template.state_dict().items():
            prefix, _, leaf = key.rpartition(".")
            if prefix in factors and leaf == "weight":
                U, _, V = factors[prefix]
                S = reply.tensors[f"{prefix}.S"]
                state[key] = (U @ S @ V.T).reshape(ref.shape).detach().clone()
            else:
                state[key] = reply.tensors[key].detach().clone()
        return state

    def effective_model(self) -> nn.Module:
        """A fresh dense copy of the original model with W = U S Vᵀ in each factorized layer."""
        dense = copy.deepcopy(self._template)
        fstate = self.model.state_dict()
        layers = _layers(self.model, self.layer_names)
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
        for n, layer in _layers(self.model, self.layer_names).items():
            layer.set_factors(tensors[f"{n}.U"], tensors[f"{n}.S"], tensors[f"{n}.V"])
        self.model.load_state_dict(tensors)


def _clipped(grads: tuple[Tensor | None, ...], max_norm: float) -> tuple[Tensor | None, ...]:
    """The gradients times min(1, c / (‖g‖₂ + 1e-6)), ‖g‖₂ over all of them together: what
    ``torch.nn.utils.clip_grad_norm_`` does to ``.grad`` (local_sgd's clipping)."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return tuple(None if g is None else g * coef for g in grads)


def check_config(config: TrainConfig) -> None:
    """What FeDLRT needs beyond the config's own checks (one line each)."""
    if config.momentum != 0.0 or config.weight_decay != 0.0:
        raise ValueError(
            "FeDLRT takes plain SGD steps on the coefficients (the variance correction "
            f"assumes it); set momentum=0 and weight_decay=0 (got {config.momentum}, "
            f"{config.weight_decay})"
        )


class FeDLRTClient(Client):
    """FeDLRT's client: the three phases of the module docstring.

    ``basis``: message = global model; reply ``<layer>.GU/.GS/.GV`` (step 1), metric
    ``loss``. ``correction``: message = augmented model; reply ``<layer>.GS`` = ∇_S̃ L_c
    (step 3, full correction). ``train``: message = augmented model (+ ``corr.<layer>``);
    reply ``<layer>.S`` = S̃_c and the client's non-factorized state (step 4), metric ``loss``
    (the mean of its mini-batch losses).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, task: Task) -> None:
        super().__init__(model, config, task)
        self.work = copy.deepcopy(model)
        self.layer_names = fedlrt_factorize(self.work, config)
        self._factor_keys = _factor_keys(self.layer_names)

    def __call__(
        self, task: ClientTask, data: ClientData, state: ClientState, rng: torch.Generator
    ) -> tuple[ClientReply, ClientState]:
        dense, factors, corr = _unpack(task.message, self.layer_names, self._factor_keys)
        if task.phase == "basis":
            loss, grads = self._basis_grads(dense, factors, data)
            return ClientReply(grads, {"loss": loss}), state
        if task.phase == "correction":
            coef = self._coef_grad(dense, factors, data)
            return ClientReply({f"{n}.GS": g for n, g in coef.items()}), state
        if task.phase == "train":
            s_out, dense_out, loss = self._train(dense, factors, corr, data, task.lr, rng)
            tensors = {**dense_out, **{f"{n}.S": s for n, s in s_out.items()}}
            return ClientReply(tensors, {"loss": loss}), state
        raise ValueError(f"FeDLRT phases are {FeDLRT.phases}, got {task.phase!r}")

    def _prepare(self, data: ClientData) -> tuple[Tensor, Tensor]:
        dtype = _layers(self.work, self.layer_names)[self.layer_names[0]].S.dtype
        x, y = data.inputs, data.targets
        if x.is_floating_point():
            x = x.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        return x, y

    def _load(self, dense: dict[str, Tensor], factors: Factors) -> nn.Module:
        """Load a message (dense state + factors) into the scratch client module."""
        work = self.work
        for name, layer in _layers(work, self.layer_names).items():
            layer.set_factors(*factors[name])
        with torch.no_grad():
            for key, t in work.state_dict(keep_vars=True).items():
                if key not in self._factor_keys:
                    t.copy_(dense[key])
        work.train()
        return work

    def _loss(self, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.task(self.task.forward(module, x), y)

    def _full_batch_grad(
        self, module: nn.Module, x: Tensor, y: Tensor, wrt: list[Tensor]
    ) -> tuple[float, list[Tensor]]:
        """Mean loss over the whole local set and its gradient w.r.t. ``wrt`` (chunked)."""
        n = x.shape[0]
        grads = [torch.zeros_like(t) for t in wrt]
        total = 0.0
        for start in range(0, n, _CHUNK):
            xb, yb = x[start : start + _CHUNK], y[start : start + _CHUNK]
            loss = self._loss(module, xb, yb)
            if xb.shape[0] != n:
                loss = loss * (xb.shape[0] / n)
            gs = torch.autograd.grad(loss, wrt, allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc.add_(g)
            total += float(loss.detach())
        return total, grads

    def _basis_grads(
        self, dense: dict[str, Tensor], factors: Factors, data: ClientData
    ) -> tuple[float, dict[str, Tensor]]:
        """Step 1: loss, ∇_U L_c, ∇_S L_c, ∇_V L_c at the global point, full local batch."""
        work = self._load(dense, factors)
        layers = _layers(work, self.layer_names)
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
        out = {}
        for i, n in enumerate(self.layer_names):
            out.update({f"{n}.GU": grads[3 * i], f"{n}.GS": grads[3 * i + 1],
                        f"{n}.GV": grads[3 * i + 2]})  # fmt: skip
        return loss, out

    def _coef_grad(
        self, dense: dict[str, Tensor], factors: Factors, data: ClientData
    ) -> dict[str, Tensor]:
        """Step 3 (full correction): ∇_S̃ L_c at the augmented start point, full local batch."""
        work = self._load(dense, factors)
        layers = _layers(work, self.layer_names)
        wrt = []
        for n in self.layer_names:
            layers[n].U.requires_grad_(False)
            layers[n].V.requires_grad_(False)
            wrt.append(layers[n].S)
        x, y = self._prepare(data)
        _, grads = self._full_batch_grad(work, x, y, wrt)
        return dict(zip(self.layer_names, grads))

    def _train(
        self,
        dense: dict[str, Tensor],
        factors: Factors,
        corrections: dict[str, Tensor] | None,
        data: ClientData,
        lr: float,
        generator: torch.Generator,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
        """Step 4: s* SGD steps on S̃ (+ correction) and on the non-factorized parameters.

        Returns the client's S̃_c per layer, its non-factorized state and the mean of its
        mini-batch losses (each before its step; the divergence check reads it).
        """
        work = self._load(dense, factors)
        layers = _layers(work, self.layer_names)
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
        total = 0.0
        for step, idx in enumerate(batches):
            # a batch holding every sample is the full local batch: skip the reordering
            xb, yb = (x, y) if idx.numel() == n else (x[idx], y[idx])
            loss = self._loss(work, xb, yb)
            total += float(loss.detach())
            if not bool(torch.isfinite(loss.detach())):
                value = float(loss.detach())
                raise NonFiniteError(
                    f"client {data.client_id} got a non-finite loss ({value}) at local step "
                    f"{step + 1} of {len(batches)}", client_id=data.client_id,
                )  # fmt: skip
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            if cfg.max_grad_norm > 0.0:
                grads = _clipped(grads, cfg.max_grad_norm)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    step = torch.zeros_like(p) if g is None else g
                    if corr is not None and i < len(coefs):
                        step = step + corr[i]
                    p.sub_(lr * step)
        s_out = {nm: layers[nm].S.detach().clone() for nm in self.layer_names}
        dense_out = {k: v.clone() for k, v in _dense_state(work, self._factor_keys).items()}
        return s_out, dense_out, total / len(batches)
