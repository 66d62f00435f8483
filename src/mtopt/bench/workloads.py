"""The workloads of ``mtopt bench``: a model shape, a random batch and the task losses.

Three synthetic workloads (random data, no data set needed):

* ``lenet``: the Multi-MNIST LeNet encoder with a classification head (10-class NLL) and a
  reconstruction head (784-pixel MSE), K = 2, input ``(256, 1, 28, 28)``;
* ``mlp11``: an MLP encoder 40 → 256 → 256 → 64 (ReLU) with 11 regression heads
  ``Linear(64, 1)`` (MSE), batch 128: the QM9-MLP shape;
* ``resnet3``: a small ResNet encoder (stem conv 3→32 at stride 2, three residual blocks at
  32/64/64 channels, batch norm) with three dense heads (7-class segmentation NLL, depth L1,
  surface normals 1 − cos) upsampled to the input size, input ``(8, 3, 64, 64)``.

Every model is a :class:`BenchModel`: a shared ``encoder`` and one head per task, so that every
contender (:mod:`mtopt.bench.contenders`) can find the shared parameters the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtopt.problems.multi_mnist import ClassificationHead, LeNetEncoder, ReconstructionHead

__all__ = [
    "MLP_TASKS",
    "WORKLOADS",
    "Batch",
    "BenchModel",
    "LossFn",
    "ResidualBlock",
    "Workload",
    "forward",
    "get_workload",
]

WORKLOADS = ("lenet", "mlp11", "resnet3")


class BenchModel(nn.Module):
    """A shared encoder and one head per task."""

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)


Batch = dict[str, Tensor]
LossFn = Callable[[Tensor, Batch], Tensor]


@dataclass(frozen=True)
class Workload:
    """A model shape, a random batch and the task losses.

    Attributes:
        name: the workload's name (``--workloads``).
        description: one line for the report.
        task_names: the K tasks.
        loss_types: one loss type per task (for methods whose rule depends on it).
        build: a fresh model (parameters drawn from torch's global generator).
        make_batch: a random batch from a ``torch.Generator`` (on the CPU).
        losses: one function ``(head output, batch) → scalar loss`` per task.
    """

    name: str
    description: str
    task_names: tuple[str, ...]
    loss_types: tuple[str, ...]
    build: Callable[[], BenchModel]
    make_batch: Callable[[torch.Generator], Batch]
    losses: tuple[LossFn, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


def _nll(out: Tensor, batch: Batch) -> Tensor:
    return F.nll_loss(out, batch["label"])


def _mse_image(out: Tensor, batch: Batch) -> Tensor:
    return F.mse_loss(out, batch["image"])


def _lenet() -> Workload:
    def build() -> BenchModel:
        return BenchModel(LeNetEncoder(), [ClassificationHead(), ReconstructionHead()])

    def make_batch(gen: torch.Generator) -> Batch:
        return {
            "x": torch.randn(256, 1, 28, 28, generator=gen),
            "label": torch.randint(0, 10, (256,), generator=gen),
            "image": torch.randn(256, 28, 28, generator=gen),
        }

    return Workload(
        name="lenet",
        description="Multi-MNIST LeNet encoder, CL (10-class NLL) + RR (784-pixel MSE) heads, "
        "input (256, 1, 28, 28), K = 2",
        task_names=("CL", "RR"),
        loss_types=("classification", "regression"),
        build=build,
        make_batch=make_batch,
        losses=(_nll, _mse_image),
    )


MLP_TASKS = 11


def _mlp_loss(k: int) -> LossFn:
    def loss(out: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(out.squeeze(1), batch["y"][:, k])

    return loss


def _mlp11() -> Workload:
    def build() -> BenchModel:
        encoder = nn.Sequential(
            nn.Linear(40, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 64),
            nn.ReLU(),
        )
        return BenchModel(encoder, [nn.Linear(64, 1) for _ in range(MLP_TASKS)])

    def make_batch(gen: torch.Generator) -> Batch:
        return {
            "x": torch.randn(128, 40, generator=gen),
            "y": torch.randn(128, MLP_TASKS, generator=gen),
        }

    return Workload(
        name="mlp11",
        description="MLP encoder 40→256→256→64 (ReLU), 11 Linear(64, 1) regression heads (MSE), "
        "batch 128, K = 11 (the QM9-MLP shape)",
        task_names=tuple(f"t{k}" for k in range(MLP_TASKS)),
        loss_types=("regression",) * MLP_TASKS,
        build=build,
        make_batch=make_batch,
        losses=tuple(_mlp_loss(k) for k in range(MLP_TASKS)),
    )


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _dense_head(channels: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, outputs, 1),
        nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
    )


def _segmentation(out: Tensor, batch: Batch) -> Tensor:
    return F.nll_loss(F.log_softmax(out, dim=1), batch["seg"])


def _depth(out: Tensor, batch: Batch) -> Tensor:
    return F.l1_loss(out, batch["depth"])


def _normals(out: Tensor, batch: Batch) -> Tensor:
    return (1.0 - (F.normalize(out, dim=1) * batch["normals"]).sum(dim=1)).mean()


def _resnet3() -> Workload:
    def build() -> BenchModel:
        encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            ResidualBlock(32, 32),
            ResidualBlock(32, 64, stride=2),
            ResidualBlock(64, 64),
        )
        return BenchModel(encoder, [_dense_head(64, 7), _dense_head(64, 1), _dense_head(64, 3)])

    def make_batch(gen: torch.Generator) -> Batch:
        return {
            "x": torch.randn(8, 3, 64, 64, generator=gen),
            "seg": torch.randint(0, 7, (8, 64, 64), generator=gen),
            "depth": torch.rand(8, 1, 64, 64, generator=gen),
            "normals": F.normalize(torch.randn(8, 3, 64, 64, generator=gen), dim=1),
        }

    return Workload(
        name="resnet3",
        description="ResNet encoder (stem 3→32 /2, residual blocks 32, 64 /2, 64; batch norm; "
        "features 64×16×16), heads segmentation (7-class NLL), depth (L1), normals (1 − cos) "
        "upsampled to 64×64, input (8, 3, 64, 64), K = 3",
        task_names=("seg", "depth", "normals"),
        loss_types=("classification", "l1", "regression"),
        build=build,
        make_batch=make_batch,
        losses=(_segmentation, _depth, _normals),
    )


_WORKLOAD_FACTORIES: dict[str, Callable[[], Workload]] = {
    "lenet": _lenet,
    "mlp11": _mlp11,
    "resnet3": _resnet3,
}


def get_workload(name: str) -> Workload:
    """The workload called ``name`` (one of :data:`WORKLOADS`)."""
    try:
        return _WORKLOAD_FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}") from None


def forward(
    model: BenchModel,
    workload: Workload,
    batch: Batch,
    head_input: Callable[[Tensor, int], Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The shared features ``z`` and the K task losses; head ``k`` sees ``head_input(z, k)``."""
    z = model.encoder(batch["x"])
    losses = []
    for k, (head, loss_fn) in enumerate(zip(model.heads, workload.losses, strict=True)):
        losses.append(loss_fn(head(z if head_input is None else head_input(z, k)), batch))
    return z, losses
