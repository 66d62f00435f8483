"""Verified cache files: atomic writes that record a sha256, checked before every read.

Every file mtopt writes into its cache (``$MTOPT_CACHE`` or ``~/.cache/mtopt``) goes through
:func:`write_file` and is read back through :func:`read_file`: the ``.npz`` data caches (MNIST,
Fashion-MNIST, QM9, Yeast), the saved permutations and right-digit indices, the QM9 descriptors,
the resized Cityscapes and NYUv2 arrays and their completion markers. Downloaded files (wheels,
Debian packages) are checked against their pinned digests by their modules and, when damaged,
fetched once more through :func:`refetch_once`.

Format
------
Beside each file ``<name>`` a sidecar ``<name>.sha256`` holds one line in ``sha256sum``'s
format, ``<64 hex digits>  <name>``, the sha256 of the file's bytes, so
``cd <folder> && sha256sum -c <name>.sha256`` checks it by hand.

Writing: the content goes to a hidden temporary file in the same folder, is flushed and fsynced,
hashed, and renamed over ``<name>`` (atomic on POSIX); the sidecar is then written the same way.
A killed run leaves the old pair, or the new file with an old or missing sidecar, which the next
read treats as damaged; never a half-written file under the real name.

Reading: the file's sha256 is computed and compared with the sidecar before the reader sees it;
then the reader runs (``np.load(..., allow_pickle=False)`` plus the data's own checks). The file
is *moved aside*, never deleted, and the read reports a miss, so that the caller falls through to
its next source (re-derive from the wheel, the Debian package, the original images; redraw from
the seed):

* ``<name>.corrupt-<UTC time>`` when its sha256 differs from the recorded one (edited, cut short,
  a bad disk), when the sidecar is malformed, or when the reader fails (empty, truncated, not an
  array file, pickled objects, a failed data check);
* ``<name>.unverified-<UTC time>`` when it has no sidecar: written by an mtopt from before digests
  were recorded. Such a file cannot be told apart from one edited afterwards (labels shifted by
  one still pass every shape and range check), and every cache file is derived from a source mtopt
  verifies and can read again, so it is re-derived rather than trusted.

The sidecar moves along as ``<moved name>.sha256`` (the digest the file should have had). Each
move is logged as a warning (logger ``mtopt.problems.cache``) naming both paths. Once the caller
has derived the file again, a moved file that is byte for byte the new one (typically an
unverified file from an older mtopt that was right after all) is removed by
:func:`discard_duplicate`: it holds nothing the new file does not.

When no source can replace a file, the caller raises :class:`DataUnavailableError`, a one-line
message naming the file and ending in ``run: mtopt data fetch NAME``.

Two processes writing the same cache file at once can pair one's file with the other's sidecar;
the next read then sees a mismatch, moves the file aside and derives it once more.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import secrets
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import numpy as np

from mtopt.errors import DataError, MtoptError

T = TypeVar("T")
log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
#: What a reader raises on a damaged file (``np.load`` on an empty file: ``EOFError``; on a cut
#: zip: ``BadZipFile``; on random bytes: ``ValueError`` about pickles; a missing npz member:
#: ``KeyError``; a bad gzip stream: ``OSError``). ``PermissionError`` and mtopt's own errors
#: (:class:`~mtopt.errors.MtoptError`, e.g. a tool that is not installed) are not damage.
DAMAGE = (
    ValueError,
    EOFError,
    KeyError,
    IndexError,
    zipfile.BadZipFile,
    zlib.error,
    pickle.UnpicklingError,
    OSError,
)


class DataUnavailableError(DataError, FileNotFoundError):
    """No source can provide a data set or cache file (missing, or damaged and not
    replaceable); the message names the file and the ``mtopt data fetch`` command."""


class FetchFailedError(DataError, RuntimeError):
    """A download (pip, apt-get) failed; the message says why and what to do instead."""


@dataclass(frozen=True)
class CacheFile:
    """A cache file whose bytes matched its recorded sha256 (at write or at read)."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class Lookup(Generic[T]):
    """What :func:`read_file` found at ``path``: ``value`` and ``file`` on a verified hit; on a
    miss both are ``None`` and, when a damaged or unverified file was moved aside, ``moved`` is
    where it went and ``reason`` says why."""

    path: Path
    value: T | None = None
    file: CacheFile | None = None
    moved: Path | None = None
    reason: str | None = None

    def note(self) -> str:
        """``"<path>: <reason>; moved to <moved>; "`` to start an error message, or ``""``."""
        if self.moved is None:
            return ""
        return f"{self.path}: {self.reason}; moved to {self.moved}; "


def fetch_command(dataset: str) -> str:
    """The command that (re)creates a data set's cache: ``mtopt data fetch <dataset>``."""
    return f"mtopt data fetch {dataset}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    """``<name>.sha256`` beside ``path``."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def recorded_sha256(path: Path) -> str | None:
    """The digest recorded for ``path``: ``None`` without a sidecar, ``""`` for a malformed
    one (which matches no file)."""
    try:
        text = sidecar(path).read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    fields = text.split()
    digest = fields[0].lower() if fields else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return ""
    return digest


def _atomic_bytes(path: Path, write: Callable[[IO[bytes]], Any]) -> str:
    """Write through a temporary file in ``path``'s folder, fsync, rename; the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # like mkstemp, but the mode follows the umask as for any other file
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def write_file(path: Path, write: Callable[[IO[bytes]], Any]) -> CacheFile:
    """Write a cache file atomically with ``write(binary file object)`` and record its sha256
    in the sidecar (see the module docstring); returns the file and its digest."""
    path = Path(path)
    digest = _atomic_bytes(path, write)
    _atomic_bytes(sidecar(path), lambda fh: fh.write(f"{digest}  {path.name}\n".encode()))
    return CacheFile(path, digest)


def write_bytes(path: Path, data: bytes) -> CacheFile:
    """:func:`write_file` of a byte string (completion markers, small text files)."""
    return write_file(path, lambda fh: fh.write(data))


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def move_aside(path: Path, reason: str, kind: str = "corrupt") -> Path:
    """Rename ``path`` to ``<name>.<kind>-<UTC time>`` (``-2``, ``-3``… if taken), its sidecar
    along to ``<that>.sha256``; log a warning naming both and ``reason``; return the new path."""
    path = Path(path)
    base = path.with_name(f"{path.name}.{kind}-{_stamp()}")
    target, n = base, 1
    while target.exists() or sidecar(target).exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    path.replace(target)
    if sidecar(path).exists():
        sidecar(path).replace(sidecar(target))
    log.warning("%s: %s; moved to %s", path, reason, target)
    return target


def check_file(path: Path) -> tuple[CacheFile | None, str | None]:
    """``(CacheFile, None)`` when ``path``'s bytes match its sidecar, else ``(None, why)``
    (``why`` starts with ``"no recorded sha256"`` when there is no sidecar)."""
    recorded = recorded_sha256(path)
    if recorded is None:
        return None, f"no recorded sha256 ({sidecar(path).name} missing: an older mtopt wrote it)"
    actual = sha256_file(path)
    if actual != recorded:
        if not recorded:
            return None, f"{sidecar(path).name} is malformed"
        return None, f"sha256 {actual[:16]}… differs from the recorded {recorded[:16]}…"
    return CacheFile(path, actual), None


def read_file(path: Path, read: Callable[[Path], T]) -> Lookup[T]:
    """Verify ``path`` against its sidecar, then ``read(path)``. A missing file is a miss; a
    damaged, unreadable or unverified one is moved aside (:func:`move_aside`) and is a miss too,
    with :attr:`Lookup.moved` set. ``read`` should load with ``allow_pickle=False`` and raise
    one of :data:`DAMAGE` (``ValueError`` for a failed data check) when the content is wrong."""
    path = Path(path)
    if not path.is_file():
        return Lookup(path)
    verified, why = check_file(path)
    if verified is None:
        assert why is not None
        kind = "unverified" if why.startswith("no recorded") else "corrupt"
        return Lookup(path, moved=move_aside(path, why, kind), reason=why)
    try:
        value = read(path)
    except (PermissionError, MtoptError):
        raise
    except DAMAGE as exc:
        why = f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        return Lookup(path, moved=move_aside(path, why), reason=why)
    return Lookup(path, value=value, file=verified)


def discard_duplicate(lookup: Lookup[Any], written: CacheFile) -> None:
    """After a miss that moved a file aside and the caller wrote ``written`` in its place:
    remove the moved file (and its sidecar) when its bytes are exactly the new file's."""
    moved = lookup.moved
    if moved is None or not moved.is_file() or sha256_file(moved) != written.sha256:
        return
    moved.unlink()
    sidecar(moved).unlink(missing_ok=True)
    log.warning(
        "%s: derived again, identical to the file moved aside; removed %s", written.path, moved.name
    )


def load_npy(path: Path) -> np.ndarray:
    """One ``.npy`` array, without pickles."""
    return np.load(path, allow_pickle=False)


def save_npy(path: Path, array: np.ndarray) -> CacheFile:
    """:func:`write_file` of one array as ``.npy`` (no pickles)."""
    return write_file(path, lambda fh: np.save(fh, array, allow_pickle=False))


def load_int_column(path: Path) -> np.ndarray:
    """Integers saved one per line by :func:`save_int_column`, as int64 ``(n,)``."""
    return np.loadtxt(path, dtype=np.int64, ndmin=1).reshape(-1)


def save_int_column(path: Path, values: np.ndarray) -> CacheFile:
    """:func:`write_file` of integers as text, one per line (diff-able, numpy-independent)."""
    return write_file(path, lambda fh: np.savetxt(fh, values, fmt="%d"))


def refetch_once(fetch: Callable[[], Path], check: Callable[[Path], T], dataset: str | None) -> T:
    """``check(fetch())`` for a downloaded file (a wheel, a ``.deb``) that ``fetch`` returns from
    its folder when present and downloads otherwise. When ``check`` finds it damaged (raises one
    of :data:`DAMAGE`), it is moved aside and fetched once more; a second failure, or a failed
    download, raises a one-line :class:`DataError` naming the file and ``mtopt data fetch``."""
    first = fetch()
    try:
        return check(first)
    except (PermissionError, MtoptError):
        raise
    except DAMAGE as exc:
        reason = _one_line(exc)
        moved = move_aside(first, reason)
    note = f"{first}: {reason}; moved to {moved}"
    try:
        again = fetch()
    except FetchFailedError as exc:
        raise FetchFailedError(f"{note}; {exc}") from exc
    try:
        return check(again)
    except (PermissionError, MtoptError):
        raise
    except DAMAGE as exc:
        moved_again = move_aside(again, _one_line(exc))
        retry = f"run: {fetch_command(dataset)} to try once more" if dataset else "try again"
        raise DataError(
            f"{note}; downloaded again, {again.name} is still damaged ({_one_line(exc)}) and was "
            f"moved to {moved_again}; {retry}, or report the mismatch"
        ) from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def describe(data: Any) -> list[str]:
    """Where loaded data came from, for ``mtopt data fetch``: the cache file actually read or
    written and its sha256, then the origin recorded in it (``data.source`` without the
    ``(cached at …)`` suffix; a wheel member's digest there is the member's, so labelled)."""
    file: CacheFile | None = getattr(data, "cache_file", None)
    source = str(getattr(data, "source", ""))
    if file is None:
        return [f"  not cached (read on every call): {source}"]
    origin = source.removesuffix(f" (cached at {file.path})")
    return [
        f"  cache file {file.path}",
        f"  sha256     {file.sha256} (of the cache file; recorded in {sidecar(file.path).name})",
        f"  made from  {origin}",
    ]
