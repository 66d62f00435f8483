"""How ``mtopt bench`` names its contenders, and which contender of another library computes the
rule of which of our methods.

Every name is written in our one spec grammar (:mod:`mtopt.specs`,
``NAME[:key=value...][@OPTIMIZER][#ENGINE]``), parsed by :func:`mtopt.specs.parse_spec` and
nothing else:

* an mtopt row is the method spec itself, with an optional gradient engine: ``upgrad``,
  ``cagrad:c=0.2``, ``upgrad#gramian`` (the bench always uses Adam, so a ``@OPTIMIZER`` suffix is
  refused with parse_spec's one-line error);
* a TorchJD row is ``torchjd:`` and the aggregator's name in ``torchjd.aggregation``:
  ``torchjd:UPGrad`` (``mtl_backward`` + ``jac_to_grad``: the Jacobian with respect to the
  shared parameters), ``torchjd:MGDA:level=rep`` (the aggregator on the Jacobian with respect to
  the shared representation), ``torchjd:UPGrad#gramian`` (TorchJD's autogram engine with the
  aggregator's Gramian weighting: the counterpart of our ``#gramian`` rows);
* a LibMTL row is ``libmtl:`` and the weighting's class name (``libmtl:EW``);
* ``plain`` is the plain ``sum(losses).backward()`` step, the reference of every ratio.

The tables below are data about TorchJD 0.18 and LibMTL 1.1.5 (their names for our rules and
the arguments that match our defaults); nothing here, or anywhere in :mod:`mtopt.bench`, branches
on the name of one of our methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtopt.specs import MethodSpec, format_spec, parse_spec

__all__ = [
    "COUNTERPARTS",
    "DEFAULT_TORCHJD",
    "GRAM_WEIGHTINGS",
    "LIBMTL_COUNTERPARTS",
    "LIBMTL_PREFIX",
    "PLAIN",
    "REP_LEVEL",
    "SOLVER_REFERENCES",
    "TORCHJD_ARGUMENTS",
    "TORCHJD_PREFIX",
    "TORCHJD_TASK_COUNT",
    "SolverReference",
    "TorchJDSpec",
    "counterpart_label",
    "libmtl_counterpart",
    "method_spec",
    "parse_torchjd",
    "torchjd_arguments",
]

PLAIN = "plain"
TORCHJD_PREFIX = "torchjd:"
LIBMTL_PREFIX = "libmtl:"
#: the ``level`` of a TorchJD contender that aggregates the Jacobian of the representation
REP_LEVEL = "rep"
#: the engines a TorchJD contender can name: autojac (the default) or autogram
_TORCHJD_ENGINES = ("jacobian", "gramian")

#: TorchJD aggregators that have a Gramian weighting (usable with autogram, ``#gramian``)
GRAM_WEIGHTINGS = ("UPGrad", "MGDA", "CAGrad", "IMTLG", "AlignedMTL", "PCGrad", "DualProj")
#: Our method name → the TorchJD aggregator that computes the same rule (``:level=rep`` is added
#: when the method works on the representation, ``#gramian`` for our Gramian engine).
COUNTERPARTS: dict[str, str] = {
    "aligned_mtl": "AlignedMTL",
    "cagrad": "CAGrad",
    "graddrop": "GradDrop",
    "imtl_g": "IMTLG",
    "mgda": "MGDA",
    "mgda_ub": "MGDA",
    "nash_mtl": "NashMTL",
    "pcgrad": "PCGrad",
    "upgrad": "UPGrad",
}
#: TorchJD constructor arguments that match our defaults (aggregator and Gramian weighting)
TORCHJD_ARGUMENTS: dict[str, dict[str, Any]] = {"CAGrad": {"c": 0.5}}
#: TorchJD aggregators whose constructor takes the number of tasks (``n_tasks=K``)
TORCHJD_TASK_COUNT = ("NashMTL",)
#: The TorchJD contenders measured when every method is (``--methods`` not given).
DEFAULT_TORCHJD = (
    "Mean",
    "UPGrad",
    "MGDA",
    "CAGrad",
    "IMTLG",
    "NashMTL",
    "AlignedMTL",
    "PCGrad",
    "DualProj",
    "GradDrop:level=rep",
    "MGDA:level=rep",
    "UPGrad#gramian",
    "MGDA#gramian",
    "CAGrad#gramian",
    "IMTLG#gramian",
    "AlignedMTL#gramian",
    "PCGrad#gramian",
)

#: mtopt method → (LibMTL 1.1.5 weighting, its backward kwargs), each at the mtopt defaults:
#: LibMTL's ``IMTL`` is the hybrid IMTL (our ``imtl:level=param``), its ``UW`` the common form
LIBMTL_COUNTERPARTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unitary": ("EW", {}),
    "mgda": ("MGDA", {"mgda_gn": "loss+"}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}),
    "gls": ("GLS", {}),
    "rlw": ("RLW", {"dist": "Normal"}),
    "uw": ("UW", {}),
    "imtl": ("IMTL", {}),
}


@dataclass(frozen=True)
class SolverReference:
    """The reference an inner solver is compared with alone (:mod:`mtopt.bench.solvers`).

    Attributes:
        description: for the report.
        aggregator: the TorchJD aggregator that runs it (fed a square root of the Gramian).
    """

    description: str
    aggregator: str


#: method → the reference its inner solver is compared with, on the same Gramians
SOLVER_REFERENCES: dict[str, SolverReference] = {
    "nash_mtl": SolverReference("authors' CCCP in cvxpy/ECOS (TorchJD 0.18 NashMTL)", "NashMTL"),
}


def method_spec(text: str) -> MethodSpec:
    """An mtopt contender's spec ``NAME[:key=value...][#ENGINE]`` (not built): ``parse_spec``
    with the engine suffix only."""
    return parse_spec(text, build=False, allow=("engine",))


@dataclass(frozen=True)
class TorchJDSpec:
    """A TorchJD contender ``NAME[:level=rep][#gramian]``.

    Attributes:
        aggregator: the aggregator's name in ``torchjd.aggregation`` (``UPGrad``).
        level: ``param`` (the Jacobian with respect to the shared parameters) or ``rep`` (with
            respect to the shared representation).
        engine: ``jacobian`` (autojac) or ``gramian`` (autogram, the Gramian weighting).
    """

    aggregator: str
    level: str = "param"
    engine: str = "jacobian"

    @property
    def name(self) -> str:
        """The canonical name: ``UPGrad``, ``MGDA:level=rep``, ``UPGrad#gramian``."""
        hparams = {"level": REP_LEVEL} if self.level == REP_LEVEL else {}
        engine = "#gramian" if self.engine == "gramian" else ""
        return format_spec(self.aggregator, hparams) + engine

    @property
    def label(self) -> str:
        """The contender's label, ``torchjd:`` and :attr:`name`."""
        return TORCHJD_PREFIX + self.name


def parse_torchjd(text: str) -> TorchJDSpec:
    """A TorchJD contender name (with or without ``torchjd:``), in our spec grammar; a
    ``ValueError`` (one line) for anything else."""
    name = text.strip().removeprefix(TORCHJD_PREFIX)
    if "@" in name:
        raise ValueError(
            f"TorchJD contender {name!r}: write NAME[:level=rep][#gramian] "
            "(e.g. MGDA:level=rep, UPGrad#gramian); '@' names a base optimizer"
        )
    spec = parse_spec(name, build=False, allow=("engine",))
    unknown = sorted(set(spec.hparams) - {"level"})
    level = spec.hparams.get("level", "param")
    engine = spec.engine or "jacobian"
    if unknown or level not in ("param", REP_LEVEL):
        raise ValueError(f"TorchJD contender {name!r}: the only option is level=param|rep")
    if engine not in _TORCHJD_ENGINES:
        raise ValueError(
            f"TorchJD contender {name!r}: #jacobian (autojac, the default) or #gramian "
            f"(autogram), not #{engine}"
        )
    if level == REP_LEVEL and engine == "gramian":
        raise ValueError(f"TorchJD contender {name!r}: level=rep has no #gramian form")
    return TorchJDSpec(spec.name, str(level), engine)


def torchjd_arguments(aggregator: str, num_tasks: int) -> dict[str, Any]:
    """The constructor arguments of a TorchJD aggregator (or its Gramian weighting)."""
    kwargs = dict(TORCHJD_ARGUMENTS.get(aggregator, {}))
    if aggregator in TORCHJD_TASK_COUNT:
        kwargs["n_tasks"] = num_tasks
    return kwargs


def counterpart_label(name: str, level: str, engine: str | None = None) -> str | None:
    """The TorchJD contender computing method ``name``'s rule, at the same level; for our
    Gramian engine, TorchJD's autogram with the same weighting (``None`` when TorchJD has no
    such weighting: its Jacobian path is the counterpart of our default row instead)."""
    base = COUNTERPARTS.get(name)
    if base is None:
        return None
    if engine == "gramian":  # engine against engine: only TorchJD's autogram counts
        if base not in GRAM_WEIGHTINGS:
            return None
        return TorchJDSpec(base, engine="gramian").label
    return TorchJDSpec(base, level=REP_LEVEL if level == REP_LEVEL else "param").label


def libmtl_counterpart(label: str) -> str | None:
    """The LibMTL contender of an mtopt row (rows with an engine suffix have none)."""
    try:
        spec = method_spec(label)
    except ValueError:
        return None
    if spec.engine is not None or spec.name not in LIBMTL_COUNTERPARTS:
        return None
    return LIBMTL_PREFIX + LIBMTL_COUNTERPARTS[spec.name][0]
