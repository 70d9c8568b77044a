"""Data-parallel analysis under ``torchrun`` (docs/design.md, scale).

When ``WORLD_SIZE`` > 1 is in the environment (``torchrun --nproc-per-node R -m hessrank
analyze ...``), every rank runs the same analysis: the same units, the same seeds (so the
estimators draw the same probes), and every operator is built on the rank's shard of each
subject's data with ``process_group=`` so its products are all-reduced with exact size
weights, C v = Σ_r (N_r/N) C_r v. Rank r of R holds samples [⌊r·n/R⌋, ⌊(r+1)·n/R⌋) of a
subject with n samples (contiguous, possibly uneven slices). Only rank 0 reads and writes the
analysis directory; which units are computed is rank 0's decision, broadcast to the others.

The backend is gloo on CPU; with a CUDA ``device``, NCCL for CUDA tensors and gloo for the
CPU scalars (each rank on ``cuda:LOCAL_RANK``; :func:`backend_for`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hessrank.data.inputs import slice_inputs

__all__ = ["Ranks", "from_environment", "launched_world", "shard_bounds", "shard_pair"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel analysis.

    rank, world: this rank and the number of ranks. owned: this call initialised the process
    group (and destroys it at the end).
    """

    rank: int
    world: int
    owned: bool

    @property
    def writer(self) -> bool:
        """Rank 0 is the only one that touches the analysis directory."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def launched_world() -> int:
    """``WORLD_SIZE`` of the environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def from_environment(device: str) -> Ranks | None:
    """The ranks of a ``torchrun`` launch (None in a plain single process); initialises the
    default process group from the environment when nobody has yet."""
    world = launched_world()
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} but this torch {torch.__version__} has no "
                         "torch.distributed; run in one process")
    owned = not dist.is_initialized()
    if owned:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device))
    return Ranks(dist.get_rank(), dist.get_world_size(), owned)


def backend_for(device: str) -> str:
    """The process group's backend: gloo on CPU; with CUDA, NCCL for CUDA tensors (the
    products) *and* gloo for CPU tensors (the operators all-reduce sample counts, losses and
    strategy decisions as CPU scalars; an NCCL-only group refuses CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s slice of n samples."""
    return rank * n // world, (rank + 1) * n // world


def shard_pair(pair: tuple[Any, Tensor], rank: int, world: int,
               what: str = "a subject") -> tuple[Any, Tensor]:
    """Rank ``rank``'s contiguous slice of an (inputs, targets) pair (inputs any structure of
    :mod:`hessrank.data.inputs`). Raises ValueError on every rank alike when some rank's slice
    would be empty (n < world)."""
    x, y = pair
    n = int(y.shape[0])
    if n < world:
        raise ValueError(f"{what} has {n} samples, fewer than the {world} ranks: every rank "
                         "needs at least one; use fewer processes")
    a, b = shard_bounds(n, rank, world)
    return slice_inputs(x, a, b), y[a:b]
