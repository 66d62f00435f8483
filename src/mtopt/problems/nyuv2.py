"""NYUv2 (Silberman et al., ECCV 2012) in the preprocessed layout of the MTAN family.

Files (the ``.npy`` folders of Liu et al.'s MTAN, ``im2im_pred/create_dataset.py``, also used
by CAGrad, Nash-MTL, FAMO, Auto-λ; 795 train and 654 val images at 288×384)::

    <data_dir>/{train,val}/image/<i>.npy    RGB in [0, 1], (288, 384, 3)
    <data_dir>/{train,val}/label/<i>.npy    13-class segmentation, −1 = unlabelled, (288, 384)
    <data_dir>/{train,val}/depth/<i>.npy    depth (m), 0 = missing, (288, 384, 1)
    <data_dir>/{train,val}/normal/<i>.npy   unit surface normals, 0 = missing, (288, 384, 3)

with ``i = 0 … n−1``. MTAN stores channels last and moves them first when loading
(``np.moveaxis(x, -1, 0)``); channels-first arrays (``(3, H, W)``, ``(1, H, W)``) and 2-D depth
are accepted too. ``data_dir`` defaults to ``$MTOPT_NYUV2``. No Pillow needed.

Optional ``shape`` = (W, H) resizes once (image: bilinear with antialiasing; label, depth and
normals: nearest at pixel centres, so that missing values are not blended into valid ones and
normals stay unit vectors); resized arrays are cached as ``.npy`` under ``<cache>/nyuv2/`` (each
with its sha256 in a ``.sha256`` sidecar, checked on load; see :mod:`mtopt.problems.cache`).
Without ``shape`` the files are read as they are (no cache). Images are ImageNet-normalised per
batch (``imagenet_norm=True``, for the ImageNet-pretrained encoder; MTAN feeds [0, 1] images to
its SegNet). No augmentation (some MTAN-family repos use random scale-crops; not done here).

Tasks (losses and metrics: :mod:`mtopt.problems.dense_models`):

* ``S`` semantic segmentation, 13 classes, ignore −1; NLL; pixel accuracy ↑, mIoU ↑ (per-sample).
* ``D`` depth: L1 over pixels with depth > 0; L1-abs ↓ and L1-rel ↓ (MTAN's ``depth_error``).
* ``N`` surface normals: the head's output is L2-normalised; loss 1 − mean cosine over pixels
  with a non-zero true normal (MTAN's mask is ``Σ components ≠ 0``, the same for unit normals);
  metric: mean angular error in degrees ↓.

Splits: the ``val`` folder is the test split (as in the MTAN family, which has no separate
validation set); our *val* is carved from the ``train`` folder: ``RandomState(0)`` permutation,
the first ``int(0.9·n)`` (715) train, the remaining 80 val, both in permuted order.

Model: dilated ResNet (``encoder``, default ``r50`` as MTAN's ResNet variant) with DeepLab
heads (:func:`mtopt.problems.dense_models.dense_model`; not MTAN's SegNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtopt.problems.base import Batch
from mtopt.problems.dense_models import (
    DenseProblem,
    array_cache_folder,
    check_shape,
    data_dir_from,
    l1_task,
    load_arrays,
    normal_task,
    normalise_images,
    resize_nearest,
    save_arrays,
    segmentation_task,
)
from mtopt.problems.mnist_data import cache_dir
from mtopt.problems.registry import register_problem

CLASSES = 13
FOLDERS = {"image": 3, "label": 0, "depth": 1, "normal": 3}  # channels (0: a 2-D map)
TRAIN_FRACTION = 0.9
SPLIT_SEED = 0
CACHE_VERSION = 1

LAYOUT = """Expected the preprocessed NYUv2 layout of MTAN (lorenmt/mtan, im2im_pred):
  <data_dir>/{train,val}/image/<i>.npy   (288, 384, 3) RGB in [0, 1]
  <data_dir>/{train,val}/label/<i>.npy   (288, 384) classes 0..12, -1 = unlabelled
  <data_dir>/{train,val}/depth/<i>.npy   (288, 384, 1), 0 = missing
  <data_dir>/{train,val}/normal/<i>.npy  (288, 384, 3), 0 = missing
for i = 0..n-1. Pass data_dir=... or set $MTOPT_NYUV2."""


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir``, else ``$MTOPT_NYUV2``; a clear error naming the layout otherwise."""
    return data_dir_from(data_dir, "MTOPT_NYUV2", "NYUv2", LAYOUT)


def count_samples(folder: Path) -> int:
    """The number ``n`` of samples of a split folder; every ``<kind>/<i>.npy``, ``i < n``, must
    exist."""
    image_dir = folder / "image"
    n = len(list(image_dir.glob("*.npy"))) if image_dir.is_dir() else 0
    if n == 0:
        raise FileNotFoundError(f"no NYUv2 samples in {image_dir}. {LAYOUT}")
    for kind in FOLDERS:
        for i in range(n):
            if not (folder / kind / f"{i}.npy").is_file():
                raise FileNotFoundError(f"missing {folder / kind / f'{i}.npy'}. {LAYOUT}")
    return n


def channels_first(a: np.ndarray, channels: int) -> np.ndarray:
    """An array with ``channels`` channels, channels-last (MTAN) or -first, as ``(C, H, W)``;
    a 2-D array is one channel. ``channels = 0`` means a 2-D map, returned as it is."""
    if channels == 0:
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D map, got shape {a.shape}")
        return a
    if a.ndim == 2 and channels == 1:
        return a[None]
    if a.ndim == 3 and a.shape[-1] == channels:
        return np.moveaxis(a, -1, 0)
    if a.ndim == 3 and a.shape[0] == channels:
        return a
    raise ValueError(f"expected {channels} channels (first or last), got shape {a.shape}")


def read_sample(folder: Path, i: int, shape: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """Sample ``i`` as ``(C, H, W)`` float32 maps (label: ``(H, W)`` int8), resized if
    ``shape``."""
    out = {}
    for kind, channels in FOLDERS.items():
        a = channels_first(np.load(folder / kind / f"{i}.npy", allow_pickle=False), channels)
        if shape is not None and a.shape[-2:] != (shape[1], shape[0]):
            a = _resize_image(a, shape) if kind == "image" else resize_nearest(a, shape)
        out[kind] = a.astype(np.float32)
    out["label"] = _labels(out["label"], folder / "label" / f"{i}.npy")
    return out


def _resize_image(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).unsqueeze(0)
    size = (shape[1], shape[0])
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[
        0
    ].numpy()


def _labels(label: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isin(label, np.arange(-1, CLASSES))):
        raise ValueError(f"{path}: labels must be integers in -1..{CLASSES - 1}")
    return label.astype(np.int8)


def load_nyuv2_split(
    data_dir: str | Path | None,
    split: str,
    shape: Sequence[int] | None = None,
    cache: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Stacked arrays of a folder (``train`` or ``val``): ``image`` ``(N, 3, H, W)``, ``label``
    ``(N, H, W)`` int8, ``depth`` ``(N, 1, H, W)``, ``normal`` ``(N, 3, H, W)``; resized arrays
    are cached."""
    folder = resolve_data_dir(data_dir) / split
    n = count_samples(folder)
    size = None if shape is None else check_shape(shape)
    cached = None
    if size is not None:
        root = Path(cache) if cache else cache_dir()
        key = [CACHE_VERSION, str(folder.resolve()), n, list(size)]
        cached = array_cache_folder(root, "nyuv2", split, size, key)
        arrays = load_arrays(cached, list(FOLDERS), "done")
        if arrays is not None:
            return arrays
    samples = [read_sample(folder, i, size) for i in range(n)]
    arrays = {kind: np.stack([s[kind] for s in samples]) for kind in FOLDERS}
    if cached is not None:
        save_arrays(cached, arrays, "done", f"{n}\n")
    return arrays


@register_problem("nyuv2")
class NYUv2(DenseProblem):
    """NYUv2 with tasks ``S`` (13 classes), ``D`` (depth) and ``N`` (normals); see the module
    docstring. ``width``/``head_channels`` shrink the model (``dense_models.SMALL``)."""

    train_fraction = TRAIN_FRACTION
    split_seed = SPLIT_SEED

    def __init__(
        self,
        data_dir: str | Path | None = None,
        shape: Sequence[int] | None = None,
        encoder: str = "r50",
        pretrained: str | Path | bool | None = None,
        width: int = 64,
        head_channels: int = 256,
        encoder_dropout: float = 0.0,
        imagenet_norm: bool = True,
        cache: str | Path | None = None,
    ) -> None:
        self.name = "nyuv2"
        self.tasks = (segmentation_task("S"), l1_task("D", relative=True), normal_task("N"))
        self._model_options(
            data_dir=data_dir,
            encoder=encoder,
            pretrained=pretrained,
            width=width,
            head_channels=head_channels,
            encoder_dropout=encoder_dropout,
            cache=cache,
        )
        self.shape = None if shape is None else check_shape(shape)
        self.imagenet_norm = imagenet_norm
        self._image_size: tuple[int, int] | None = None  # (H, W) of the loaded data

    def _prepare(self, batch: Batch, train: bool) -> Batch:
        out = dict(batch)
        x = batch["x"].float()
        out["x"] = normalise_images(x, scale=1.0) if self.imagenet_norm else x
        out["S"] = batch["S"].long()
        return out

    def _arrays(self, split: str) -> dict[str, Tensor]:
        raw = load_nyuv2_split(self.data_dir, split, self.shape, self.cache)
        self._image_size = (int(raw["image"].shape[2]), int(raw["image"].shape[3]))
        return {
            "x": torch.from_numpy(raw["image"]),
            "S": torch.from_numpy(raw["label"]),
            "D": torch.from_numpy(raw["depth"]),
            "N": torch.from_numpy(raw["normal"]),
        }

    def head_outputs(self) -> dict[str, tuple[int, str]]:
        return {"S": (CLASSES, "log_softmax"), "D": (1, "none"), "N": (3, "normalize")}

    def out_size(self) -> tuple[int, int]:
        """(H, W) of the model's outputs: ``shape``, else that of the first training image."""
        if self.shape is not None:
            return self.shape[1], self.shape[0]
        if self._image_size is None:
            first = resolve_data_dir(self.data_dir) / "train" / "image" / "0.npy"
            if not first.is_file():
                raise FileNotFoundError(f"missing {first}. {LAYOUT}")
            image = channels_first(
                np.load(first, mmap_mode="r", allow_pickle=False), FOLDERS["image"]
            )
            self._image_size = (int(image.shape[1]), int(image.shape[2]))
        return self._image_size
