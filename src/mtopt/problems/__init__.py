"""Benchmark problems by name (``multi_mnist/cl_cr``, ``multi_mnist/cl_rr``, ...)."""

from __future__ import annotations

from typing import Any

from mtopt.problems.base import Metric, MultiTaskModel, Problem, Split, TaskSpec, evaluate
from mtopt.problems.multi_mnist import VARIANTS, MultiMNIST

PROBLEMS = tuple(f"multi_mnist/{v}" for v in VARIANTS)


def get_problem(name: str, **kwargs: Any) -> Problem:
    """Build a problem by name (see ``PROBLEMS``)."""
    family, _, variant = name.partition("/")
    if family == "multi_mnist" and variant in VARIANTS:
        return MultiMNIST(variant, **kwargs)
    raise ValueError(f"unknown problem {name!r}; available: {', '.join(PROBLEMS)}")


__all__ = [
    "PROBLEMS",
    "Metric",
    "MultiMNIST",
    "MultiTaskModel",
    "Problem",
    "Split",
    "TaskSpec",
    "evaluate",
    "get_problem",
]
