"""A drop-in for PyHessian's ``hessian`` object (Yao et al. 2020), backed by hessrank.

Same constructor and methods, same return shapes, so code written for PyHessian runs
unchanged; the products come from :class:`~hessrank.curvature.HessianOperator` (exact,
size-weighted over a dataloader's batches, the model never touched; a model wrapped in
``nn.DataParallel`` or ``DistributedDataParallel``, as in PyHessian's own example, is
unwrapped) and the estimators from :mod:`hessrank.linalg`: Lanczos with full
reorthogonalization instead of power iteration with deflation, stopped as soon as the
``top_n`` Ritz pairs have converged (residual ≤ ``tol`` · |λ_max|; PyHessian stops when an
eigenvalue changes by less than ``tol`` between iterations), SLQ from hessrank's
``spectral_density`` (PyHessian 0.1's ``density`` calls the removed ``torch.eig`` and raises
on current torch). Timings and accuracy against PyHessian: ``results/peers.md`` §3.

Example:
    >>> from hessrank.compat.pyhessian import hessian
    >>> comp = hessian(model, criterion, data=(x, y), cuda=False)   # doctest: +SKIP
    >>> top_eigenvalues, top_eigenvectors = comp.eigenvalues(top_n=2)  # doctest: +SKIP
    >>> np.mean(comp.trace())                                     # doctest: +SKIP
    >>> eigen_list_full, weight_list_full = comp.density()        # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from hessrank.curvature import HessianOperator
from hessrank.linalg import lanczos, spectral_density
from hessrank.linalg.operator import make_generator, random_block


class hessian:  # noqa: N801 - PyHessian's name, so that imports need only a new module path
    """PyHessian's ``hessian(model, criterion, data=(x, y) | dataloader=..., cuda=...)``.

    Args:
        model: the network (evaluated in eval mode, as PyHessian does; not modified).
        criterion: batch-mean loss ``criterion(outputs, targets)``.
        data: one (inputs, targets) batch; or ``dataloader``: an iterable of batches (the
            Hessian of the size-weighted mean loss over all of them).
        cuda: move the data to CUDA (the model must already be there).
        seed: seeds every random draw (PyHessian draws from torch's global generator).
    """

    def __init__(self, model: nn.Module, criterion, data=None, dataloader=None,
                 cuda: bool = True, seed: int = 0) -> None:
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) or dataloader=...")
        if cuda and not torch.cuda.is_available():
            raise ValueError("cuda=True but CUDA is not available; pass cuda=False")
        parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        if isinstance(model, parallel):  # the wrapper parallelizes; the Hessian is its module's
            model = model.module
        self.model, self.criterion = model, criterion
        self.full_dataset = dataloader is not None
        self.op = HessianOperator(model, criterion, dataloader if self.full_dataset else data)
        named = dict(model.named_parameters())
        self.params = [named[n] for n in self.op.param_names]
        self.seed = int(seed)

    def _per_param(self, v: Tensor) -> list[Tensor]:
        d = self.op.unflatten(v[:, None])
        return [d[n][0] for n in self.op.param_names]

    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1):
        """The ``top_n`` eigenvalues of largest magnitude and their eigenvectors.

        Returns (eigenvalues: list of floats, eigenvectors: list of lists of tensors shaped
        like the parameters). Lanczos stops once the ``top_n`` Ritz pairs have residual
        ‖Hv − λv‖ ≤ ``tol`` · |λ_max| (so each eigenvalue is within that of the truth, and in
        practice within its square over the gap), after at most ``maxIter`` steps (at least
        top_n + 1, at most p).
        """
        for name, value in (("maxIter", maxIter), ("top_n", top_n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        p = self.op.shape[1]
        steps = min(p, max(int(maxIter), top_n + 1))
        res = lanczos(self.op, k=top_n, which="LM", num_matvecs=steps, seed=self.seed, tol=tol,
                      until_converged=True)
        vals = [float(x) for x in res.eigenvalues[0]]
        vecs = [self._per_param(res.eigenvectors[0, :, i]) for i in range(top_n)]
        return vals, vecs

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:
        """Hutchinson samples vᵀHv (Rademacher v), stopping as PyHessian does: when the running
        mean changes by less than ``tol`` (relative) or after ``maxIter`` samples. The trace
        estimate is their mean."""
        if not isinstance(maxIter, int) or isinstance(maxIter, bool) or maxIter < 1:
            raise ValueError(f"maxIter must be a positive int, got {maxIter!r}")
        gen = make_generator(self.seed)
        p, samples, mean = self.op.shape[1], [], 0.0
        for _ in range(int(maxIter)):
            v = random_block((p, 1), gen, kind="rademacher", dtype=self.op.dtype,
                             device=self.op.device)
            samples.append(float((v * self.op.matmat(v)).sum()))
            if abs(np.mean(samples) - mean) / (mean + 1e-6) < tol:
                return samples
            mean = float(np.mean(samples))
        return samples

    def density(self, iter: int = 100, n_v: int = 1):  # noqa: A002 - PyHessian's argument
        """SLQ: ``n_v`` Lanczos runs of ``iter`` steps. Returns (eigen_list_full,
        weight_list_full): one list of nodes and one of weights (summing to 1) per run."""
        for name, value in (("iter", iter), ("n_v", n_v)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        steps = min(int(iter), self.op.shape[1])
        res = spectral_density(self.op, num_probes=int(n_v), lanczos_steps=steps,
                               seed=self.seed)
        nodes, weights = np.asarray(res.nodes)[0], np.asarray(res.weights)[0]
        return ([list(map(float, row)) for row in nodes],
                [list(map(float, row)) for row in weights])
