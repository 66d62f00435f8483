r"""``mtopt bench``: the per-step cost of every registered method, and of TorchJD's
counterparts, measured side by side in one process.

Three synthetic workloads (random data, no data set needed):

* ``lenet``: the Multi-MNIST LeNet encoder with a classification head (10-class NLL) and a
  reconstruction head (784-pixel MSE), K = 2, input ``(256, 1, 28, 28)``;
* ``mlp11``: an MLP encoder 40 → 256 → 256 → 64 (ReLU) with 11 regression heads
  ``Linear(64, 1)`` (MSE), batch 128: the QM9-MLP shape;
* ``resnet3``: a small ResNet encoder (stem conv 3→32 at stride 2, three residual blocks at
  32/64/64 channels, batch norm) with three dense heads (7-class segmentation NLL, depth L1,
  surface normals 1 − cos) upsampled to the input size, input ``(8, 3, 64, 64)``.

Contenders, each with its own deep copy of the same initial model and its own Adam:

* ``plain``: ``opt.zero_grad(); sum(losses).backward(); opt.step()``;
* every mtopt method (or the ``--methods`` specs ``NAME[:KEY=VALUE...]``) through
  :class:`~mtopt.step.MultiTaskOptimizer` with ``shared=encoder.parameters()``;
* TorchJD 0.18 aggregators through ``mtl_backward`` + ``jac_to_grad`` (the Jacobian of the
  losses with respect to the shared parameters), and GradDrop / MGDA on the representation
  (``@rep``: ``torchjd.autojac.jac`` of the losses with respect to the features, the aggregator
  on that ``K × numel(z)`` matrix, one backward of the result through the encoder), GradDrop's
  original place and the counterparts of our ``graddrop`` and ``mgda_ub``.

Every round, each contender does one step, in an order shuffled per round with a fixed seed, so
that a drift of the machine's load hits every contender alike; the first ``warmup`` rounds are
not timed. The clock (``time.perf_counter``, after a CUDA synchronisation on GPU) covers the
whole step, forward included. Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated``
above the allocation before the step (reset per step); on CPU the growth of the peak resident set
size during the step (``/proc/self/clear_refs`` ← 5 resets ``VmHWM``) — approximate: the
allocator's caching (glibc's heap, memory freed by another contender) hides part of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mtopt
from mtopt.core.capabilities import ClosureMethod, MetaBatchMethod
from mtopt.core.gradients import gram_matrix, jacobian
from mtopt.core.method import Method
from mtopt.core.registry import method_class
from mtopt.engine import Losses, MultiTaskOptimizer
from mtopt.problems.multi_mnist import ClassificationHead, LeNetEncoder, ReconstructionHead
from mtopt.specs import parse_spec

WORKLOADS = ("lenet", "mlp11", "resnet3")
PLAIN = "plain"
TORCHJD_PREFIX = "torchjd:"
REP_SUFFIX = "@rep"
#: TorchJD through its autogram engine: the weighting on the Gramian, one backward of Σ wₖℓₖ
GRAM_SUFFIX = "@gram"
#: mtopt rows run with ``MultiTaskOptimizer(engine=...)`` when the spec ends with ``@<engine>``
ENGINE_SUFFIXES = {"@gramian": "gramian", "@jacobian": "jacobian", "@batched": "batched"}
#: TorchJD aggregators that have a Gramian weighting (usable with autogram)
GRAM_WEIGHTINGS = ("UPGrad", "MGDA", "CAGrad", "IMTLG", "AlignedMTL", "PCGrad", "DualProj")
#: Our method name → the TorchJD aggregator that computes the same rule (``@rep`` is added when
#: the method works on the representation).
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
    "GradDrop@rep",
    "MGDA@rep",
    "UPGrad@gram",
    "MGDA@gram",
    "CAGrad@gram",
    "IMTLG@gram",
    "AlignedMTL@gram",
    "PCGrad@gram",
)
#: Targets (see :func:`evaluate_targets`).
LOSS_ONLY_MAX = 1.05
REP_MAX = 1.5
REP_TARGET_WORKLOAD = "mlp11"
COUNTERPART_MAX = 1.0
GROUPS_SLACK = 0.1
LR = 1e-3


# ---------------------------------------------------------------------------------------------
# workloads
class BenchModel(nn.Module):
    """A shared encoder and one head per task."""

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)


Batch = dict[str, Tensor]
LossFn = Callable[[Tensor, Batch], Tensor]


@dataclass(frozen=True)
class Workload:
    """A model shape, a random batch and the task losses.

    Attributes:
        name: the workload's name (``--workloads``).
        description: one line for the report.
        task_names: the K tasks.
        loss_types: one loss type per task (for methods whose rule depends on it).
        build: a fresh model (parameters drawn from torch's global generator).
        make_batch: a random batch from a ``torch.Generator`` (on the CPU).
        losses: one function ``(head output, batch) → scalar loss`` per task.
    """

    name: str
    description: str
    task_names: tuple[str, ...]
    loss_types: tuple[str, ...]
    build: Callable[[], BenchModel]
    make_batch: Callable[[torch.Generator], Batch]
    losses: tuple[LossFn, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


def _nll(out: Tensor, batch: Batch) -> Tensor:
    return F.nll_loss(out, batch["label"])


def _mse_image(out: Tensor, batch: Batch) -> Tensor:
    return F.mse_loss(out, batch["image"])


def _lenet() -> Workload:
    def build() -> BenchModel:
        return BenchModel(LeNetEncoder(), [ClassificationHead(), ReconstructionHead()])

    def make_batch(gen: torch.Generator) -> Batch:
        return {
            "x": torch.randn(256, 1, 28, 28, generator=gen),
            "label": torch.randint(0, 10, (256,), generator=gen),
            "image": torch.randn(256, 28, 28, generator=gen),
        }

    return Workload(
        name="lenet",
        description="Multi-MNIST LeNet encoder, CL (10-class NLL) + RR (784-pixel MSE) heads, "
        "input (256, 1, 28, 28), K = 2",
        task_names=("CL", "RR"),
        loss_types=("classification", "regression"),
        build=build,
        make_batch=make_batch,
        losses=(_nll, _mse_image),
    )


MLP_TASKS = 11


def _mlp_loss(k: int) -> LossFn:
    def loss(out: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(out.squeeze(1), batch["y"][:, k])

    return loss


def _mlp11() -> Workload:
    def build() -> BenchModel:
        encoder = nn.Sequential(
            nn.Linear(40, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 64),
            nn.ReLU(),
        )
        return BenchModel(encoder, [nn.Linear(64, 1) for _ in range(MLP_TASKS)])

    def make_batch(gen: torch.Generator) -> Batch:
        return {
            "x": torch.randn(128, 40, generator=gen),
            "y": torch.randn(128, MLP_TASKS, generator=gen),
        }

    return Workload(
        name="mlp11",
        description="MLP encoder 40→256→256→64 (ReLU), 11 Linear(64, 1) regression heads (MSE), "
        "batch 128, K = 11 (the QM9-MLP shape)",
        task_names=tuple(f"t{k}" for k in range(MLP_TASKS)),
        loss_types=("regression",) * MLP_TASKS,
        build=build,
        make_batch=make_batch,
        losses=tuple(_mlp_loss(k) for k in range(MLP_TASKS)),
    )


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _dense_head(channels: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, outputs, 1),
        nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
    )


def _segmentation(out: Tensor, batch: Batch) -> Tensor:
    return F.nll_loss(F.log_softmax(out, dim=1), batch["seg"])


def _depth(out: Tensor, batch: Batch) -> Tensor:
    return F.l1_loss(out, batch["depth"])


def _normals(out: Tensor, batch: Batch) -> Tensor:
    return (1.0 - (F.normalize(out, dim=1) * batch["normals"]).sum(dim=1)).mean()


def _resnet3() -> Workload:
    def build() -> BenchModel:
        encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            ResidualBlock(32, 32),
            ResidualBlock(32, 64, stride=2),
            ResidualBlock(64, 64),
        )
        return BenchModel(encoder, [_dense_head(64, 7), _dense_head(64, 1), _dense_head(64, 3)])

    def make_batch(gen: torch.Generator) -> Batch:
        return {
            "x": torch.randn(8, 3, 64, 64, generator=gen),
            "seg": torch.randint(0, 7, (8, 64, 64), generator=gen),
            "depth": torch.rand(8, 1, 64, 64, generator=gen),
            "normals": F.normalize(torch.randn(8, 3, 64, 64, generator=gen), dim=1),
        }

    return Workload(
        name="resnet3",
        description="ResNet encoder (stem 3→32 /2, residual blocks 32, 64 /2, 64; batch norm; "
        "features 64×16×16), heads segmentation (7-class NLL), depth (L1), normals (1 − cos) "
        "upsampled to 64×64, input (8, 3, 64, 64), K = 3",
        task_names=("seg", "depth", "normals"),
        loss_types=("classification", "l1", "regression"),
        build=build,
        make_batch=make_batch,
        losses=(_segmentation, _depth, _normals),
    )


_WORKLOAD_FACTORIES: dict[str, Callable[[], Workload]] = {
    "lenet": _lenet,
    "mlp11": _mlp11,
    "resnet3": _resnet3,
}


def get_workload(name: str) -> Workload:
    """The workload called ``name`` (one of :data:`WORKLOADS`)."""
    try:
        return _WORKLOAD_FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}") from None


def forward(
    model: BenchModel,
    workload: Workload,
    batch: Batch,
    head_input: Callable[[Tensor, int], Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The shared features ``z`` and the K task losses; head ``k`` sees ``head_input(z, k)``."""
    z = model.encoder(batch["x"])
    losses = []
    for k, (head, loss_fn) in enumerate(zip(model.heads, workload.losses, strict=True)):
        losses.append(loss_fn(head(z if head_input is None else head_input(z, k)), batch))
    return z, losses


# ---------------------------------------------------------------------------------------------
# options and results
@dataclass
class BenchOptions:
    """What to measure (the CLI's ``mtopt bench`` flags).

    Attributes:
        workloads: names from :data:`WORKLOADS`.
        steps: measured rounds (every contender steps once per round).
        warmup: untimed rounds first.
        methods: mtopt method specs ``NAME[:KEY=VALUE...]``; ``None``: every registered method.
        torchjd: measure TorchJD's aggregators too.
        torchjd_aggregators: which (names of :data:`DEFAULT_TORCHJD`'s kind, ``@rep`` for the
            representation); ``None``: all of :data:`DEFAULT_TORCHJD` when ``methods`` is
            ``None``, else the counterparts of the selected methods.
        threads: torch intra-op threads (``None``: torch's choice).
        device: ``"cpu"`` or ``"cuda"``.
        seed: seeds the models, the batches and the per-round order.
        out_dir: where ``bench.md``, ``bench.json`` and ``bench.png`` go (``None``: nowhere).
        plain: measure the plain step (the reference of every ratio).
    """

    workloads: tuple[str, ...] = WORKLOADS
    steps: int = 30
    warmup: int = 5
    methods: tuple[str, ...] | None = None
    torchjd: bool = True
    torchjd_aggregators: tuple[str, ...] | None = None
    threads: int | None = None
    #: measure LibMTL 1.1.5's counterparts too, when it is installed
    libmtl: bool = True
    device: str = "cpu"
    seed: int = 0
    out_dir: Path | None = None
    plain: bool = True

    def validate(self) -> None:
        """Raise a ValueError for an impossible option."""
        if self.steps < 1:
            raise ValueError(f"--steps must be ≥ 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be ≥ 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {self.threads}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available in this torch build")
        for name in self.workloads:
            if name not in WORKLOADS:
                raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
        if not self.workloads:
            raise ValueError("no workload to measure")


@dataclass
class ContenderResult:
    """One contender's measurements on one workload.

    Attributes:
        label: ``plain``, the mtopt method spec, or ``torchjd:<Aggregator>[@rep]``.
        kind: ``plain``, ``mtopt`` or ``torchjd``.
        category: ``plain``, ``loss`` (loss-only), ``rep`` (representation gradients),
            ``param`` (shared-parameter Jacobian), ``closure`` (re-runs the forward) or
            ``torchjd``.
        counterpart: for an mtopt method, the label of its TorchJD counterpart (if any).
        times: seconds per measured step.
        peak_memory: bytes per measured step (``None`` where not measurable).
        phases: median seconds per phase of ``StepInfo.times`` (mtopt methods only).
        groups: number of task groups per measured step (``selective_groups`` only).
        error: why the contender stopped (it is then left out of later rounds).
        solver_failures: measured steps whose inner solver did not converge (mtopt methods;
            the engine's warning for each is silenced during the bench).
    """

    label: str
    kind: str
    category: str
    counterpart: str | None = None
    times: list[float] = field(default_factory=list)
    peak_memory: list[int | None] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    error: str | None = None
    solver_failures: int = 0

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def min(self) -> float | None:
        return min(self.times) if self.times else None

    @property
    def max(self) -> float | None:
        return max(self.times) if self.times else None

    @property
    def peak(self) -> int | None:
        """The largest measured peak (bytes), ``None`` if none was measurable."""
        values = [v for v in self.peak_memory if v is not None]
        return max(values) if values else None

    @property
    def median_groups(self) -> float | None:
        return statistics.median(self.groups) if self.groups else None


@dataclass
class SolverResult:
    """An inner solver against its reference implementation, on the same Gramians (those of the
    method's own measured steps, replayed in order so both keep their warm starts).

    Attributes:
        method: the mtopt method (``nash_mtl``).
        reference: what it is compared with.
        ours, theirs: seconds per solve.
        error: why the reference could not run (e.g. cvxpy/ECOS missing).
    """

    method: str
    reference: str
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """Median of ours over median of theirs (< 1: ours is faster)."""
        if not self.ours or not self.theirs:
            return None
        return statistics.median(self.ours) / statistics.median(self.theirs)


@dataclass
class WorkloadResult:
    """Every contender on one workload, and the order they ran in.

    Attributes:
        name, description, num_tasks: the workload.
        contenders: label → measurements, in the order they were set up.
        order: the contender labels of each round, in the order they stepped (warm-up first).
        warmup: how many of ``order``'s rounds were not timed.
        seconds: wall time of the whole workload.
    """

    name: str
    description: str
    num_tasks: int
    contenders: dict[str, ContenderResult]
    order: list[list[str]] = field(default_factory=list)
    warmup: int = 0
    seconds: float = 0.0
    solvers: list[SolverResult] = field(default_factory=list)

    @property
    def plain_median(self) -> float | None:
        plain = self.contenders.get(PLAIN)
        return None if plain is None else plain.median

    def ratio_to_plain(self, label: str) -> float | None:
        """Median step time of ``label`` over the plain step's, both from this run."""
        base, mine = self.plain_median, self.contenders[label].median
        if base is None or mine is None or base <= 0:
            return None
        return mine / base

    def ratio_to_libmtl(self, label: str) -> float | None:
        """Median step time of an mtopt method over its LibMTL counterpart's (if measured)."""
        name = label.split(":")[0].strip()
        if name not in LIBMTL_COUNTERPARTS or self.contenders[label].kind != "mtopt":
            return None
        other = self.contenders.get(LIBMTL_PREFIX + LIBMTL_COUNTERPARTS[name][0])
        mine = self.contenders[label].median
        if other is None or other.median is None or mine is None or other.median <= 0:
            return None
        return mine / other.median

    def ratio_to_torchjd(self, label: str) -> float | None:
        """Median step time of an mtopt method over its TorchJD counterpart's."""
        counterpart = self.contenders[label].counterpart
        if counterpart is None or counterpart not in self.contenders:
            return None
        theirs, mine = self.contenders[counterpart].median, self.contenders[label].median
        if theirs is None or mine is None or theirs <= 0:
            return None
        return mine / theirs


@dataclass
class BenchResult:
    """A whole ``mtopt bench`` run."""

    options: BenchOptions
    workloads: list[WorkloadResult]
    machine: dict[str, Any]
    memory: str
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (medians and ratios included)."""
        out = {
            "options": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()
            },
            "machine": self.machine,
            "memory": self.memory,
            "command": self.command,
            "workloads": [],
            "targets": [asdict(t) for t in evaluate_targets(self)],
        }
        for w in self.workloads:
            entry = {k: v for k, v in asdict(w).items() if k != "contenders"}
            for solver, data in zip(w.solvers, entry["solvers"], strict=True):
                data["ratio"] = solver.ratio
            entry["contenders"] = {}
            for label, c in w.contenders.items():
                entry["contenders"][label] = {
                    **asdict(c),
                    "median": c.median,
                    "min": c.min,
                    "max": c.max,
                    "ratio_to_plain": w.ratio_to_plain(label),
                    "ratio_to_torchjd": w.ratio_to_torchjd(label),
                }
            out["workloads"].append(entry)
        return out


_CONTENDER_FIELDS = (
    "label",
    "kind",
    "category",
    "counterpart",
    "times",
    "peak_memory",
    "phases",
    "groups",
    "error",
    "solver_failures",
)


def result_from_dict(data: dict[str, Any]) -> BenchResult:
    """A :class:`BenchResult` back from :meth:`BenchResult.to_dict` (``bench.json``), e.g. to
    re-render its report or chart."""
    opts = dict(data["options"])
    for key in ("workloads", "methods", "torchjd_aggregators"):
        if opts.get(key) is not None:
            opts[key] = tuple(opts[key])
    if opts.get("out_dir") is not None:
        opts["out_dir"] = Path(opts["out_dir"])
    workloads = []
    for w in data["workloads"]:
        contenders = {
            label: ContenderResult(**{k: c[k] for k in _CONTENDER_FIELDS if k in c})
            for label, c in w["contenders"].items()
        }
        workloads.append(
            WorkloadResult(
                w["name"],
                w["description"],
                w["num_tasks"],
                contenders,
                order=w["order"],
                warmup=w["warmup"],
                seconds=w["seconds"],
                solvers=[
                    SolverResult(**{k: v for k, v in s.items() if k != "ratio"})
                    for s in w.get("solvers", [])
                ],
            )
        )
    return BenchResult(
        BenchOptions(**opts), workloads, data["machine"], data["memory"], data.get("command", "")
    )


# ---------------------------------------------------------------------------------------------
# method specs
def bench_hparams(name: str, hparams: dict[str, Any], num_tasks: int) -> dict[str, Any]:
    """The hyperparameters a method runs with in the bench: ``fixed`` gets unit weights and
    ``selective_groups`` no warm-up (so that its measured steps run its M groups, not the K
    singleton groups of the warm-up), unless the spec sets them."""
    out = dict(hparams)
    if name == "fixed":
        out.setdefault("weights", [1.0] * num_tasks)
    if name == "selective_groups":
        out.setdefault("warmup_steps", 0)
    return out


def method_category(method: Method) -> str:
    """``closure``, ``param``, ``rep`` or ``loss`` (in that precedence)."""
    if isinstance(method, ClosureMethod):
        return "closure"
    return method.level


def counterpart_label(name: str, level: str, engine: str | None = None) -> str | None:
    """The TorchJD contender computing method ``name``'s rule, at the same level; for our
    Gramian engine, TorchJD's autogram with the same weighting (``None`` when TorchJD has no
    such weighting: its Jacobian path is the counterpart of our default row instead)."""
    base = COUNTERPARTS.get(name)
    if base is None:
        return None
    suffix = REP_SUFFIX if level == "rep" else ""
    if engine == "gramian":  # engine against engine: only TorchJD's autogram counts
        if base not in GRAM_WEIGHTINGS:
            return None
        suffix = GRAM_SUFFIX
    return TORCHJD_PREFIX + base + suffix


def parse_method_spec(core: str) -> tuple[str, dict[str, Any]]:
    """The name and hyperparameters of a method spec without suffixes (not built)."""
    spec = parse_spec(core, build=False, allow=())
    return spec.name, dict(spec.hparams)


def split_engine(spec: str) -> tuple[str, str | None]:
    """``"upgrad@gramian"`` → ``("upgrad", "gramian")``; no suffix → ``(spec, None)``."""
    spec = spec.strip()
    for suffix, engine in ENGINE_SUFFIXES.items():
        if spec.endswith(suffix):
            return spec.removesuffix(suffix), engine
    return spec, None


def default_specs() -> list[str]:
    """Every registered method, plus ``NAME@gramian`` for each one that can run on the Gramian
    engine (its Jacobian row stays the default engine's)."""
    specs = mtopt.available_methods()
    for name in mtopt.available_methods():
        cls = method_class(name)
        if cls.gramian_only and cls.default_level() == "param":
            specs.append(name + "@gramian")
    return specs


def torchjd_available() -> bool:
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# contenders: each owns a model copy and an optimizer, and does one full step per call
class _Contender:
    def __init__(self, result: ContenderResult, model: BenchModel) -> None:
        self.result = result
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def step(self, batch: Batch) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, batch: Batch) -> None:
        """Called untimed before each measured step (default: nothing)."""


class _Plain(_Contender):
    def __init__(self, model: BenchModel, workload: Workload) -> None:
        super().__init__(ContenderResult(PLAIN, "plain", "plain"), model)
        self.workload = workload

    def step(self, batch: Batch) -> dict[str, Any]:
        self.optimizer.zero_grad()
        _, losses = forward(self.model, self.workload, batch)
        sum(losses).backward()
        self.optimizer.step()
        return {}


class _Mtopt(_Contender):
    def __init__(self, model: BenchModel, workload: Workload, spec: str) -> None:
        core, engine = split_engine(spec)
        name, hparams = parse_method_spec(core)
        method = mtopt.make(name, **bench_hparams(name, hparams, workload.num_tasks))
        result = ContenderResult(
            spec.strip(),
            "mtopt",
            method_category(method),
            counterpart=counterpart_label(name, method.level, engine),
        )
        super().__init__(result, model)
        self.workload = workload
        self.mto = MultiTaskOptimizer(
            self.optimizer,
            method,
            shared=model.encoder,
            tasks=workload.task_names,
            loss_types=workload.loss_types,
            engine=engine or "auto",
        )
        self.meta = isinstance(method, MetaBatchMethod)
        #: the Gramians of the measured steps, for methods whose solver is compared alone
        self.gramians: list[Tensor] | None = None
        if name in SOLVER_REFERENCES and not hparams:
            self.gramians = []

    def observe(self, batch: Batch) -> None:
        """Record the Gramian the coming step's method will see (same parameters, same batch),
        untimed, for the solver comparison."""
        if self.gramians is None or len(self.gramians) >= MAX_SOLVER_SAMPLES:
            return
        _, losses = forward(self.model, self.workload, batch, self.mto.task_input)
        rows = jacobian(losses, self.mto.shared)
        self.gramians.append(gram_matrix(rows).detach().to(torch.float64).cpu())

    def step(self, batch: Batch) -> dict[str, Any]:
        def closure() -> Losses:
            z, losses = forward(self.model, self.workload, batch, self.mto.task_input)
            return Losses(dict(zip(self.workload.task_names, losses, strict=True)), features=z)

        # a meta-batch method gets the same batch as its meta batch (the cost is what is measured)
        info = self.mto.step(closure, meta_closure=closure if self.meta else None)
        out: dict[str, Any] = {"times": info.times}
        # M of the (M + 0.1)× target: the updates per batch (a lone group is stepped twice)
        if info.sequential is not None:
            out["num_groups"] = info.updates
        if info.solver is not None and not info.solver.converged:
            out["solver_failed"] = True
        return out


def make_aggregator(label: str, num_tasks: int) -> Any:
    """TorchJD's aggregator for a contender name such as ``UPGrad`` or ``GradDrop@rep``."""
    from torchjd import aggregation

    if label.endswith(GRAM_SUFFIX):
        base = label.removeprefix(TORCHJD_PREFIX).removesuffix(GRAM_SUFFIX)
        if base not in GRAM_WEIGHTINGS:
            raise ValueError(f"TorchJD 0.18 has no Gramian weighting for {base!r}")
        weighting = getattr(aggregation, base + "Weighting")
        return weighting(c=0.5) if base == "CAGrad" else weighting()
    base = label.removeprefix(TORCHJD_PREFIX).removesuffix(REP_SUFFIX)
    if base == "CAGrad":
        return aggregation.CAGrad(c=0.5)
    if base == "NashMTL":
        return aggregation.NashMTL(n_tasks=num_tasks)
    cls = getattr(aggregation, base, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, aggregation.Aggregator):
        raise ValueError(f"TorchJD 0.18 has no aggregator {base!r}")
    return cls()


class _TorchJD(_Contender):
    """``mtl_backward`` + ``jac_to_grad`` on the shared parameters, or (``@rep``) the aggregator
    on the Jacobian of the losses with respect to the features, pushed through the encoder, or
    (``@gram``) autogram: ``Engine(encoder, batch_dim=None).compute_gramian(losses)``, the
    weighting, one ``losses.backward(w)``."""

    def __init__(self, model: BenchModel, workload: Workload, name: str) -> None:
        label = TORCHJD_PREFIX + name
        super().__init__(ContenderResult(label, "torchjd", "torchjd"), model)
        self.workload = workload
        self.aggregator = make_aggregator(name, workload.num_tasks)
        self.rep = name.endswith(REP_SUFFIX)
        self.gram_engine = None
        if name.endswith(GRAM_SUFFIX):
            from torchjd.autogram import Engine

            self.gram_engine = Engine(model.encoder, batch_dim=None)
        self.shared = list(model.encoder.parameters())
        self.tasks_params = [list(head.parameters()) for head in model.heads]
        self.head_params = [p for ps in self.tasks_params for p in ps]
        from torchjd import autojac

        self.autojac = autojac

    def step(self, batch: Batch) -> dict[str, Any]:
        self.optimizer.zero_grad()
        z, losses = forward(self.model, self.workload, batch)
        if self.gram_engine is not None:
            stacked = torch.stack(losses)
            weights = self.aggregator(self.gram_engine.compute_gramian(stacked))
            stacked.backward(weights)
        elif self.rep:
            (matrix,) = self.autojac.jac(losses, z, retain_graph=True)
            direction = self.aggregator(matrix.flatten(1))
            torch.autograd.backward(sum(losses), inputs=self.head_params, retain_graph=True)
            torch.autograd.backward(z, grad_tensors=direction.view_as(z), inputs=self.shared)
        else:
            self.autojac.mtl_backward(
                losses, features=z, tasks_params=self.tasks_params, shared_params=self.shared
            )
            self.autojac.jac_to_grad(self.shared, self.aggregator)
        self.optimizer.step()
        return {}


# ---------------------------------------------------------------------------------------------
# inner solvers alone: ours against the reference implementation on the same Gramians
#: method → the reference its solver is compared with
SOLVER_REFERENCES = {
    "nash_mtl": "authors' CCCP in cvxpy/ECOS (TorchJD 0.18 NashMTL)",
}
MAX_SOLVER_SAMPLES = 60
#: target: our solver at least this many times faster than the reference
SOLVER_MIN_SPEEDUP = 5.0


def _square_root(gram: Tensor) -> Tensor:
    """A ``K × K`` matrix ``J`` with ``J Jᵀ = gram`` (symmetric square root, negative
    eigenvalues of rounding clipped)."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0.0).sqrt()


def compare_solver(name: str, gramians: Sequence[Tensor]) -> SolverResult:
    """Replay ``gramians`` (in order) through a fresh instance of method ``name`` with its
    defaults (its ``aggregate`` on the Gramian alone: the solve plus its bookkeeping) and
    through the reference, alternating, and time each call."""
    result = SolverResult(name, SOLVER_REFERENCES[name])
    if not gramians:
        result.error = "no Gramian recorded"
        return result
    try:
        from torchjd.aggregation import NashMTL as Reference

        k = gramians[0].shape[0]
        reference = Reference(n_tasks=k)
        reference(_square_root(gramians[0]).float())  # raises here if cvxpy/ECOS is missing
    except Exception as exc:  # the reference is optional
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    from mtopt.core.method import MethodInput

    ours = mtopt.make(name)
    reference = Reference(n_tasks=k)
    names = tuple(str(i) for i in range(k))
    losses = torch.ones(k, dtype=torch.float64)
    for gram in gramians:
        inputs = MethodInput(losses, names, gramian_matrix=gram)
        matrix = _square_root(gram).float()
        t0 = time.perf_counter()
        ours.aggregate(inputs)
        t1 = time.perf_counter()
        reference(matrix)
        t2 = time.perf_counter()
        result.ours.append(t1 - t0)
        result.theirs.append(t2 - t1)
    return result


LIBMTL_PREFIX = "libmtl:"
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


def import_libmtl_weighting() -> Any:
    """``LibMTL.weighting`` (PyPI 1.1.5, installed with ``pip install --no-deps LibMTL==1.1.5``).

    Its package ``__init__`` imports model code that needs ``torchvision.models.utils`` (gone from
    recent torchvision); when torchvision is missing a stub module stands in for it (the
    weighting code never uses it). Raises ``ImportError`` when LibMTL is not installed."""
    import importlib.util
    import types

    if importlib.util.find_spec("LibMTL") is None:
        raise ImportError("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        stub = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")
        utils = types.ModuleType("torchvision.models.utils")

        def load_state_dict_from_url(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("stub: torchvision is not installed")

        utils.load_state_dict_from_url = load_state_dict_from_url  # type: ignore[attr-defined]
        stub.models, models.utils = models, utils  # type: ignore[attr-defined]
        sys.modules.update(
            {"torchvision": stub, "torchvision.models": models, "torchvision.models.utils": utils}
        )
    import LibMTL.weighting as weighting

    return weighting


def libmtl_available() -> bool:
    try:
        import_libmtl_weighting()
    except ImportError:
        return False
    return True


class _LibMTL(_Contender):
    """A LibMTL weighting strategy as its ``Trainer`` uses it: the model's backward through the
    strategy (per-task ``loss.backward`` passes, then the shared gradient reset), then the
    optimizer step. The strategy is a mixin in LibMTL; here it is bound to the bench model's
    encoder (``get_share_params``) and task count."""

    def __init__(self, model: BenchModel, workload: Workload, name: str) -> None:
        weighting, kwargs = LIBMTL_COUNTERPARTS[name]
        label = LIBMTL_PREFIX + weighting
        super().__init__(ContenderResult(label, "libmtl", "libmtl"), model)
        base = getattr(import_libmtl_weighting(), weighting)
        encoder = model.encoder
        device = next(model.parameters()).device

        class Bound(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.task_num = workload.num_tasks
                self.task_name = list(workload.task_names)
                self.device = device
                self.rep_grad = False
                self.epoch = 0

            def get_share_params(self) -> Any:
                return encoder.parameters()

            def zero_grad_share_params(self) -> None:
                encoder.zero_grad(set_to_none=False)

        self.strategy = Bound()
        self.strategy.init_param()
        own = [p for p in self.strategy.parameters() if p.requires_grad]
        if own:  # UW / IMTL loss scales: trained with the model, as in LibMTL's Trainer
            self.optimizer.add_param_group({"params": own})
        self.kwargs = kwargs
        self.workload = workload

    def step(self, batch: Batch) -> dict[str, Any]:
        self.optimizer.zero_grad(set_to_none=False)
        _, losses = forward(self.model, self.workload, batch)
        self.strategy.backward(torch.stack(losses), **self.kwargs)
        self.optimizer.step()
        return {}


# ---------------------------------------------------------------------------------------------
# memory
class MemoryProbe:
    """Peak memory of one step: CUDA's allocator statistics, or on Linux the growth of the peak
    resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``). Approximate on CPU:
    memory the allocator keeps cached from earlier steps is not counted again."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.available = self.cuda or self._proc_works()
        self._before = 0

    @property
    def description(self) -> str:
        if self.cuda:
            return (
                "CUDA: peak of torch.cuda.max_memory_allocated during the step above the "
                "allocation before it (peak statistics reset per step)"
            )
        if self.available:
            return (
                "CPU: growth of the peak resident set size during the step (VmHWM after the "
                "step − VmRSS before it, VmHWM reset by writing 5 to /proc/self/clear_refs); "
                "approximate: memory the allocator keeps cached from earlier steps, of any "
                "contender, is not counted again"
            )
        return "n/a (needs CUDA or Linux /proc/self/clear_refs)"

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def _proc_works(self) -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return self._status_kb("VmHWM") is not None and self._status_kb("VmRSS") is not None

    def start(self) -> None:
        if not self.available:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return
        self._before = (self._status_kb("VmRSS") or 0) * 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def stop(self) -> int | None:
        if not self.available:
            return None
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._before)
        peak = self._status_kb("VmHWM")
        return None if peak is None else max(0, peak * 1024 - self._before)


# ---------------------------------------------------------------------------------------------
# the run
def select_torchjd(options: BenchOptions, specs: Sequence[str], num_tasks: int) -> list[str]:
    """The TorchJD contenders of a run (names without the ``torchjd:`` prefix)."""
    if not options.torchjd:
        return []
    if options.torchjd_aggregators is not None:
        return list(options.torchjd_aggregators)
    if options.methods is None:
        return list(DEFAULT_TORCHJD)
    names: list[str] = []
    for spec in specs:
        core, engine = split_engine(spec)
        name, hparams = parse_method_spec(core)
        method = mtopt.make(name, **bench_hparams(name, hparams, num_tasks))
        label = counterpart_label(name, method.level, engine)
        if label is not None and label.removeprefix(TORCHJD_PREFIX) not in names:
            names.append(label.removeprefix(TORCHJD_PREFIX))
    return names


def _contenders(
    workload: Workload, options: BenchOptions, device: torch.device
) -> tuple[list[_Contender], list[ContenderResult]]:
    torch.manual_seed(options.seed)
    base = workload.build().to(device)
    specs = list(options.methods) if options.methods is not None else default_specs()
    ready: list[_Contender] = []
    failed: list[ContenderResult] = []

    def add(factory: Callable[[BenchModel], _Contender], label: str, kind: str) -> None:
        try:
            ready.append(factory(copy.deepcopy(base)))
        except (ValueError, TypeError, ImportError, RuntimeError) as exc:
            failed.append(ContenderResult(label, kind, kind, error=f"set-up: {exc}"))

    if options.plain:
        add(lambda m: _Plain(m, workload), PLAIN, "plain")
    for spec in specs:
        add(lambda m, s=spec: _Mtopt(m, workload, s), spec.strip(), "mtopt")
    for name in select_torchjd(options, specs, workload.num_tasks):
        add(lambda m, n=name: _TorchJD(m, workload, n), TORCHJD_PREFIX + name, "torchjd")
    if options.libmtl and libmtl_available():
        names = [parse_method_spec(split_engine(s)[0])[0] for s in specs if not split_engine(s)[1]]
        for name in LIBMTL_COUNTERPARTS:
            if name in names:
                label = LIBMTL_PREFIX + LIBMTL_COUNTERPARTS[name][0]
                add(lambda m, n=name: _LibMTL(m, workload, n), label, "libmtl")
    return ready, failed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_workload(
    workload: Workload,
    options: BenchOptions,
    progress: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """Every contender on one workload, interleaved round by round (see the module doc)."""
    device = torch.device(options.device)
    started = time.perf_counter()
    contenders, failed = _contenders(workload, options, device)
    gen = torch.Generator().manual_seed(options.seed)
    batches = [{k: v.to(device) for k, v in workload.make_batch(gen).items()} for _ in range(2)]
    order_rng = random.Random(options.seed)
    probe = MemoryProbe(device)
    results = {c.result.label: c.result for c in contenders}
    out = WorkloadResult(
        workload.name, workload.description, workload.num_tasks, results, warmup=options.warmup
    )
    phase_log: dict[str, dict[str, list[float]]] = {label: {} for label in results}
    active = list(contenders)
    rounds = options.warmup + options.steps
    for r in range(rounds):
        measured = r >= options.warmup
        order = list(active)
        order_rng.shuffle(order)
        out.order.append([c.result.label for c in order])
        batch = batches[r % len(batches)]
        for contender in order:
            res = contender.result
            try:
                if measured:
                    contender.observe(batch)
                    probe.start()
                _sync(device)
                t0 = time.perf_counter()
                extras = contender.step(batch)
                _sync(device)
                elapsed = time.perf_counter() - t0
                peak = probe.stop() if measured else None
            except Exception as exc:  # one failing contender must not end the benchmark
                res.error = f"round {r}: {type(exc).__name__}: {exc}"
                active.remove(contender)
                continue
            if measured:
                res.times.append(elapsed)
                res.peak_memory.append(peak)
                for phase, seconds in extras.get("times", {}).items():
                    phase_log[res.label].setdefault(phase, []).append(seconds)
                if "num_groups" in extras:
                    res.groups.append(extras["num_groups"])
                res.solver_failures += bool(extras.get("solver_failed"))
        if progress is not None and (r + 1 == options.warmup or r + 1 == rounds):
            stage = "warm-up" if r + 1 == options.warmup else "measured"
            progress(
                f"{workload.name}: {stage} rounds done ({time.perf_counter() - started:.0f} s)"
            )
    for label, phases in phase_log.items():
        results[label].phases = {k: statistics.median(v) for k, v in phases.items() if v}
    for res in failed:
        results[res.label] = res
    for contender in contenders:
        gramians = getattr(contender, "gramians", None)
        if gramians is not None and contender.result.error is None:
            name = parse_method_spec(split_engine(contender.result.label)[0])[0]
            if not any(s.method == name for s in out.solvers):
                out.solvers.append(compare_solver(name, gramians))
    out.seconds = time.perf_counter() - started
    return out


def machine_info(options: BenchOptions) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, device, load."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": options.device,
    }
    if options.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import torchjd

        info["torchjd"] = getattr(torchjd, "__version__", None) or _dist_version("torchjd")
    except ImportError:
        info["torchjd"] = None
    info["libmtl"] = _dist_version("LibMTL")
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_bench(
    options: BenchOptions,
    progress: Callable[[str], None] | None = None,
    command: str = "",
) -> BenchResult:
    """Measure every workload of ``options``; nothing is written (see :func:`write_outputs`)."""
    options.validate()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.torchjd and not torchjd_available():
        if progress is not None:
            progress("TorchJD is not installed: its aggregators are not measured")
        options = _replace(options, torchjd=False)
    machine = machine_info(options)
    results = []
    memory = MemoryProbe(torch.device(options.device)).description
    # the engine logs every unconverged inner solve; the bench counts them instead
    engine_log = logging.getLogger("mtopt")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)
    try:
        for name in options.workloads:
            results.append(run_workload(get_workload(name), options, progress))
    finally:
        engine_log.setLevel(level)
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return BenchResult(options, results, machine, memory, command)


def _replace(options: BenchOptions, **changes: Any) -> BenchOptions:
    from dataclasses import replace

    return replace(options, **changes)


# ---------------------------------------------------------------------------------------------
# targets
@dataclass(frozen=True)
class TargetCheck:
    """One performance target, evaluated on one contender.

    Attributes:
        target: what is required (e.g. ``loss-only ≤ 1.05× plain``).
        workload: the workload it was measured on.
        label: the contender.
        ratio: the measured ratio of medians (``None``: the reference could not be measured).
        limit: the largest ratio that meets the target.
        met: ``ratio ≤ limit`` (``None`` when ``ratio`` is).
        note: why a target could not be evaluated.
    """

    target: str
    workload: str
    label: str
    ratio: float | None
    limit: float
    met: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("met" if self.met else "MISSED")


def evaluate_targets(result: BenchResult) -> list[TargetCheck]:
    """The targets, on every contender they apply to (nothing fails; see ``met``):

    * loss-level methods (no closure re-run) ≤ 1.05× the plain step, on every workload;
    * representation-level methods ≤ 1.5× plain on ``mlp11`` (K = 11);
    * each mtopt method with a TorchJD counterpart ≤ 1.0× that counterpart (``n/a`` when the
      counterpart was set up but could not be measured);
    * ``selective_groups`` (any method reporting ``num_groups``) ≤ (M + 0.1)× plain: each
      measured step's time over the plain median minus that step's M, the median of that
      excess ≤ 0.1 (reported as median M + excess; the plain ratio when steps and group
      counts do not pair up);
    * each compared inner solver (Nash-MTL) ≥ 5× faster than its reference per solve
      (ratio ≤ 0.2).
    """
    checks: list[TargetCheck] = []

    def add(target: str, w: WorkloadResult, label: str, ratio: float | None, limit: float) -> None:
        if ratio is not None:
            checks.append(TargetCheck(target, w.name, label, ratio, limit, ratio <= limit))

    for w in result.workloads:
        for label, c in w.contenders.items():
            if c.kind != "mtopt" or not c.times:
                continue
            plain_ratio = w.ratio_to_plain(label)
            if c.category == "loss":
                add(f"loss-only ≤ {LOSS_ONLY_MAX}× plain", w, label, plain_ratio, LOSS_ONLY_MAX)
            if c.category == "rep" and w.name == REP_TARGET_WORKLOAD:
                target = f"rep-level ≤ {REP_MAX}× plain at K = {w.num_tasks}"
                add(target, w, label, plain_ratio, REP_MAX)
            if c.counterpart is not None and c.counterpart in w.contenders:
                target = f"≤ {COUNTERPART_MAX}× {c.counterpart}"
                ratio = w.ratio_to_torchjd(label)
                if ratio is None:
                    theirs = w.contenders[c.counterpart]
                    note = theirs.error or "not measured"
                    checks.append(
                        TargetCheck(target, w.name, label, None, COUNTERPART_MAX, None, note)
                    )
                else:
                    add(target, w, label, ratio, COUNTERPART_MAX)
            groups = c.median_groups
            if groups is not None:
                limit = groups + GROUPS_SLACK
                ratio = plain_ratio
                base = w.plain_median
                if base and len(c.groups) == len(c.times):
                    # M varies from step to step: judge each step against its own M, i.e. the
                    # median excess t/plain − M over the steps, reported as M̃ + excess
                    excess = statistics.median(
                        t / base - g for t, g in zip(c.times, c.groups, strict=True)
                    )
                    ratio = groups + excess
                add(f"≤ (M + {GROUPS_SLACK})× plain, M = {groups:g}", w, label, ratio, limit)
        for solver in w.solvers:
            target = f"{solver.method} solver ≥ {SOLVER_MIN_SPEEDUP:g}× faster than the reference"
            limit = 1.0 / SOLVER_MIN_SPEEDUP
            if solver.ratio is None:
                note = solver.error or "not measured"
                checks.append(TargetCheck(target, w.name, solver.method, None, limit, None, note))
            else:
                add(target, w, solver.method, solver.ratio, limit)
    return checks


# ---------------------------------------------------------------------------------------------
# reports
def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def markdown_table(w: WorkloadResult) -> str:
    """One workload's table: one row per contender."""
    lines = [
        "| contender | kind | median ms | min ms | max ms | × plain | × TorchJD | "
        "Jacobian ms | method ms | peak Δmem MB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, c in w.contenders.items():
        notes = []
        if c.counterpart is not None:
            notes.append(f"vs {c.counterpart}")
        libmtl = w.ratio_to_libmtl(label)
        if libmtl is not None:
            weighting = LIBMTL_COUNTERPARTS[label.split(":")[0].strip()][0]
            notes.append(f"{libmtl:.2f}× {LIBMTL_PREFIX}{weighting}")
        if c.groups:
            notes.append(
                f"M = {c.median_groups:g} group updates per batch ({min(c.groups)}–{max(c.groups)})"
            )
        if c.solver_failures:
            notes.append(f"solver not converged on {c.solver_failures}/{len(c.times)} steps")
        if c.error is not None:
            notes.append(f"FAILED {c.error}")
        kind = c.kind if c.kind != "mtopt" else f"mtopt/{c.category}"
        lines.append(
            f"| `{label}` | {kind} | {_ms(c.median)} | {_ms(c.min)} | {_ms(c.max)} | "
            f"{_ratio(w.ratio_to_plain(label))} | {_ratio(w.ratio_to_torchjd(label))} | "
            f"{_ms(c.phases.get('gradients'))} | {_ms(c.phases.get('method'))} | "
            f"{_mb(c.peak)} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def summary_table(result: BenchResult) -> str:
    """Every contender across the workloads: median ms, × plain and × TorchJD per workload."""
    labels: list[str] = []
    for w in result.workloads:
        labels += [label for label in w.contenders if label not in labels]
    head = "| contender |" + "".join(
        f" {w.name} ms | × plain | × TorchJD |" for w in result.workloads
    )
    rule = "|---|" + "---:|---:|---:|" * len(result.workloads)
    lines = [head, rule]
    for label in labels:
        cells = []
        for w in result.workloads:
            c = w.contenders.get(label)
            if c is None or c.median is None:
                cells += ["—" if c is None else "failed", "", ""]
                continue
            cells += [
                _ms(c.median),
                _ratio(w.ratio_to_plain(label)),
                _ratio(w.ratio_to_torchjd(label)),
            ]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(checks: Sequence[TargetCheck]) -> str:
    """The targets as a markdown table."""
    lines = [
        "| target | workload | contender | ratio | limit | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for t in checks:
        ratio = "—" if t.ratio is None else f"{t.ratio:.3f}×"
        verdict = t.verdict + (f" ({t.note})" if t.note else "")
        lines.append(
            f"| {t.target} | {t.workload} | `{t.label}` | {ratio} | {t.limit:.2f}× | {verdict} |"
        )
    return "\n".join(lines)


def solver_table(w: WorkloadResult) -> str:
    """Inner solvers alone, on the Gramians of the method's measured steps."""
    lines = [
        "Inner solver alone, on the Gramians of the method's own measured steps (replayed in "
        "order, alternating):",
        "",
        "| method | reference | solves | ours median ms | reference median ms | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in w.solvers:
        if s.ratio is None:
            lines.append(f"| `{s.method}` | {s.reference} | — | — | — | {s.error} |")
            continue
        lines.append(
            f"| `{s.method}` | {s.reference} | {len(s.ours)} | "
            f"{_ms(statistics.median(s.ours))} | {_ms(statistics.median(s.theirs))} | "
            f"{1 / s.ratio:.1f}× |"
        )
    return "\n".join(lines)


def _target_summary(checks: Sequence[TargetCheck]) -> str:
    met = sum(t.met is True for t in checks)
    missed = sum(t.met is False for t in checks)
    unknown = len(checks) - met - missed
    return f"{met} met, {missed} missed" + (f", {unknown} not evaluable" if unknown else "")


def markdown_report(result: BenchResult) -> str:
    """The whole report: set-up, one table per workload, the targets."""
    m, o = result.machine, result.options
    lines = ["# mtopt bench", ""]
    if result.command:
        lines += [f"Command: `{result.command}`", ""]
    lines += [
        f"- torch {m.get('torch')}, TorchJD {m.get('torchjd') or 'not measured'}, Python "
        f"{m.get('python')}, {m.get('platform')}",
        f"- device {o.device}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, "
        f"{m.get('threads')} torch thread(s), {m.get('cpu_count')} CPU(s); load average "
        f"{m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end",
        f"- {o.warmup} warm-up + {o.steps} measured rounds per workload; each round every "
        f"contender steps once, in an order shuffled per round (seed {o.seed}); Adam lr {LR}",
        "- LibMTL: not installed — not measured"
        if not m.get("libmtl")
        else f"- LibMTL {m['libmtl']} (`--no-deps`, torchvision stubbed): its weighting "
        "strategies as rows `libmtl:<Name>`; an mtopt row's notes give its ratio to them",
        f"- memory: {result.memory}",
        "",
    ]
    if len(result.workloads) > 1:
        lines += ["## Summary", "", summary_table(result), ""]
    for w in result.workloads:
        lines += [
            f"## {w.name}",
            "",
            w.description + f" ({w.seconds:.0f} s).",
            "",
            markdown_table(w),
            "",
        ]
        if w.solvers:
            lines += [solver_table(w), ""]
    checks = evaluate_targets(result)
    lines += ["## Targets", "", _target_summary(checks) + ".", ""]
    if checks:
        lines += [targets_table(checks), ""]
    return "\n".join(lines)


def plot_ratios(result: BenchResult, path: Path) -> Path:
    """Bar chart per workload (log scale): median step time over the plain step's, TorchJD's
    counterpart (hatched) next to ours, TorchJD's other aggregators at the end."""
    from mtopt.report.plots import _pyplot

    plt = _pyplot()
    from matplotlib import ticker

    n = len(result.workloads)
    fig, axes = plt.subplots(n, 1, figsize=(14, 4.2 * n), squeeze=False)
    for ax, w in zip(axes[:, 0], result.workloads, strict=True):
        ours = [lab for lab, c in w.contenders.items() if c.kind in ("plain", "mtopt")]
        paired = {w.contenders[lab].counterpart for lab in ours} - {None}
        alone = [
            lab for lab, c in w.contenders.items() if c.kind == "torchjd" and lab not in paired
        ]
        xs, names = [], []
        for i, lab in enumerate([*ours, *alone]):
            c = w.contenders[lab]
            ratio = w.ratio_to_plain(lab)
            xs.append(i)
            names.append(lab.removeprefix(TORCHJD_PREFIX) if c.kind == "torchjd" else lab)
            if ratio is None:
                continue
            color = {"plain": "0.5", "mtopt": "C0", "torchjd": "C1"}[c.kind]
            hatch = "//" if c.kind == "torchjd" else None
            theirs = None if c.counterpart is None else w.ratio_to_plain(c.counterpart)
            if theirs is None:
                ax.bar(i, ratio, 0.8, color=color, hatch=hatch)
            else:
                ax.bar(i - 0.2, ratio, 0.4, color=color)
                ax.bar(i + 0.2, theirs, 0.4, color="C1", hatch="//")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("median step / plain step")
        ax.set_title(f"{w.name} (K = {w.num_tasks})", fontsize=10)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="C0"),
        plt.Rectangle((0, 0), 1, 1, color="C1", hatch="//"),
        plt.Rectangle((0, 0), 1, 1, color="0.5"),
    ]
    axes[0, 0].legend(handles, ["mtopt", "TorchJD 0.18", "plain"], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: BenchResult, out_dir: Path, plot: bool = True) -> list[Path]:
    """``bench.md``, ``bench.json`` and (with ``plot``) ``bench.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.md", out_dir / "bench.json"]
    written[0].write_text(markdown_report(result))
    written[1].write_text(json.dumps(result.to_dict(), indent=1))
    if plot:
        written.append(plot_ratios(result, out_dir / "bench.png"))
    return written


# ---------------------------------------------------------------------------------------------
# the CLI's entry point
def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """:class:`BenchOptions` from the parsed ``mtopt bench`` flags."""
    aggregators = _split(getattr(args, "torchjd_aggregators", None))
    return BenchOptions(
        workloads=_split(args.workloads) or WORKLOADS,
        steps=args.steps,
        warmup=args.warmup,
        methods=_split(args.methods),
        torchjd=not args.no_torchjd,
        libmtl=not getattr(args, "no_libmtl", False),
        torchjd_aggregators=aggregators,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
        out_dir=args.out_dir,
    )


def command_line(options: BenchOptions) -> str:
    """The ``mtopt bench`` command that reproduces ``options`` (for the report)."""
    words = [
        "mtopt bench",
        f"--workloads {','.join(options.workloads)}",
        f"--steps {options.steps}",
        f"--warmup {options.warmup}",
    ]
    if options.methods is not None:
        words.append(f"--methods '{','.join(options.methods)}'")
    if not options.torchjd:
        words.append("--no-torchjd")
    elif options.torchjd_aggregators is not None:
        words.append(f"--torchjd-aggregators {','.join(options.torchjd_aggregators)}")
    if not options.libmtl:
        words.append("--no-libmtl")
    if options.threads is not None:
        words.append(f"--threads {options.threads}")
    words += [f"--device {options.device}", f"--seed {options.seed}"]
    if options.out_dir is not None:
        words.append(f"--out-dir {options.out_dir}")
    return " ".join(words)


def main(args: argparse.Namespace) -> int:
    """Run ``mtopt bench`` from parsed options: print the tables and the targets, write the
    files to ``--out-dir``. Returns 0 (missed targets are reported, not failures)."""
    options = options_from_args(args)
    options.validate()
    command = command_line(options)

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    print(
        f"mtopt bench — {', '.join(options.workloads)}: {options.warmup} warm-up + "
        f"{options.steps} measured interleaved rounds, device {options.device}",
        file=sys.stderr,
    )
    result = run_bench(options, progress, command)
    print(markdown_report(result))
    print(f"targets: {_target_summary(evaluate_targets(result))} (table above)")
    if not result.machine.get("libmtl"):
        print("LibMTL: not installed — not measured.")
    if options.out_dir is not None:
        for path in write_outputs(result, options.out_dir):
            print(f"wrote {path}")
    return 0
