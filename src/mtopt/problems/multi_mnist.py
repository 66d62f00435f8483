"""Multi-MNIST (Sener & Koltun 2018; the variants of Gama & Grassi 2025, ``docs/protocol.md``).

Each image overlays two MNIST digits on a 36×36 canvas: the *left* digit (image ``i``) at
``[0:28, 0:28]`` and a *right* digit (a random image of the same split, indices drawn once from a
seed and saved beside the cache) at ``[6:34, 6:34]``; where they overlap the pixel-wise maximum
wins; the canvas is resized to 28×28 by nearest-neighbour sampling at pixel centres (the PIL /
``scipy.misc.imresize`` convention: source index ``⌊(i + ½)·36/28⌋``).

Splits: train = MNIST train[0:50k], val = train[50k:60k], test = MNIST test (10k).
Inputs and reconstruction targets (the original 28×28 left/right digits) are normalised with
mean 0.1307 and std 0.3081 (pixels scaled to [0, 1] first).

Tasks: ``CL``/``CR`` classify the left/right digit (NLL on log-softmax, accuracy ↑);
``RL``/``RR`` reconstruct the left/right digit (pixel MSE, MSE ↓).
Variants: ``cl_cr``, ``cl_rr`` (the SMTO screening problem of Gama & Grassi), ``rl_rr``.

Encoder (LeNet variant): conv 1→10 (5×5), max-pool 2, ReLU; conv 10→20 (5×5), dropout p,
max-pool 2, ReLU; flatten 320; FC 320→50; ReLU. Classification heads FC 50→50, ReLU, dropout p,
FC 50→10, log-softmax; reconstruction heads FC 50→256, ReLU, dropout p, FC 256→784 → 28×28.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtopt.errors import DataError
from mtopt.problems import cache as cache_files
from mtopt.problems.base import Batch, Metric, MultiTaskModel, Problem, Split, TaskSpec
from mtopt.problems.mnist_data import MnistArrays, cache_dir, load_mnist
from mtopt.problems.registry import register_problem

CANVAS = 36
LEFT_OFFSET = 0
RIGHT_OFFSET = 6
MEAN, STD = 0.1307, 0.3081
VARIANTS = {"cl_cr": ("CL", "CR"), "cl_rr": ("CL", "RR"), "rl_rr": ("RL", "RR")}
TRAIN_SIZE = 50_000
DEFAULT_RIGHT_SEED = 0
#: Nearest-neighbour source rows/cols for the 36 → 28 resize (pixel-centre convention).
RESIZE_INDEX = np.floor((np.arange(28) + 0.5) * CANVAS / 28).astype(np.int64)


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Compose uint8 ``(N, 28, 28)`` left/right digits into the 28×28 Multi-MNIST images."""
    if left.shape != right.shape or left.shape[1:] != (28, 28):
        raise ValueError(f"overlay needs two (N, 28, 28) stacks, got {left.shape}, {right.shape}")
    n = left.shape[0]
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=left.dtype)
    canvas[:, LEFT_OFFSET : LEFT_OFFSET + 28, LEFT_OFFSET : LEFT_OFFSET + 28] = left
    region = canvas[:, RIGHT_OFFSET : RIGHT_OFFSET + 28, RIGHT_OFFSET : RIGHT_OFFSET + 28]
    np.maximum(region, right, out=region)
    return canvas[:, RESIZE_INDEX][:, :, RESIZE_INDEX]


def right_indices(n: int, seed: int) -> np.ndarray:
    """The random right-digit partner of each of ``n`` images (same split), from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=n)


def _split_sources(mnist: MnistArrays) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "train": (mnist.train_images[:TRAIN_SIZE], mnist.train_labels[:TRAIN_SIZE]),
        "val": (mnist.train_images[TRAIN_SIZE:], mnist.train_labels[TRAIN_SIZE:]),
        "test": (mnist.test_images, mnist.test_labels),
    }


def saved_right_indices(n: int, split: str, seed: int, folder: Path | None) -> np.ndarray:
    """Right-digit indices for a split, drawn from ``seed`` and saved as text in ``folder``
    (re-read on later runs, so the pairs stay fixed even if the generator ever changed). A saved
    file whose sha256 does not match its sidecar is moved aside and redrawn; an intact one for
    another ``n`` is an error (the data changed)."""
    split_seed = seed * 1000 + {"train": 0, "val": 1, "test": 2}[split]
    if folder is None:
        return right_indices(n, split_seed)
    path = folder / f"right_indices_{split}_seed{seed}.txt"
    hit = cache_files.read_file(path, cache_files.load_int_column)
    if hit.value is not None:
        idx = hit.value
        if idx.shape == (n,) and idx.min() >= 0 and idx.max() < n:
            return idx
        raise DataError(f"{path} does not hold {n} indices in [0, {n}); delete it to redraw")
    idx = right_indices(n, split_seed)
    cache_files.discard_duplicate(hit, cache_files.save_int_column(path, idx))
    return idx


def _normalise_images(x: Tensor) -> Tensor:
    return (x.float().div_(255.0) - MEAN) / STD


def _prepare(batch: Batch) -> Batch:
    out = dict(batch)
    out["x"] = _normalise_images(batch["x"]).unsqueeze(1)
    for key in ("img_left", "img_right"):
        out[key] = _normalise_images(batch[key])
    return out


def _nll(pred: Tensor, target: Tensor) -> Tensor:
    return F.nll_loss(pred, target)


def _classification(name: str, label_key: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        loss=lambda pred, b: _nll(pred, b[label_key]),
        metrics=(
            Metric(
                "acc",
                lower_is_better=False,
                batch_sum=lambda pred, b: (pred.argmax(1) == b[label_key]).sum(),
            ),
        ),
        loss_type="classification",
    )


def _reconstruction(name: str, image_key: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        loss=lambda pred, b: F.mse_loss(pred, b[image_key]),
        metrics=(
            Metric(
                "mse",
                lower_is_better=True,
                batch_sum=lambda pred, b: (pred - b[image_key]).pow(2).mean(dim=(1, 2)).sum(),
            ),
        ),
        loss_type="regression",
    )


ALL_TASKS = {
    "CL": _classification("CL", "label_left"),
    "CR": _classification("CR", "label_right"),
    "RL": _reconstruction("RL", "img_left"),
    "RR": _reconstruction("RR", "img_right"),
}


class LeNetEncoder(nn.Module):
    """Sener & Koltun's MultiLeNet encoder with element-wise dropout (Gama & Grassi)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(320, 50)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.dropout(self.conv2(x)), 2))
        return F.relu(self.fc(x.flatten(1)))


class ClassificationHead(nn.Sequential):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(50, 50), nn.ReLU(), nn.Dropout(dropout), nn.Linear(50, 10), nn.LogSoftmax(1)
        )


class ReconstructionHead(nn.Sequential):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(50, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, 784),
            nn.Unflatten(1, (28, 28)),
        )


@register_problem("multi_mnist", VARIANTS)
class MultiMNIST(Problem):
    """One Multi-MNIST variant (``cl_cr``, ``cl_rr`` or ``rl_rr``)."""

    def __init__(
        self,
        variant: str = "cl_rr",
        data_dir: str | Path | None = None,
        right_seed: int = DEFAULT_RIGHT_SEED,
        mnist: MnistArrays | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown Multi-MNIST variant {variant!r}; valid: {sorted(VARIANTS)}")
        self.variant = variant
        self.name = f"multi_mnist/{variant}"
        self.tasks = tuple(ALL_TASKS[t] for t in VARIANTS[variant])
        self.data_dir = data_dir
        self.right_seed = right_seed
        self._mnist = mnist
        self._splits: dict[str, Split] | None = None

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            mnist = self._mnist if self._mnist is not None else load_mnist(self.data_dir)
            folder = None if self._mnist is not None else cache_dir() / "multi_mnist"
            self._splits = {
                name: build_split(images, labels, name, self.right_seed, folder)
                for name, (images, labels) in _split_sources(mnist).items()
            }
        return self._splits

    def make_model(
        self, tasks: Sequence[str] | None = None, dropout: float = 0.0
    ) -> MultiTaskModel:
        heads = {
            name: ClassificationHead(dropout)
            if self.task(name).loss_type == "classification"
            else ReconstructionHead(dropout)
            for name in self.model_tasks(tasks)
        }
        return MultiTaskModel(LeNetEncoder(dropout), heads)


def build_split(
    images: np.ndarray, labels: np.ndarray, split: str, seed: int, folder: Path | None
) -> Split:
    """Compose one split's Multi-MNIST images and keep everything every variant needs."""
    right = saved_right_indices(images.shape[0], split, seed, folder)
    composite = overlay(images, images[right])
    arrays = {
        "x": torch.from_numpy(composite),
        "label_left": torch.from_numpy(labels.astype(np.int64)),
        "label_right": torch.from_numpy(labels[right].astype(np.int64)),
        "img_left": torch.from_numpy(images),
        "img_right": torch.from_numpy(images[right]),
    }
    return Split(arrays, _prepare)
