"""Benchmark problems by name (``multi_mnist/cl_rr``, ``qm9/mlp``, ``yeast``, ...)."""

from __future__ import annotations

from typing import Any

from mtopt.problems.base import Metric, MultiTaskModel, Problem, Split, TaskSpec, evaluate
from mtopt.problems.cityscapes import VARIANTS as CITYSCAPES_VARIANTS
from mtopt.problems.cityscapes import Cityscapes
from mtopt.problems.multi_fashion import VARIANTS as FASHION_VARIANTS
from mtopt.problems.multi_fashion import MultiFashion, MultiFashionMNIST
from mtopt.problems.multi_mnist import VARIANTS, MultiMNIST
from mtopt.problems.nyuv2 import NYUv2
from mtopt.problems.qm9 import QM9
from mtopt.problems.qm9 import TRACKS as QM9_TRACKS
from mtopt.problems.yeast import Yeast

PROBLEMS = (
    *(f"multi_mnist/{v}" for v in VARIANTS),
    *(f"multi_fashion/{v}" for v in FASHION_VARIANTS),
    *(f"multi_fashion_mnist/{v}" for v in FASHION_VARIANTS),
    *(f"qm9/{t}" for t in QM9_TRACKS),
    "yeast",
    *(f"cityscapes/{v}" for v in CITYSCAPES_VARIANTS),
    "nyuv2",
)


def get_problem(name: str, **kwargs: Any) -> Problem:
    """Build a problem by name (see ``PROBLEMS``)."""
    family, _, variant = name.partition("/")
    if family == "multi_mnist" and variant in VARIANTS:
        return MultiMNIST(variant, **kwargs)
    if family == "multi_fashion" and variant in FASHION_VARIANTS:
        return MultiFashion(variant, **kwargs)
    if family == "multi_fashion_mnist" and variant in FASHION_VARIANTS:
        return MultiFashionMNIST(variant, **kwargs)
    if family == "qm9" and variant in QM9_TRACKS:
        return QM9(variant, **kwargs)
    if name == "yeast":
        return Yeast(**kwargs)
    if family == "cityscapes" and variant in CITYSCAPES_VARIANTS:
        return Cityscapes(variant, **kwargs)
    if name == "nyuv2":
        return NYUv2(**kwargs)
    raise ValueError(f"unknown problem {name!r}; available: {', '.join(PROBLEMS)}")


__all__ = [
    "PROBLEMS",
    "QM9",
    "Cityscapes",
    "Metric",
    "MultiFashion",
    "MultiFashionMNIST",
    "MultiMNIST",
    "MultiTaskModel",
    "NYUv2",
    "Problem",
    "Split",
    "TaskSpec",
    "Yeast",
    "evaluate",
    "get_problem",
]
