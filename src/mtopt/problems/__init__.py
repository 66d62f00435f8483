"""Benchmark problems by name (``multi_mnist/cl_rr``, ``qm9/mlp``, ``yeast``, ...): each family
registers itself (:mod:`mtopt.problems.registry`); importing this package registers them all."""

from __future__ import annotations

from mtopt.problems.base import Metric, MultiTaskModel, Problem, Split, TaskSpec, evaluate
from mtopt.problems.cityscapes import Cityscapes
from mtopt.problems.multi_fashion import MultiFashion, MultiFashionMNIST
from mtopt.problems.multi_mnist import MultiMNIST
from mtopt.problems.nyuv2 import NYUv2
from mtopt.problems.qm9 import QM9
from mtopt.problems.registry import available_problems, get_problem, register_problem
from mtopt.problems.yeast import Yeast

#: every registered problem name
PROBLEMS = tuple(available_problems())

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
    "available_problems",
    "evaluate",
    "get_problem",
    "register_problem",
]
