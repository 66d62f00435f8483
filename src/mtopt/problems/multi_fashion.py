"""Multi-Fashion and Multi-(Fashion+MNIST): Multi-MNIST's construction with Fashion-MNIST items.

The images are built exactly as in :mod:`mtopt.problems.multi_mnist` (its :func:`overlay` and
:func:`saved_right_indices` are reused): the *left* image ``i`` of a split at ``[0:28, 0:28]`` of a
36×36 canvas, a *right* image (a random index of the same split of the right data set, drawn once
from a seed and saved beside the cache) at ``[6:34, 6:34]``, the pixel-wise maximum where they
overlap, nearest-neighbour resize to 28×28.

Problems (two classification tasks, ``CL``/``CR``: classify the left/right item, NLL on
log-softmax, accuracy ↑):

* ``multi_fashion/cl_cr``: Fashion-MNIST item left, Fashion-MNIST item right.
* ``multi_fashion_mnist/cl_cr``: MNIST digit left, Fashion-MNIST item right.

Splits (both data sets have 60k train and 10k test images): train = train[0:50k],
val = train[50k:60k], test = the test set. Inputs (pixels scaled to [0, 1]) are normalised with the
mean and standard deviation of the composite train images of each problem (right seed 0), fixed
below. Model: the Multi-MNIST LeNet encoder and classification heads.

Data: Fashion-MNIST (© Zalando SE, MIT) via :mod:`mtopt.problems.fashion_data`; MNIST
(LeCun, Cortes & Burges, CC BY-SA 3.0) via :mod:`mtopt.problems.mnist_data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtopt.problems.base import Batch, MultiTaskModel, Problem, Split
from mtopt.problems.fashion_data import load_fashion_mnist
from mtopt.problems.mnist_data import MnistArrays, cache_dir, load_mnist
from mtopt.problems.multi_mnist import (
    ALL_TASKS,
    DEFAULT_RIGHT_SEED,
    TRAIN_SIZE,
    ClassificationHead,
    LeNetEncoder,
    overlay,
    saved_right_indices,
)
from mtopt.problems.registry import register_problem

VARIANTS = {"cl_cr": ("CL", "CR")}
#: Mean and std of the composite train inputs (pixels in [0, 1], right seed 0) per family.
NORMALISATION = {
    "multi_fashion": (0.2883, 0.3644),
    "multi_fashion_mnist": (0.2273, 0.3552),
}

Sources = dict[str, tuple[np.ndarray, np.ndarray]]


def split_sources(arrays: MnistArrays) -> Sources:
    """``{split: (images, labels)}``: train[0:50k], train[50k:], test."""
    return {
        "train": (arrays.train_images[:TRAIN_SIZE], arrays.train_labels[:TRAIN_SIZE]),
        "val": (arrays.train_images[TRAIN_SIZE:], arrays.train_labels[TRAIN_SIZE:]),
        "test": (arrays.test_images, arrays.test_labels),
    }


def build_pair_split(
    left: tuple[np.ndarray, np.ndarray],
    right: tuple[np.ndarray, np.ndarray],
    split: str,
    seed: int,
    folder: Path | None,
    normalisation: tuple[float, float],
) -> Split:
    """Overlay the left images with randomly drawn right images of the same split."""
    (left_images, left_labels), (right_images, right_labels) = left, right
    n = left_images.shape[0]
    if right_images.shape[0] != n:
        raise ValueError(f"{split}: {n} left but {right_images.shape[0]} right images")
    idx = saved_right_indices(n, split, seed, folder)
    arrays = {
        "x": torch.from_numpy(overlay(left_images, right_images[idx])),
        "label_left": torch.from_numpy(left_labels.astype(np.int64)),
        "label_right": torch.from_numpy(right_labels[idx].astype(np.int64)),
    }
    return Split(arrays, partial(_prepare, mean=normalisation[0], std=normalisation[1]))


def _prepare(batch: Batch, mean: float, std: float) -> Batch:
    out = dict(batch)
    out["x"] = _normalise(batch["x"], mean, std).unsqueeze(1)
    return out


def _normalise(x: Tensor, mean: float, std: float) -> Tensor:
    return (x.float().div_(255.0) - mean) / std


@register_problem("multi_fashion", VARIANTS)
class MultiFashion(Problem):
    """Multi-Fashion: a Fashion-MNIST item left and one right (variant ``cl_cr``).

    ``data_dir``: a folder with the Fashion-MNIST IDX files (else ``$MTOPT_FASHION_DATA``, the
    cache or Debian's package); ``fashion``/``mnist``: arrays to use instead (tests).
    """

    family = "multi_fashion"

    def __init__(
        self,
        variant: str = "cl_cr",
        data_dir: str | Path | None = None,
        right_seed: int = DEFAULT_RIGHT_SEED,
        fashion: MnistArrays | None = None,
        mnist: MnistArrays | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown {self.family} variant {variant!r}; valid: {sorted(VARIANTS)}"
            )
        self.variant = variant
        self.name = f"{self.family}/{variant}"
        self.tasks = tuple(ALL_TASKS[t] for t in VARIANTS[variant])
        self.data_dir = data_dir
        self.right_seed = right_seed
        self._fashion = fashion
        self._mnist = mnist
        self._splits: dict[str, Split] | None = None

    def _fashion_arrays(self) -> MnistArrays:
        return self._fashion if self._fashion is not None else load_fashion_mnist(self.data_dir)

    def _left_arrays(self) -> MnistArrays:
        return self._fashion_arrays()

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            injected = self._fashion is not None or self._mnist is not None
            folder = None if injected else cache_dir() / self.family
            left = split_sources(self._left_arrays())
            right = split_sources(self._fashion_arrays())
            self._splits = {
                name: build_pair_split(
                    left[name],
                    right[name],
                    name,
                    self.right_seed,
                    folder,
                    NORMALISATION[self.family],
                )
                for name in left
            }
        return self._splits

    def make_model(
        self, tasks: Sequence[str] | None = None, dropout: float = 0.0
    ) -> MultiTaskModel:
        names = self.model_tasks(tasks)
        heads = {name: ClassificationHead(dropout) for name in names}
        return MultiTaskModel(LeNetEncoder(dropout), heads)


@register_problem("multi_fashion_mnist", VARIANTS)
class MultiFashionMNIST(MultiFashion):
    """Multi-(Fashion+MNIST): an MNIST digit left and a Fashion-MNIST item right.

    ``data_dir`` is the Fashion-MNIST folder as in :class:`MultiFashion`; ``mnist_dir`` a folder
    with the MNIST IDX files (else ``$MTOPT_DATA`` or the cache, see :mod:`mnist_data`).
    """

    family = "multi_fashion_mnist"

    def __init__(
        self,
        variant: str = "cl_cr",
        data_dir: str | Path | None = None,
        right_seed: int = DEFAULT_RIGHT_SEED,
        fashion: MnistArrays | None = None,
        mnist: MnistArrays | None = None,
        mnist_dir: str | Path | None = None,
    ) -> None:
        super().__init__(variant, data_dir, right_seed, fashion, mnist)
        self.mnist_dir = mnist_dir

    def _left_arrays(self) -> MnistArrays:
        return self._mnist if self._mnist is not None else load_mnist(self.mnist_dir)
