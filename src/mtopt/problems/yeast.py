"""Yeast: 14-label gene-function classification, each label one task.

Data (Elisseeff & Weston 2002, the MULAN version; OpenML 40597): 2,417 yeast genes, 103 real
features (micro-array expression and phylogenetic profiles), 14 binary functional-category labels.
The file is a CSV with the header ``Att1,…,Att103,Class1,…,Class14`` and labels ``0``/``1``.

Resolution order (:func:`load_yeast`):

1. A user folder holding ``yeast.csv`` or ``yeast.csv.gz`` in that format: ``data_dir``
   argument (``--data-dir`` on the CLI) or ``$MTOPT_YEAST_DATA``.
2. mtopt's cache (``$MTOPT_CACHE`` or ``~/.cache/mtopt``): ``yeast.npz``, written on first fetch
   with its sha256 in ``yeast.npz.sha256`` and checked on every load (a damaged or unverified
   cache is moved aside and re-derived, see :mod:`mtopt.problems.cache`).
3. The PyPI wheel ``river==0.26.1`` (BSD-3-Clause), fetched with ``pip download --no-deps`` for a
   fixed platform tag (the same file on every host; river is never installed or imported). Its
   member ``river/datasets/yeast.csv.gz`` is read with :mod:`zipfile` and its sha256 verified; a
   cached wheel whose member does not match is moved aside and downloaded once more.

Split: a permutation of the rows drawn from ``split_seed`` (default 0) and saved as text beside
the cache (``yeast/permutation_seed0.txt``, sha256 in its ``.sha256`` sidecar; a damaged file is
moved aside and redrawn); its first 60 % is train, the next 20 % val, the last 20 % test
(1,451 / 483 / 483 genes). The file encodes no train/test split. Features are standardised with
the mean and standard deviation of the train split only.

Tasks ``y1``…``y14`` (= ``Class1``…``Class14``): binary cross-entropy on one logit; metrics
``acc`` ↑ (logit > 0) and ``bce`` ↓ (per-sample log loss, a proper score that stays informative
for the rare labels: ``y14`` has 34 positives). F1 and AUROC are dataset-level, not per-sample sums,
so they do not fit :class:`~mtopt.problems.base.Metric`.

Model: MLP encoder 103→256→128 (ReLU, dropout p after the first layer) and one Linear 128→1 head
per task, returning logits of shape ``(N,)``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtopt.errors import DataError
from mtopt.problems import cache as cache_files
from mtopt.problems.base import Batch, Metric, MultiTaskModel, Problem, Split, TaskSpec
from mtopt.problems.cache import CacheFile
from mtopt.problems.mnist_data import cache_dir, load_by_resolution_order
from mtopt.problems.pypi import download_wheel
from mtopt.problems.registry import register_problem

RIVER_VERSION = "0.26.1"
RIVER_REQUIREMENT = f"river=={RIVER_VERSION}"
#: One fixed wheel of river 0.26.1 (only its data member is read, so any platform's would do).
RIVER_WHEEL = f"river-{RIVER_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
RIVER_MEMBER = "river/datasets/yeast.csv.gz"
RIVER_MEMBER_SHA256 = "2969cb4bab877a27adcbe17871fa0b378a1e54b98816cd6106b542ee450a1c09"
N_FEATURES = 103
N_LABELS = 14
FEATURE_NAMES = tuple(f"Att{i}" for i in range(1, N_FEATURES + 1))
LABEL_NAMES = tuple(f"Class{i}" for i in range(1, N_LABELS + 1))
TASK_NAMES = tuple(f"y{i}" for i in range(1, N_LABELS + 1))
VAL_FRACTION = TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0
HIDDEN = (256, 128)
_CACHE_NAME = "yeast.npz"
_FILE_NAMES = ("yeast.csv", "yeast.csv.gz")


@dataclass(frozen=True)
class YeastArrays:
    """Raw Yeast: float32 features ``(N, 103)`` and uint8 labels ``(N, 14)``, in file order.
    ``cache_file``: the verified cache file they were read from or written to, if any."""

    features: np.ndarray
    labels: np.ndarray
    source: str
    cache_file: CacheFile | None = field(default=None, compare=False)

    def validate(self) -> None:
        n = self.features.shape[0]
        if self.features.dtype != np.float32 or self.features.shape != (n, N_FEATURES):
            raise ValueError(f"Yeast features must be float32 (N, 103), got {self.features.shape}")
        if not np.isfinite(self.features).all():
            raise ValueError("Yeast features hold non-finite values")
        if self.labels.dtype != np.uint8 or self.labels.shape != (n, N_LABELS):
            raise ValueError(f"Yeast labels must be uint8 (N, 14), got {self.labels.shape}")
        if self.labels.max(initial=0) > 1:
            raise ValueError("Yeast labels must be 0 or 1")


# ----------------------------------------------------------------------------------- loading


def parse_yeast_csv(text: str, source: str) -> YeastArrays:
    """Parse the CSV (header ``Att1..Att103,Class1..Class14``, then one row per gene)."""
    header, _, body = text.partition("\n")
    columns = tuple(c.strip() for c in header.strip().split(","))
    if columns != FEATURE_NAMES + LABEL_NAMES:
        raise ValueError(f"{source}: header is not Att1..Att103,Class1..Class14: {columns[:4]}…")
    try:
        values = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:  # ragged rows or a non-number: numpy's message names the line
        expected = len(columns)
        raise ValueError(f"{source}: not a table of {expected} numbers per row ({exc})") from None
    if values.shape[1] != len(columns):
        raise ValueError(f"{source}: rows have {values.shape[1]} values, expected {len(columns)}")
    labels = values[:, N_FEATURES:]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"{source}: labels must be 0 or 1")
    arrays = YeastArrays(
        features=values[:, :N_FEATURES].astype(np.float32),
        labels=labels.astype(np.uint8),
        source=source,
    )
    arrays.validate()
    return arrays


def read_yeast_file(path: Path) -> YeastArrays:
    """Read ``yeast.csv`` or ``yeast.csv.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return parse_yeast_csv(fh.read(), f"{path}")


def _user_file(folder: Path) -> Path | None:
    for name in _FILE_NAMES:
        if (folder / name).exists():
            return folder / name
    return None


def load_yeast(
    data_dir: str | Path | None = None, cache: str | Path | None = None, download: bool = True
) -> YeastArrays:
    """Load Yeast by the resolution order of the module docstring."""

    def read_user(folder: Path) -> YeastArrays | None:
        path = _user_file(folder)
        return None if path is None else read_yeast_file(path)

    return load_by_resolution_order(
        data_dir,
        "MTOPT_YEAST_DATA",
        read_user,
        cache,
        _CACHE_NAME,
        _read_npz,
        _write_npz,
        lambda root: read_river_wheel(download_river(root)) if download else None,
        lambda folder, npz: (
            f"Yeast not found: no yeast.csv(.gz) in {folder!s} and no cache at "
            f"{npz}; run `mtopt data fetch yeast`"
        ),
        wanted="yeast.csv or yeast.csv.gz",
    )


def download_river(cache: Path) -> Path:
    """``pip download --no-deps river==0.26.1`` (one fixed wheel) into ``cache/wheels``."""
    platform = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]
    platform += ["--implementation", "cp", "--abi", "cp311"]
    return download_wheel(
        RIVER_REQUIREMENT,
        cache,
        RIVER_WHEEL,
        "Alternatively put yeast.csv(.gz) in a folder and set $MTOPT_YEAST_DATA to it.",
        extra=platform,
        members={RIVER_MEMBER: RIVER_MEMBER_SHA256},
        dataset="yeast",
    )


def read_river_wheel(wheel: Path) -> YeastArrays:
    """Read and verify ``river/datasets/yeast.csv.gz`` inside the river wheel."""
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(RIVER_MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != RIVER_MEMBER_SHA256:
        raise ValueError(
            f"{wheel.name}:{RIVER_MEMBER} has sha256 {digest}, expected {RIVER_MEMBER_SHA256}"
        )
    text = gzip.decompress(blob).decode("utf-8")
    return parse_yeast_csv(text, f"{RIVER_REQUIREMENT} ({RIVER_MEMBER}, sha256 {digest[:12]}…)")


def _write_npz(path: Path, arrays: YeastArrays) -> CacheFile:
    """Cache the arrays as a compressed ``.npz``, atomically, with its sha256 recorded."""
    return cache_files.write_file(
        path,
        lambda fh: np.savez_compressed(
            fh, features=arrays.features, labels=arrays.labels, source=np.array(arrays.source)
        ),
    )


def _read_npz(path: Path) -> YeastArrays:
    """Read a cache written by :func:`_write_npz` (no pickles; checked by ``validate``)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = YeastArrays(
            features=z["features"],
            labels=z["labels"],
            source=f"{z['source']} (cached at {path})",
        )
    arrays.validate()
    return arrays


# ------------------------------------------------------------------------ splits and scaling


def split_sizes(n: int) -> dict[str, int]:
    """Train/val/test sizes: val and test ``round(0.2 n)`` each, train the rest."""
    n_val, n_test = round(VAL_FRACTION * n), round(TEST_FRACTION * n)
    if n - n_val - n_test < 1 or n_val < 1 or n_test < 1:
        raise ValueError(f"{n} rows are too few for a train/val/test split")
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def saved_permutation(n: int, seed: int, folder: Path | None) -> np.ndarray:
    """A permutation of ``n`` rows from ``seed``, saved as text in ``folder`` (re-read on later
    runs, so the split stays fixed even if numpy's generator ever changed). A saved file whose
    sha256 does not match its sidecar is moved aside and redrawn; an intact one for another
    ``n`` is an error (the data changed)."""
    if folder is None:
        return np.random.default_rng(seed).permutation(n)
    path = folder / f"permutation_seed{seed}.txt"
    hit = cache_files.read_file(path, cache_files.load_int_column)
    if hit.value is not None:
        if np.array_equal(np.sort(hit.value), np.arange(n)):
            return hit.value
        raise DataError(f"{path} is not a permutation of {n} rows; delete it to redraw")
    perm = np.random.default_rng(seed).permutation(n)
    cache_files.discard_duplicate(hit, cache_files.save_int_column(path, perm))
    return perm


def split_indices(n: int, seed: int, folder: Path | None) -> dict[str, np.ndarray]:
    """Row indices of train, val and test: consecutive blocks of the saved permutation."""
    perm = saved_permutation(n, seed, folder)
    sizes = split_sizes(n)
    bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
    return {name: perm[bounds[i] : bounds[i + 1]] for i, name in enumerate(sizes)}


def standardiser(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the train features (a constant feature gets std 1)."""
    mean = train.astype(np.float64).mean(axis=0)
    std = train.astype(np.float64).std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def build_splits(arrays: YeastArrays, seed: int, folder: Path | None) -> dict[str, Split]:
    """Split the rows and standardise every split's features with the train statistics."""
    indices = split_indices(arrays.features.shape[0], seed, folder)
    mean, std = standardiser(arrays.features[indices["train"]])
    splits = {}
    for name, idx in indices.items():
        x = (arrays.features[idx].astype(np.float64) - mean) / std
        tensors = {
            "x": torch.from_numpy(x.astype(np.float32)),
            "y": torch.from_numpy(arrays.labels[idx].astype(np.float32)),
        }
        splits[name] = Split(tensors, _identity)
    return splits


def _identity(batch: Batch) -> Batch:
    return batch


# ------------------------------------------------------------------------- tasks and model


def _binary_task(name: str, column: int) -> TaskSpec:
    def target(b: Batch) -> Tensor:
        return b["y"][:, column]

    return TaskSpec(
        name=name,
        loss=lambda pred, b: F.binary_cross_entropy_with_logits(pred, target(b)),
        metrics=(
            Metric(
                "acc",
                lower_is_better=False,
                batch_sum=lambda pred, b: ((pred > 0) == (target(b) > 0.5)).sum(),
            ),
            Metric(
                "bce",
                lower_is_better=True,
                batch_sum=lambda pred, b: F.binary_cross_entropy_with_logits(
                    pred, target(b), reduction="sum"
                ),
            ),
        ),
        loss_type="classification",
    )


ALL_TASKS = tuple(_binary_task(name, k) for k, name in enumerate(TASK_NAMES))


class MLPEncoder(nn.Sequential):
    """103 → 256 → 128 with ReLU; dropout p after the first hidden layer."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(N_FEATURES, HIDDEN[0]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            nn.ReLU(),
        )


class LogitHead(nn.Linear):
    """Linear 128 → 1, returning the logits as ``(N,)``."""

    def __init__(self) -> None:
        super().__init__(HIDDEN[1], 1)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z).squeeze(-1)


@register_problem("yeast")
class Yeast(Problem):
    """Yeast with one binary task per label (``y1``…``y14``)."""

    name = "yeast"
    tasks = ALL_TASKS

    def __init__(
        self,
        data_dir: str | Path | None = None,
        split_seed: int = DEFAULT_SPLIT_SEED,
        data: YeastArrays | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.split_seed = split_seed
        self._data = data
        self._splits: dict[str, Split] | None = None

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            data = self._data if self._data is not None else load_yeast(self.data_dir)
            folder = None if self._data is not None else cache_dir() / "yeast"
            self._splits = build_splits(data, self.split_seed, folder)
        return self._splits

    def make_model(
        self, tasks: Sequence[str] | None = None, dropout: float = 0.0
    ) -> MultiTaskModel:
        names = self.model_tasks(tasks)
        return MultiTaskModel(MLPEncoder(dropout), {name: LogitHead() for name in names})
