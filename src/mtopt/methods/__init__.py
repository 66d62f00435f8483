"""Every registered method, one module each, named as registered (``mtopt.methods.<name>``);
importing this package registers them all."""

from mtopt.methods.aligned_mtl import AlignedMTL
from mtopt.methods.auto_lambda import AutoLambda
from mtopt.methods.cagrad import CAGrad
from mtopt.methods.cdtt import CDTT
from mtopt.methods.db_mtl import DBMTL
from mtopt.methods.dwa import DWA
from mtopt.methods.edm import EDM
from mtopt.methods.famo import FAMO
from mtopt.methods.fixed import Fixed
from mtopt.methods.gls import GLS
from mtopt.methods.go4align import GO4Align
from mtopt.methods.graddrop import GradDrop
from mtopt.methods.imtl import IMTL
from mtopt.methods.imtl_g import IMTLG
from mtopt.methods.imtl_l import IMTLL
from mtopt.methods.mgda import MGDA
from mtopt.methods.mgda_ub import MGDAUB
from mtopt.methods.nash_mtl import NashMTL
from mtopt.methods.pcgrad import PCGrad
from mtopt.methods.rlw import RLW
from mtopt.methods.rotograd import RotoGrad
from mtopt.methods.selective_groups import SelectiveGroups
from mtopt.methods.si import SI
from mtopt.methods.unitary import Unitary
from mtopt.methods.upgrad import UPGrad
from mtopt.methods.uw import UW

__all__ = [
    "CDTT",
    "DBMTL",
    "DWA",
    "EDM",
    "FAMO",
    "GLS",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "MGDAUB",
    "RLW",
    "SI",
    "UW",
    "AlignedMTL",
    "AutoLambda",
    "CAGrad",
    "Fixed",
    "GO4Align",
    "GradDrop",
    "NashMTL",
    "PCGrad",
    "RotoGrad",
    "SelectiveGroups",
    "UPGrad",
    "Unitary",
]
