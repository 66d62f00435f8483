"""``torchrun --nproc-per-node N -m mtopt train ...``: one run trained by N processes.

Every rank draws the same shuffled global batches (the run's seed) and trains on its own
contiguous part of each (:func:`shard`, the distributed sampler: rank ``r`` of ``W`` takes rows
``[r·n/W, (r+1)·n/W)``), and the ``MultiTaskOptimizer`` works in the process group
(:mod:`mtopt.engine.distributed`): every rank applies the full batch's update. The run store is
rank 0's (:class:`RankZeroStore`): what it finds or claims is broadcast so every rank trains the
same runs in the same order, and only rank 0 writes a record. Dropout draws from
``seed + rank`` on each rank so the parts of a batch get independent masks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from mtopt.experiments.database import ClaimLostError


def launched() -> bool:
    """Started by ``torchrun`` (or another launcher that sets ``WORLD_SIZE``) with > 1 rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[int, int]:
    """Join the launcher's process group for a run on ``device`` (``nccl`` for a CUDA device,
    ``gloo`` for the CPU, whose tensors ``nccl`` cannot carry, also on a machine with GPUs);
    ``(rank, world)``."""
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This rank's contiguous part of a batch (every tensor value sliced along dim 0)."""
    if world == 1:
        return batch
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"a batch's tensors have different lengths {sorted(sizes)}")
    (n,) = sizes
    if n % world:
        raise ValueError(
            f"a batch of {n} cannot be split evenly over {world} processes: choose a batch size "
            f"(and a training-set size) divisible by {world}"
        )
    part = slice(rank * n // world, (rank + 1) * n // world)
    return {k: v[part] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankZeroStore:
    """The run store as every rank sees it: rank 0's answers, broadcast (module doc)."""

    def __init__(self, store: Any | None) -> None:
        self.rank = dist.get_rank()
        self.store = store if self.rank == 0 else None

    def get(self, key: str) -> Any:
        return _broadcast(self.store.get(key) if self.store is not None else None)

    def claim(self, key: str) -> Any:
        return _broadcast(self.store.claim(key) if self.store is not None else None)

    def put(self, result: dict[str, Any]) -> None:
        """Rank 0 stores; a record its store refuses (the claim was lost,
        :class:`~mtopt.experiments.database.ClaimLostError`) is refused on every rank, so that
        all go on waiting for the new owner's record together."""
        lost = None
        if self.store is not None:
            try:
                self.store.put(result)
            except ClaimLostError as exc:
                lost = str(exc)
        lost = _broadcast(lost)
        if lost is not None:
            raise ClaimLostError(lost)

    def holds(self, key: str) -> Any:
        return _broadcast(self.store.holds(key) if self.store is not None else None)

    def release(self, key: str) -> None:
        if self.store is not None:
            self.store.release(key)

    def checkpoint_path(self, key: str) -> None:
        """None: the ranks of a process group take no epoch checkpoints
        (:func:`mtopt.experiments.train.train_run`)."""
