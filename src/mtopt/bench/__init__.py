"""``mtopt bench``: the per-step cost of every registered method, and of TorchJD's and LibMTL's
counterparts, measured side by side in one process.

Each contender owns a deep copy of the same initial model and its own Adam, and does one full
training step (forward included) per round; every round, each contender steps once, in an order
shuffled per round with a fixed seed, so that a drift of the machine's load hits every contender
alike; the first ``warmup`` rounds are not timed. Reported: median/min/max per step, ratios of
medians to the plain step of the same run and to the counterpart, peak memory growth, and
performance targets (met or missed, never a failure).

Split by concern:

* :mod:`~mtopt.bench.workloads`: the models, random batches and losses (``lenet``, ``mlp11``,
  ``resnet3``);
* :mod:`~mtopt.bench.labels`: the contender names, in our one spec grammar
  (:mod:`mtopt.specs`: ``upgrad#gramian``, ``torchjd:MGDA:level=rep``,
  ``torchjd:UPGrad#gramian``), and the counterpart tables of TorchJD and LibMTL;
* :mod:`~mtopt.bench.contenders`: one module per kind (the plain step, mtopt methods, TorchJD,
  LibMTL with its torchvision stub);
* :mod:`~mtopt.bench.measure`: the interleaved rounds, the clock, device synchronisation, the
  memory probe;
* :mod:`~mtopt.bench.solvers`: an inner solver alone against its reference, on the Gramians of
  the method's own steps;
* :mod:`~mtopt.bench.results`, :mod:`~mtopt.bench.targets`, :mod:`~mtopt.bench.report`: what
  was measured, the targets, markdown, the chart and the files;
* :mod:`~mtopt.bench.options`, :mod:`~mtopt.bench.run`: the options, a whole run, the CLI's
  entry point :func:`main`.

No module here branches on the name of one of our methods: what the harness needs to know about
a method it reads from its class (required hyperparameters, ``gramian_only``, the level, the
capabilities of :mod:`mtopt.core.capabilities`) and from each step's typed ``StepInfo``.
"""

from mtopt.bench.contenders import (
    LR,
    MAX_SOLVER_SAMPLES,
    Contender,
    LibMTLContender,
    MtoptContender,
    PlainContender,
    StepOutcome,
    TorchJDContender,
    build_contenders,
    default_specs,
    import_libmtl_weighting,
    left_out_message,
    libmtl_available,
    make_aggregator,
    method_category,
    required_hyperparameters,
    select_torchjd,
    torchjd_available,
)
from mtopt.bench.labels import (
    COUNTERPARTS,
    DEFAULT_TORCHJD,
    GRAM_WEIGHTINGS,
    LIBMTL_COUNTERPARTS,
    LIBMTL_PREFIX,
    PLAIN,
    SOLVER_REFERENCES,
    TORCHJD_PREFIX,
    SolverReference,
    TorchJDSpec,
    counterpart_label,
    method_spec,
    parse_torchjd,
)
from mtopt.bench.measure import MemoryProbe, machine_info, run_rounds
from mtopt.bench.options import BenchOptions, command_line, options_from_args
from mtopt.bench.report import (
    markdown_report,
    markdown_table,
    plot_ratios,
    solver_table,
    summary_table,
    targets_table,
    write_outputs,
)
from mtopt.bench.results import (
    BenchResult,
    ContenderResult,
    SolverResult,
    WorkloadResult,
    result_from_dict,
)
from mtopt.bench.run import main, method_specs, run_bench, run_workload
from mtopt.bench.solvers import compare_solver, square_root
from mtopt.bench.targets import (
    COUNTERPART_MAX,
    GROUPS_SLACK,
    LOSS_ONLY_MAX,
    REP_MAX,
    REP_TARGET_WORKLOAD,
    SOLVER_MIN_SPEEDUP,
    TargetCheck,
    evaluate_targets,
    target_summary,
)
from mtopt.bench.workloads import (
    MLP_TASKS,
    WORKLOADS,
    Batch,
    BenchModel,
    LossFn,
    ResidualBlock,
    Workload,
    forward,
    get_workload,
)

__all__ = [
    "COUNTERPARTS",
    "COUNTERPART_MAX",
    "DEFAULT_TORCHJD",
    "GRAM_WEIGHTINGS",
    "GROUPS_SLACK",
    "LIBMTL_COUNTERPARTS",
    "LIBMTL_PREFIX",
    "LOSS_ONLY_MAX",
    "LR",
    "MAX_SOLVER_SAMPLES",
    "MLP_TASKS",
    "PLAIN",
    "REP_MAX",
    "REP_TARGET_WORKLOAD",
    "SOLVER_MIN_SPEEDUP",
    "SOLVER_REFERENCES",
    "TORCHJD_PREFIX",
    "WORKLOADS",
    "Batch",
    "BenchModel",
    "BenchOptions",
    "BenchResult",
    "Contender",
    "ContenderResult",
    "LibMTLContender",
    "LossFn",
    "MemoryProbe",
    "MtoptContender",
    "PlainContender",
    "ResidualBlock",
    "SolverReference",
    "SolverResult",
    "StepOutcome",
    "TargetCheck",
    "TorchJDContender",
    "TorchJDSpec",
    "Workload",
    "WorkloadResult",
    "build_contenders",
    "command_line",
    "compare_solver",
    "counterpart_label",
    "default_specs",
    "evaluate_targets",
    "forward",
    "get_workload",
    "import_libmtl_weighting",
    "left_out_message",
    "libmtl_available",
    "machine_info",
    "main",
    "make_aggregator",
    "markdown_report",
    "markdown_table",
    "method_category",
    "method_spec",
    "method_specs",
    "options_from_args",
    "parse_torchjd",
    "plot_ratios",
    "required_hyperparameters",
    "result_from_dict",
    "run_bench",
    "run_rounds",
    "run_workload",
    "select_torchjd",
    "solver_table",
    "square_root",
    "summary_table",
    "target_summary",
    "targets_table",
    "torchjd_available",
    "write_outputs",
]
