"""The engine: :class:`MultiTaskOptimizer` runs any method in a plain training loop.

Split by concern: :mod:`~mtopt.engine.optimizer` (the facade: ``step`` = losses → gradient
source → method → write-back), :mod:`~mtopt.engine.setup` (shared parameters, and the gradient
source the method's level picks), :mod:`~mtopt.engine.closure` (what a closure returns, and
replaying it), :mod:`~mtopt.engine.context` (what a closure method may do during a step),
:mod:`~mtopt.engine.sources` (per-task gradients for each level, and writing the shared update),
:mod:`~mtopt.engine.writeback` (heads, clipping, method parameters), :mod:`~mtopt.engine.info`
(the step's record). No module here names a method or an optimizer: methods are told apart by
their level and capabilities (:mod:`mtopt.core.capabilities`).
"""

from mtopt.engine.closure import Losses
from mtopt.engine.info import StepInfo
from mtopt.engine.optimizer import ENGINES, MultiTaskOptimizer

__all__ = ["ENGINES", "Losses", "MultiTaskOptimizer", "StepInfo"]
