"""Fashion-MNIST, offline: from the user's IDX files or from Debian's ``dataset-fashion-mnist``.

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; © 2017 Zalando SE, MIT licence): 70,000 28×28
grey-scale images of 10 clothing classes in MNIST's format (60k train, 10k test, the same four IDX
file names as MNIST).

Resolution order (:func:`load_fashion_mnist`):

1. A user folder with the four IDX files (optionally ``.gz``): ``data_dir`` argument
   (``--data-dir`` on the CLI) or ``$MTOPT_FASHION_DATA``.
2. mtopt's cache (``$MTOPT_CACHE`` or ``~/.cache/mtopt``): ``fashion_mnist.npz`` (uint8), its
   sha256 recorded in ``fashion_mnist.npz.sha256`` and checked on every load (a damaged or
   unverified cache is moved aside and re-derived, see :mod:`mtopt.problems.cache`).
3. A system install of the Debian package: ``/usr/share/datasets/fashion-mnist``.
4. ``apt-get download dataset-fashion-mnist`` (no root needed) into ``<cache>/debs``, unpacked
   with ``dpkg-deb -x`` into a temporary folder.

Files from 3 and 4 are verified against the sha256 of each decompressed IDX file (Debian re-gzips
them, so the ``.gz`` bytes differ from upstream's while the contents are the same). A cached
``.deb`` that does not unpack or whose files do not match is moved aside and downloaded once more.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from mtopt.problems.cache import FetchFailedError, refetch_once
from mtopt.problems.mnist_data import (
    IDX_FILES,
    MnistArrays,
    _read_npz,
    _write_npz,
    load_by_resolution_order,
    read_idx_dir,
)

DEB_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"
#: sha256 of the decompressed IDX files (Debian 0.0~git20200523.55506a9-1 = upstream's data).
IDX_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CACHE_NAME = "fashion_mnist.npz"


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` holds the four IDX files (each plain or ``.gz``)."""
    return all(
        (folder / stem).exists() or (folder / f"{stem}.gz").exists() for stem in IDX_FILES.values()
    )


def load_fashion_mnist(
    data_dir: str | Path | None = None,
    cache: str | Path | None = None,
    download: bool = True,
    system_dir: Path = SYSTEM_DIR,
) -> MnistArrays:
    """Load Fashion-MNIST by the resolution order of the module docstring."""

    def produce(root: Path) -> MnistArrays | None:
        if has_idx_files(system_dir):
            return read_verified_idx_dir(system_dir)
        if not download:
            return None
        return refetch_once(
            lambda: download_fashion_deb(root), lambda deb: read_fashion_deb(deb, root), "fashion"
        )

    return load_by_resolution_order(
        data_dir,
        "MTOPT_FASHION_DATA",
        lambda folder: read_idx_dir(folder) if has_idx_files(folder) else None,
        cache,
        _CACHE_NAME,
        _read_npz,
        _write_npz,
        produce,
        lambda folder, npz: (
            f"Fashion-MNIST not found: no IDX files in {folder!s} or "
            f"{system_dir}, no cache at {npz}; run `mtopt data fetch fashion`"
        ),
        wanted="the four Fashion-MNIST IDX files (train-images-idx3-ubyte, ...; .gz or not)",
    )


def idx_sha256(folder: Path, stem: str) -> str:
    """sha256 of the decompressed content of ``folder/stem`` (or ``folder/stem.gz``)."""
    plain = folder / stem
    path, opener = (plain, open) if plain.exists() else (folder / f"{stem}.gz", gzip.open)
    digest = hashlib.sha256()
    with opener(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified_idx_dir(folder: Path) -> MnistArrays:
    """Read the IDX files after checking each one's sha256 against :data:`IDX_SHA256`."""
    for stem, expected in IDX_SHA256.items():
        actual = idx_sha256(folder, stem)
        if actual != expected:
            raise ValueError(f"{folder / stem}: sha256 {actual}, expected {expected}")
    return read_idx_dir(folder)


def download_fashion_deb(cache: Path) -> Path:
    """``apt-get download dataset-fashion-mnist`` into ``cache/debs``; returns the ``.deb``."""
    target = cache / "debs"
    pattern = f"{DEB_PACKAGE}_*_all.deb"
    existing = sorted(target.glob(pattern))
    if existing:
        return existing[-1]
    target.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["apt-get", "download", DEB_PACKAGE],
            cwd=target,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:  # no apt-get: not a Debian-based system
        raise FetchFailedError(_no_download_advice("apt-get is not available")) from exc
    found = sorted(target.glob(pattern))
    if proc.returncode != 0 or not found:
        said = " ".join(proc.stderr.split())[-300:]
        raise FetchFailedError(_no_download_advice(f"apt-get exit {proc.returncode}: {said}"))
    return found[-1]


def _no_download_advice(reason: str) -> str:
    return (
        f"could not download the Debian package {DEB_PACKAGE} ({reason}); run `apt-get update`, "
        "then: mtopt data fetch fashion; or put the four Fashion-MNIST IDX files in a folder and "
        "set $MTOPT_FASHION_DATA"
    )


def read_fashion_deb(deb: Path, scratch: Path) -> MnistArrays:
    """Unpack ``deb`` with ``dpkg-deb -x`` under ``scratch`` and read its verified IDX files;
    ``ValueError`` when it does not unpack or its files are missing or do not match."""
    if shutil.which("dpkg-deb") is None:
        raise FetchFailedError(
            f"{deb} cannot be unpacked: dpkg-deb is not available; put the four Fashion-MNIST "
            "IDX files in a folder and set $MTOPT_FASHION_DATA"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fashion-deb-", dir=scratch))
    try:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True)
        if proc.returncode != 0:
            said = " ".join(proc.stderr.decode(errors="replace").split())[-200:]
            raise ValueError(f"dpkg-deb -x failed (exit {proc.returncode}: {said})")
        if not has_idx_files(tmp / DEB_DATA_DIR):
            raise ValueError(f"no Fashion-MNIST IDX files under {DEB_DATA_DIR}")
        arrays = read_verified_idx_dir(tmp / DEB_DATA_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MnistArrays(
        train_images=arrays.train_images,
        train_labels=arrays.train_labels,
        test_images=arrays.test_images,
        test_labels=arrays.test_labels,
        source=f"Debian {deb.name} (IDX sha256 verified)",
    )
