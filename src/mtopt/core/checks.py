"""Input checks shared by methods: clear errors that name the method, the task and the value."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def require_positive_losses(
    method: str,
    losses: Tensor,
    task_names: tuple[str, ...],
    why: str,
    offset: float = 0.0,
    allow_zero: bool = False,
) -> None:
    """Raise ``ValueError`` if any ``losses[k] + offset`` is not strictly positive (or negative,
    with ``allow_zero``: a float32 loss can be exactly 0 on an easy batch)."""
    bad = [
        f"{t}={v:.6g}"
        for t, v in zip(task_names, losses.tolist(), strict=True)
        if not (v + offset >= 0 if allow_zero else v + offset > 0)
    ]
    if bad:
        shift = f" + {offset:g}" if offset else ""
        relation = "≥" if allow_zero else ">"
        raise ValueError(
            f"{method}: {why} needs loss{shift} {relation} 0 for every task; got {', '.join(bad)}"
        )


def check_choice(method: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise a ValueError naming the method, the option and the valid choices."""
    if value not in choices:
        raise ValueError(f"{method}: {name} must be one of {choices}, got {value!r}")
