"""Output paths, checked before the work that fills them: a run, a comparison or a bench that
takes minutes must not end in an error about where its result goes."""

from __future__ import annotations

import os
from pathlib import Path

from mtopt.errors import ConfigError


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` (or ``path`` itself) that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")  # unreachable for a resolved path: the root exists


def check_output_file(option: str, path: Path | None) -> None:
    """``path`` (``None``: nothing to write) can be written as a file: not a folder, in an
    existing folder this process may write to, and not a read-only file. Else a one-line
    :class:`~mtopt.errors.ConfigError` naming ``option``."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give a file name")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: there is no folder {folder}")
    if path.exists():  # overwritten in place: the folder's own permission does not matter
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{option} {path}: the file exists and cannot be written")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {folder}")


def check_output_folder(option: str, path: Path | None) -> None:
    """``path`` (``None``: nothing to write) is a folder or can be made one: not a file, and the
    nearest existing folder above it may be written to. Nothing is created here."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder")
    found = _existing_ancestor(path.resolve())
    if not found.is_dir():
        raise ConfigError(f"{option} {path}: {found} is a file, not a folder")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {found}")
