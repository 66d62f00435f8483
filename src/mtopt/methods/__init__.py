"""All registered methods; importing this package registers them."""

from mtopt.core.registry import make, method_class, method_names
from mtopt.methods.mgda import MGDA, MGDAUB
from mtopt.methods.scalarization import FixedWeights, UnitaryScalarization

__all__ = [
    "MGDA",
    "MGDAUB",
    "FixedWeights",
    "UnitaryScalarization",
    "make",
    "method_class",
    "method_names",
]
