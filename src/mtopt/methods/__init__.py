"""All registered methods; importing this package registers them."""

from mtopt.core.registry import make, method_class, method_names
from mtopt.methods.aligned_mtl import AlignedMTL
from mtopt.methods.auto_lambda import AutoLambda
from mtopt.methods.cagrad import CAGrad
from mtopt.methods.cdtt import CDTT
from mtopt.methods.db_mtl import DBMTL
from mtopt.methods.dwa import DynamicWeightAverage
from mtopt.methods.edm import EDM
from mtopt.methods.famo import FAMO
from mtopt.methods.go4align import GO4Align
from mtopt.methods.graddrop import GradDrop
from mtopt.methods.imtl import IMTL, IMTLG
from mtopt.methods.learned_scales import IMTLL, UncertaintyWeighting
from mtopt.methods.log_losses import GeometricLoss, ScaleInvariant
from mtopt.methods.mgda import MGDA, MGDAUB
from mtopt.methods.nash_mtl import NashMTL
from mtopt.methods.pcgrad import PCGrad
from mtopt.methods.rlw import RandomLossWeighting
from mtopt.methods.rotograd import RotoGrad
from mtopt.methods.scalarization import FixedWeights, UnitaryScalarization
from mtopt.methods.selective_groups import SelectiveGroups
from mtopt.methods.upgrad import UPGrad

__all__ = [
    "CDTT",
    "DBMTL",
    "EDM",
    "FAMO",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "AlignedMTL",
    "AutoLambda",
    "CAGrad",
    "DynamicWeightAverage",
    "FixedWeights",
    "GO4Align",
    "GeometricLoss",
    "GradDrop",
    "NashMTL",
    "PCGrad",
    "RandomLossWeighting",
    "RotoGrad",
    "ScaleInvariant",
    "SelectiveGroups",
    "UPGrad",
    "UncertaintyWeighting",
    "UnitaryScalarization",
    "make",
    "method_class",
    "method_names",
]
