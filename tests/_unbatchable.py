"""A model whose backward cannot be batched: the batched Jacobian pass fails on it, and the
engine's fall-back to K passes is tested with it (tests/core/test_gramian.py on the CPU,
tests/engine/test_devices.py on CUDA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class ReadsItem(torch.autograd.Function):
    """Identity whose backward reads a value on the host: no batching rule under vmap."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (1.0 + 0.0 * float(g.abs().max()))


def unbatchable(
    k: int, device: str | torch.device = "cpu"
) -> tuple[nn.Module, nn.ModuleList, Callable[[], list[Tensor]]]:
    """An encoder, k heads and their losses through :class:`ReadsItem`, on ``device``."""
    torch.manual_seed(0)
    enc, heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(k))
    x = torch.randn(8, 3).to(device)  # drawn on the CPU: the same batch on every device
    enc.to(device), heads.to(device)

    def losses():
        z = ReadsItem.apply(enc(x))
        return [h(z).pow(2).mean() for h in heads]

    return enc, heads, losses
