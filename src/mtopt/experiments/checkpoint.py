"""Epoch checkpoints of a training run, so that a run killed at any moment resumes where its last
epoch ended and gives the record it would have given had it never stopped.

A checkpoint holds everything a run carries from one epoch to the next: the model, the
:class:`~mtopt.engine.MultiTaskOptimizer` (base optimizer and method state, step count), the
learning-rate schedule, every random stream the run draws from (torch's global generator, and
CUDA's on a GPU; numpy's and Python's global ones; the generator that orders the training batches;
the position of the meta-batch stream), the history, the best epochs' states, and the time spent.
It is written after every epoch to a temporary file, flushed, then renamed over the previous one
(``os.replace``), so that a kill leaves either the old checkpoint or the new one, never half of
one. The file is a pickle (``torch.save``): it is read only from the folder its run store chose.

What a resumed run cannot reproduce is the wall time of the steps the kill lost: ``seconds``
adds up the time of the epochs that were kept; the record lists the resumptions (``resumed``:
the epoch, the code version and torch's thread count of each) and the version it began with
(``began_with``), so that a run finished by another version says so, and a resume under another
version or thread count is one warning line. A checkpoint of a run on other data (a digest of
the arrays of its splits, ``data_digest`` in the record) is set aside and the run starts over.
A temporary file that a kill left between the write and the rename is deleted when the run is
next loaded (if its process is gone) or finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtopt.experiments.database import pid_running

logger = logging.getLogger(__name__)

#: the layout of a checkpoint file; a file of another format is not resumed from
FORMAT = 1


def random_state(device: torch.device) -> dict[str, Any]:
    """The global random streams of this process (those a run draws from but does not own)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`random_state` took."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(path: Path, state: dict[str, Any]) -> bool:
    """Write ``state`` to ``path`` atomically: a reader (or a kill) sees the previous file or
    this one, whole. A folder that cannot be written (a Ray node without the store's folder)
    costs the resumability, not the run: a warning, and ``False``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write the checkpoint %s (%s): this run is not resumable", path, exc)
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return True


def load(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint of run ``key`` at ``path``; ``None`` when there is none. A file that cannot
    be read, or holds another run or format, is set aside (renamed ``*.unusable``, with a
    warning) and the run starts from its first epoch."""
    _remove_torn(path, only_dead=True)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=False)
        if not isinstance(state, dict):
            raise ValueError("not a checkpoint")
    except Exception as exc:  # any unreadable file: a torn disk, another program's file
        why = f"unreadable ({type(exc).__name__}: {exc})"
    else:
        if state.get("format") == FORMAT and state.get("key") == key:
            return state
        why = f"of format {state.get('format')!r} for run {state.get('key')!r}"
    set_aside(path, why)
    return None


def epochs_done(path: Path, key: str) -> int | None:
    """How many epochs run ``key``'s checkpoint at ``path`` holds, or ``None`` (no file, or one
    that is not this run's). Only reads: an unusable file is left for the run to set aside
    (``mtopt sweep --stored`` shows the runs in flight with this)."""
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and state.get("format") == FORMAT and state.get("key") == key:
            return int(state["epochs_done"])
    except Exception:  # no file, one being replaced, unreadable or malformed: nothing to show
        return None
    return None


def set_aside(path: Path, why: str) -> None:
    """Rename an unusable checkpoint ``*.unusable`` (kept for a look, never resumed from) and say
    why; its run starts over."""
    aside = path.with_name(path.name + ".unusable")
    os.replace(path, aside)
    logger.warning("checkpoint %s is %s: set aside as %s; the run starts over", path, why, aside)


def remove(path: Path | None) -> None:
    """Delete a finished run's checkpoint (its record is stored), and any temporary file a
    kill left beside it."""
    if path is not None:
        path.unlink(missing_ok=True)
        _remove_torn(path)


def _remove_torn(path: Path, only_dead: bool = False) -> None:
    """Delete the temporary files (``<name>.<pid>.tmp``) that a kill between a write and its
    rename left for ``path``. ``only_dead``: only those of a process no longer running here
    (a run being loaded: another process may be writing one now); once the record is stored,
    all of them."""
    with contextlib.suppress(OSError):
        for torn in path.parent.glob(f"{path.name}.*.tmp"):
            pid = torn.name[len(path.name) + 1 : -len(".tmp")]
            if only_dead and (not pid.isdigit() or pid_running(int(pid))):
                continue
            torn.unlink(missing_ok=True)
