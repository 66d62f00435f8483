"""mtopt: multi-task optimization methods behind one step contract.

>>> import mtopt
>>> mtopt.methods()  # doctest: +ELLIPSIS
[...]
"""

from mtopt import methods as _methods  # registers every method
from mtopt.core.method import Aggregation, Method, MethodInput, Need, SolverReport
from mtopt.core.registry import make
from mtopt.core.registry import method_names as methods
from mtopt.step import Losses, MultiTaskOptimizer, StepInfo

__version__ = "0.1.0"

__all__ = [
    "Aggregation",
    "Losses",
    "Method",
    "MethodInput",
    "MultiTaskOptimizer",
    "Need",
    "SolverReport",
    "StepInfo",
    "make",
    "methods",
]
del _methods
