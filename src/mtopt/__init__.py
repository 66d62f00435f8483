"""mtopt: multi-task optimization methods behind one step contract.

>>> import mtopt
>>> "mgda" in mtopt.available_methods()
True
"""

from mtopt import methods as _methods  # registers every method
from mtopt.core.method import Aggregation, Method, MethodInput, Need, SolverReport
from mtopt.core.registry import available_methods, make
from mtopt.engine import Losses, MultiTaskOptimizer, StepInfo

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
    "available_methods",
    "make",
]
del _methods
