"""Cityscapes (Cordts et al., CVPR 2016) in Gama & Grassi's configuration.

Files (the official layout, from ``leftImg8bit_trainvaltest.zip``, ``gtFine_trainvaltest.zip``
and ``disparity_trainvaltest.zip``)::

    <data_dir>/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png     8-bit RGB
    <data_dir>/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png      8-bit label IDs
    <data_dir>/gtFine/{train,val}/<city>/<stem>_gtFine_instanceIds.png   16-bit instance IDs
    <data_dir>/disparity/{train,val}/<city>/<stem>_disparity.png         16-bit raw disparity

``data_dir`` defaults to ``$MTOPT_CITYSCAPES``. Reading needs Pillow (imported lazily).

Preprocessing (once; the arrays are cached as ``.npy`` under ``<cache>/cityscapes/``, each with
its sha256 in a ``.sha256`` sidecar, checked on load; see :mod:`mtopt.problems.cache`):

* every map is resized to ``shape`` = (W, H) (default 256×128): the image bilinearly (Pillow's
  antialiased ``BILINEAR``, as the reference), label IDs, instance IDs and raw disparity by
  nearest neighbour at pixel centres (source index ``⌊(i + ½)·H₀/H⌋``, exact integer arithmetic;
  Pillow's ``NEAREST`` can round the other way at exact ties and the reference's OpenCV
  ``INTER_NEAREST`` takes ``⌊i·H₀/H⌋``, so single target pixels may come from a neighbouring
  source pixel compared to the reference's files);
* disparity in pixels of the resized image: ``(raw − 1) / (256 · 2048 / W)`` where ``raw > 0``;
  ``raw = 0`` (no measurement) is stored as 0 and, as in the reference loss ("non-zero
  target"), every pixel with disparity 0 is invalid (which also drops ``raw = 1``, disparity 0,
  where L1-rel would divide by zero);
* images are ImageNet-normalised per batch (stored as uint8).

Tasks (``S``, ``D``, ``I``): see :mod:`mtopt.problems.dense_models` for losses and metrics.

* ``S`` semantic segmentation: the 19 official train IDs or the 7 categories (flat,
  construction, object, nature, sky, human, vehicle), ignore index −1. Table below from
  ``cityscapesScripts/helpers/labels.py`` (Cordts et al.). Labels with ``ignoreInEval`` (void,
  parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) are −1 in both,
  as in the official category evaluation and in the reference (``categoryTrainId``). Metrics:
  pixel accuracy ↑ and mIoU ↑ (per-sample, see :mod:`~mtopt.problems.dense_models`).
* ``D`` disparity: masked L1 loss; metrics L1-abs ↓ and L1-rel ↓.
* ``I`` instance: per pixel of a "thing" (a label with instances that is not ignored: person,
  rider, car, truck, bus, train, motorcycle, bicycle; instance ID ≠ 0), the offset
  ``(Δy, Δx) = (y − ȳ, x − x̄)`` between the pixel and the centroid of its instance, in pixels
  of the resized image (the sign of Sener & Koltun's and the reference code; a model learns
  whichever sign it is given and L1 is the same). As in the reference, a "group" region (an
  instance ID equal to the label ID, e.g. a crowd of cars) counts as one instance. Offsets are
  computed per batch, after augmentation, from the stored instance map. Masked L1 loss over both
  channels of the valid pixels; metric L1-abs ↓.

Splits (reproducing the reference's ``generate_split``): the official train images,
sorted by ``<city>/<file>``, are permuted by ``numpy.random.RandomState(0).permutation``; the
first ``int(0.8·n)`` are *train* (2380), the rest *val* (595), both in that permuted order (so
``subset(n)`` is a random sample); *test* is the official val split (500), sorted.

Augmentation (train split only, on by default, as in the paper): a random rotation, uniform in
±10°, and a horizontal flip with probability ½, drawn per sample from torch's global generator
(seeded by the trainer). Rotated-out pixels become invalid (label −1, disparity 0, no
instance), as in the reference.

Model: :func:`mtopt.problems.dense_models.dense_model` (dilated ResNet-18/50, DeepLab heads).
ImageNet weights: ``pretrained=<torchvision state-dict file>``, or ``$MTOPT_RESNET18_WEIGHTS`` /
``$MTOPT_RESNET50_WEIGHTS`` when ``pretrained`` is None and ``width`` is 64.

Variants: ``sd7``, ``sd19``, ``sdi7``, ``sdi19`` (tasks, then the number of classes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtopt.problems.base import Batch, TaskSpec
from mtopt.problems.dense_models import (
    DenseProblem,
    array_cache_folder,
    check_shape,
    data_dir_from,
    l1_task,
    load_arrays,
    normalise_images,
    resize_nearest,
    save_arrays,
    segmentation_task,
)
from mtopt.problems.mnist_data import cache_dir
from mtopt.problems.registry import register_problem

# name, labelId, trainId, category, hasInstances, ignoreInEval (cityscapesScripts labels.py;
# "license plate" has labelId −1 and never appears in the label images).
LABELS: tuple[tuple[str, int, int, str, bool, bool], ...] = (
    ("unlabeled", 0, -1, "void", False, True),
    ("ego vehicle", 1, -1, "void", False, True),
    ("rectification border", 2, -1, "void", False, True),
    ("out of roi", 3, -1, "void", False, True),
    ("static", 4, -1, "void", False, True),
    ("dynamic", 5, -1, "void", False, True),
    ("ground", 6, -1, "void", False, True),
    ("road", 7, 0, "flat", False, False),
    ("sidewalk", 8, 1, "flat", False, False),
    ("parking", 9, -1, "flat", False, True),
    ("rail track", 10, -1, "flat", False, True),
    ("building", 11, 2, "construction", False, False),
    ("wall", 12, 3, "construction", False, False),
    ("fence", 13, 4, "construction", False, False),
    ("guard rail", 14, -1, "construction", False, True),
    ("bridge", 15, -1, "construction", False, True),
    ("tunnel", 16, -1, "construction", False, True),
    ("pole", 17, 5, "object", False, False),
    ("polegroup", 18, -1, "object", False, True),
    ("traffic light", 19, 6, "object", False, False),
    ("traffic sign", 20, 7, "object", False, False),
    ("vegetation", 21, 8, "nature", False, False),
    ("terrain", 22, 9, "nature", False, False),
    ("sky", 23, 10, "sky", False, False),
    ("person", 24, 11, "human", True, False),
    ("rider", 25, 12, "human", True, False),
    ("car", 26, 13, "vehicle", True, False),
    ("truck", 27, 14, "vehicle", True, False),
    ("bus", 28, 15, "vehicle", True, False),
    ("caravan", 29, -1, "vehicle", True, True),
    ("trailer", 30, -1, "vehicle", True, True),
    ("train", 31, 16, "vehicle", True, False),
    ("motorcycle", 32, 17, "vehicle", True, False),
    ("bicycle", 33, 18, "vehicle", True, False),
)
#: The 7 categories in category-ID order (category ID − 1 = the class index).
CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
#: The 19 classes in train-ID order.
CLASSES_19 = tuple(name for name, _, tid, *_ in sorted(LABELS, key=lambda r: r[2]) if tid >= 0)
VARIANTS = {
    "sd7": (("S", "D"), 7),
    "sd19": (("S", "D"), 19),
    "sdi7": (("S", "D", "I"), 7),
    "sdi19": (("S", "D", "I"), 19),
}
DEFAULT_SHAPE = (256, 128)
ORIGINAL_WIDTH = 2048  # raw disparity is in 1/256 pixels of the 2048-wide images
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0
MAX_ANGLE = 10.0
FLIP_P = 0.5
CACHE_VERSION = 1
FIELDS = ("image", "label_ids", "instance", "disparity")

LAYOUT = """Expected the official Cityscapes layout:
  <data_dir>/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
  <data_dir>/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png
  <data_dir>/gtFine/{train,val}/<city>/<stem>_gtFine_instanceIds.png
  <data_dir>/disparity/{train,val}/<city>/<stem>_disparity.png
(leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip and disparity_trainvaltest.zip from
https://www.cityscapes-dataset.com/downloads/). Pass data_dir=... or set $MTOPT_CITYSCAPES."""


def label_lookup(classes: int) -> np.ndarray:
    """labelId (0..255) → train ID (``classes=19``) or category index (``classes=7``); −1 for
    void, ignored-in-eval and unknown IDs."""
    if classes not in (7, 19):
        raise ValueError(f"classes must be 7 or 19, got {classes}")
    table = np.full(256, -1, dtype=np.int8)
    for _, label_id, train_id, category, _, ignored in LABELS:
        if not ignored:
            table[label_id] = train_id if classes == 19 else CATEGORIES.index(category)
    return table


def thing_lookup() -> np.ndarray:
    """labelId → whether its pixels carry instance targets (has instances, not ignored)."""
    table = np.zeros(256, dtype=bool)
    for _, label_id, _, _, has_instances, ignored in LABELS:
        table[label_id] = has_instances and not ignored
    return table


def disparity_from_raw(raw: np.ndarray, width: int) -> np.ndarray:
    """Raw 16-bit disparity → disparity in pixels of a ``width``-wide image; 0 where raw = 0."""
    raw = raw.astype(np.float64)
    scale = 256.0 * ORIGINAL_WIDTH / width
    return np.where(raw > 0, (raw - 1.0) / scale, 0.0).astype(np.float32)


def relabel_instances(label_ids: np.ndarray, instance_ids: np.ndarray) -> np.ndarray:
    """``int16`` map: 0 where there is no instance target, else 1..K, one per distinct instance
    ID among the "thing" pixels (groups included, module docstring)."""
    thing = thing_lookup()[label_ids] & (instance_ids > 0)
    out = np.zeros(label_ids.shape, dtype=np.int16)
    if thing.any():
        _, inverse = np.unique(instance_ids[thing], return_inverse=True)
        if inverse.max() >= np.iinfo(np.int16).max:
            raise ValueError("more instances in one image than int16 holds")
        out[thing] = inverse.reshape(-1) + 1
    return out


def instance_offsets(instance: Tensor) -> Tensor:
    """``(N, H, W)`` instance maps (0 = none) → ``(N, 2, H, W)`` offsets ``(y − ȳ, x − x̄)`` to
    each pixel's instance centroid, 0 where there is no instance."""
    n, h, w = instance.shape
    inst, dev = instance.long(), instance.device
    k = int(inst.max()) + 1 if inst.numel() else 1
    key = (torch.arange(n, device=dev).view(n, 1, 1) * k + inst).reshape(-1)
    ys = torch.arange(h, dtype=torch.float64, device=dev).view(1, h, 1).expand(n, h, w)
    xs = torch.arange(w, dtype=torch.float64, device=dev).view(1, 1, w).expand(n, h, w)
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    count = torch.bincount(key, minlength=n * k).double().clamp_min(1.0)
    cy = torch.bincount(key, weights=ys, minlength=n * k) / count
    cx = torch.bincount(key, weights=xs, minlength=n * k) / count
    offsets = torch.stack([ys - cy[key], xs - cx[key]]).view(2, n, h, w).transpose(0, 1)
    valid = (inst > 0).unsqueeze(1)
    return torch.where(valid, offsets, torch.zeros_like(offsets)).float()


# --------------------------------------------------------------------------------------------
# Files and the cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleFiles:
    """The four files of one Cityscapes frame; ``name`` is ``<city>/<stem>``."""

    name: str
    image: Path
    label_ids: Path
    instance_ids: Path
    disparity: Path


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir``, else ``$MTOPT_CITYSCAPES``; a clear error naming the layout otherwise."""
    return data_dir_from(data_dir, "MTOPT_CITYSCAPES", "Cityscapes", LAYOUT)


def find_samples(data_dir: Path, split: str) -> list[SampleFiles]:
    """The frames of an official split (``train`` or ``val``), sorted by ``<city>/<stem>``."""
    images = sorted((data_dir / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(
            f"no Cityscapes images in {data_dir / 'leftImg8bit' / split}. {LAYOUT}"
        )
    samples = []
    for image in images:
        city, stem = image.parent.name, image.name.removesuffix("_leftImg8bit.png")
        gt = data_dir / "gtFine" / split / city
        sample = SampleFiles(
            name=f"{city}/{stem}",
            image=image,
            label_ids=gt / f"{stem}_gtFine_labelIds.png",
            instance_ids=gt / f"{stem}_gtFine_instanceIds.png",
            disparity=data_dir / "disparity" / split / city / f"{stem}_disparity.png",
        )
        targets = (sample.label_ids, sample.instance_ids, sample.disparity)
        missing = [p for p in targets if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing {missing[0]} (for {image}). {LAYOUT}")
        samples.append(sample)
    return samples


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image  # lazily: only needed to build the cache

    with Image.open(path) as im:
        return np.asarray(im)


def _read_image(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if rgb.size != shape:
            rgb = rgb.resize(shape, Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def read_sample(sample: SampleFiles, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """One frame resized to ``shape``: image ``(3, H, W)`` uint8, label IDs ``(H, W)`` uint8,
    relabelled instances ``(H, W)`` int16, disparity ``(H, W)`` float32 (module docstring)."""
    label_ids = resize_nearest(_read_png(sample.label_ids), shape).astype(np.int64)
    instance_ids = resize_nearest(_read_png(sample.instance_ids), shape).astype(np.int64)
    raw = resize_nearest(_read_png(sample.disparity), shape).astype(np.int64)
    if label_ids.min() < 0 or label_ids.max() > 255:
        raise ValueError(f"{sample.label_ids}: label IDs outside 0..255")
    return {
        "image": _read_image(sample.image, shape).transpose(2, 0, 1),
        "label_ids": label_ids.astype(np.uint8),
        "instance": relabel_instances(label_ids, instance_ids),
        "disparity": disparity_from_raw(raw, shape[0]),
    }


def _cache_folder(
    root: Path, data_dir: Path, split: str, shape: tuple[int, int], names: list[str]
) -> Path:
    key = [CACHE_VERSION, str(data_dir.resolve()), split, list(shape), names]
    return array_cache_folder(root, "cityscapes", split, shape, key)


def load_official_split(
    data_dir: str | Path | None,
    split: str,
    shape: Sequence[int] = DEFAULT_SHAPE,
    cache: str | Path | None = None,
    workers: int | None = None,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Frame names and stacked arrays (see :func:`read_sample`) of an official split, from the
    cache (``cache`` or mtopt's cache folder) or read, resized and cached on first use."""
    root = resolve_data_dir(data_dir)
    size = check_shape(shape)
    samples = find_samples(root, split)
    names = [s.name for s in samples]
    folder = _cache_folder(Path(cache) if cache else cache_dir(), root, split, size, names)
    cached = load_arrays(folder, FIELDS, "names.txt")
    if cached is not None:
        return names, cached
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        frames = list(pool.map(lambda s: read_sample(s, size), samples))
    arrays = {f: np.stack([frame[f] for frame in frames]) for f in FIELDS}
    save_arrays(folder, arrays, "names.txt", "\n".join(names) + "\n")
    return names, arrays


# --------------------------------------------------------------------------------------------
# Batches and augmentation
# --------------------------------------------------------------------------------------------


def random_affine(n: int, max_angle: float = MAX_ANGLE, flip_p: float = FLIP_P) -> Tensor:
    """``(n, 3)`` rows ``(angle in radians, flip ±1, 0)`` drawn from torch's global generator."""
    angle = (torch.rand(n) * 2 - 1) * math.radians(max_angle)
    flip = torch.where(torch.rand(n) < flip_p, -1.0, 1.0)
    return torch.stack([angle, flip, torch.zeros(n)], 1)


def affine_theta(params: Tensor, height: int, width: int) -> Tensor:
    """``affine_grid`` matrices: flip then rotate about the centre, in pixel geometry (the
    normalised coordinates are corrected for the aspect ratio)."""
    angle, flip = params[:, 0], params[:, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(params.shape[0], 2, 3, device=params.device)
    theta[:, 0, 0] = flip * cos
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = flip * sin * width / height
    theta[:, 1, 1] = cos
    return theta


def warp(x: Tensor, theta: Tensor, mode: str) -> Tensor:
    """Resample ``(N, C, H, W)`` floats; outside the image: 0."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def augment(batch: Batch, params: Tensor | None = None) -> Batch:
    """Rotate and flip every map of a prepared-but-raw batch (``x`` normalised float, ``S``,
    ``D``, ``instance``) with per-sample ``params`` (:func:`random_affine` if None)."""
    n, _, h, w = batch["x"].shape
    params = random_affine(n) if params is None else params
    theta = affine_theta(params.to(batch["x"].device), h, w)
    out = dict(batch)
    out["x"] = warp(batch["x"], theta, "bilinear")
    if "S" in batch:  # shift by one so that the zero padding becomes −1
        out["S"] = warp((batch["S"] + 1).unsqueeze(1).float(), theta, "nearest")[:, 0]
        out["S"] = out["S"].round().long() - 1
    if "D" in batch:
        out["D"] = warp(batch["D"], theta, "nearest")
    if "instance" in batch:
        inst = batch["instance"].unsqueeze(1).float()
        out["instance"] = warp(inst, theta, "nearest")[:, 0].round().long()
    return out


def prepare_batch(batch: Batch, augment_params: Tensor | None = None, train: bool = False) -> Batch:
    """Stored arrays → model inputs and targets: ``x`` normalised, ``S`` int64, ``D``
    ``(N, 1, H, W)``, and from ``instance`` the targets ``I`` ``(N, 2, H, W)`` and ``I_valid``
    ``(N, 1, H, W)``. ``train`` applies :func:`augment` (with ``augment_params`` if given)."""
    out = dict(batch)
    out["x"] = normalise_images(batch["x"])
    if "S" in batch:
        out["S"] = batch["S"].long()
    if train:
        out = augment(out, augment_params)
    if "instance" in out:
        instance = out.pop("instance")
        out["I"] = instance_offsets(instance)
        out["I_valid"] = (instance > 0).unsqueeze(1)
    return out


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


def _task_spec(name: str) -> TaskSpec:
    if name == "S":
        return segmentation_task("S")
    return l1_task(name, relative=name == "D")


@register_problem("cityscapes", VARIANTS)
class Cityscapes(DenseProblem):
    """One Cityscapes variant (``sd7``, ``sd19``, ``sdi7``, ``sdi19``); see the module
    docstring. ``width``/``head_channels`` shrink the model (``dense_models.SMALL``)."""

    train_fraction = TRAIN_FRACTION
    split_seed = SPLIT_SEED

    def __init__(
        self,
        variant: str = "sdi7",
        data_dir: str | Path | None = None,
        shape: Sequence[int] = DEFAULT_SHAPE,
        encoder: str = "r18",
        pretrained: str | Path | bool | None = None,
        width: int = 64,
        head_channels: int = 256,
        encoder_dropout: float = 0.0,
        augment: bool = True,
        cache: str | Path | None = None,
        workers: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown Cityscapes variant {variant!r}; valid: {sorted(VARIANTS)}")
        self.variant = variant
        self.name = f"cityscapes/{variant}"
        task_names, self.classes = VARIANTS[variant]
        self.tasks = tuple(_task_spec(t) for t in task_names)
        self._model_options(
            data_dir=data_dir,
            encoder=encoder,
            pretrained=pretrained,
            width=width,
            head_channels=head_channels,
            encoder_dropout=encoder_dropout,
            cache=cache,
        )
        self.shape = check_shape(shape)
        self.augment = augment
        self.workers = workers

    def _arrays(self, split: str) -> dict[str, Tensor]:
        _, raw = load_official_split(self.data_dir, split, self.shape, self.cache, self.workers)
        arrays = {"x": torch.from_numpy(raw["image"])}
        labels = label_lookup(self.classes)[raw["label_ids"]]
        arrays["S"] = torch.from_numpy(labels)
        arrays["D"] = torch.from_numpy(raw["disparity"]).unsqueeze(1)
        if "I" in self.task_names:
            arrays["instance"] = torch.from_numpy(raw["instance"])
        return arrays

    def _prepare(self, batch: Batch, train: bool) -> Batch:
        return prepare_batch(batch, train=train and self.augment)

    def head_outputs(self) -> dict[str, tuple[int, str]]:
        return {"S": (self.classes, "log_softmax"), "D": (1, "none"), "I": (2, "none")}

    def out_size(self) -> tuple[int, int]:
        w, h = self.shape
        return h, w
