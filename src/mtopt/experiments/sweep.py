"""Grid search with Gama & Grassi's selection protocol (``docs/protocol.md``).

1. **Single-task references.** For every task and every shared configuration of the grid
   (lr × dropout × weight decay), runs with the first ``n_val_runs`` seeds. Each *metric* picks
   the configuration with the best mean validation value (each run keeps, per metric, its best
   validation epoch); that configuration is re-run up to ``n_best_runs`` seeds and the metric's
   validation and test references are the means over those runs.
2. **Methods.** For every method, every configuration of (shared grid × the method's own grid),
   runs with the first ``n_val_runs`` seeds; each run keeps its best-validation-Δm epoch; the
   configuration's score is the mean of those best validation Δm. The best configuration is
   re-run up to ``n_best_runs`` seeds; reported test metrics and Δm are means (and std) over
   those runs.
   A method's grid may also name shared keys (``lr``, ``dropout``, ``weight_decay``): they
   override the shared grid for that method only (the paper selects, per method, its own
   learning rate and dropout; Gama & Grassi, Appendix A.6). Likewise ``references`` maps a task
   to shared keys that override the grid for that task's single-task runs.
3. **Fixed weights from an SMTO** (``fixed_from``): the per-epoch mean weights logged by the
   SMTO's best-configuration run (its first seed), normalised to sum 1, smoothed by an EMA over
   epochs (β = 0.9, started at the first epoch), last value renormalised; then a ``fixed`` run
   with those weights and the SMTO's best shared hyperparameters, ``n_best_runs`` seeds.

**A study in progress** (``stored_only``: ``mtopt sweep --stored``): nothing trains; the result
is what the store holds. Once the references are stored, a method whose grid runs are all stored
is a row with the selected configuration's seeds stored so far (its ``keys``; the report's
``seeds`` column); the others are listed in ``pending`` with what they wait for.

Run ``i`` of a configuration uses seed ``random_seed + i``. Runs are stored in a
:class:`~mtopt.experiments.database.RunDatabase` by their config hash; a finished run is never
redone, so a killed sweep restarted with the same file resumes where it stopped (a run cut short,
from its last epoch). The configurations of each phase run on :mod:`mtopt.experiments.runner`: a
process pool (``workers``, default one per core), each worker with one torch thread
(``threads``), or another :class:`Executor` (a Ray cluster:
:class:`mtopt.experiments.executors.RayExecutor`); whatever trains them, the process that runs the
sweep claims each run and writes its record through the same store.
"""

from __future__ import annotations

import itertools
import statistics
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtopt.core.hparams import PositiveInt, SeedCount, StudySeed, describe_fields
from mtopt.errors import ConfigError
from mtopt.evaluation.metrics import delta_m, delta_m_flat, mean_rank, mean_table
from mtopt.evaluation.statistics import sample_std
from mtopt.experiments.database import RunDatabase, code_version
from mtopt.experiments.runner import Executor, Progress, Runner
from mtopt.experiments.train import (
    References,
    RunConfig,
    run_key,
)
from mtopt.specs import format_spec, optimizer_label, parse_spec, parse_value, run_options

SharedKey = Literal["lr", "dropout", "weight_decay"]
BaseKey = Literal[
    "epochs",
    "train_subset",
    "eval_subset",
    "batch_size",
    "lr_decay",
    "lr_schedule",
    "optimizer",
    "apt",
    "engine",
    "device",
]
#: the same keys, as tuples (one list: the Literals above)
SHARED_KEYS: tuple[str, ...] = get_args(SharedKey)
BASE_KEYS: tuple[str, ...] = get_args(BaseKey)
#: the keys of a grid: any names, or the shared keys only (a mapping is invariant in its keys)
_Key = TypeVar("_Key", bound=str)


#: A grid value as written in a sweep file: a number, a boolean or a string (a spec's choice).
Scalar = bool | int | float | str
#: A grid: one value, or a non-empty list of them.
Grid = Annotated[list[Scalar], Field(min_length=1)]
# A name that is a plain file name (the sweep's result is ``RUN_DIR/sweeps/NAME.json``); not
# a documented alias: Sphinx would render its regex pattern as reStructuredText.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=120)]


def _built(where: str, build: Callable[[], RunConfig]) -> RunConfig:
    """``build()``, a run configuration validation failure as one ``where: ...`` line."""
    try:
        return build()
    except ValidationError as exc:
        raise ValueError(f"{where}: {describe_fields(exc)}") from None
    except ConfigError as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix('run configuration: ')}") from None


def _default_grid() -> dict[SharedKey, list[Scalar]]:
    """The shared grid of a sweep file without one: ``lr = 1e-3``."""
    return {"lr": [1e-3]}


def _replaced(base: RunConfig, changes: Mapping[str, Any]) -> Callable[[], RunConfig]:
    """The builder of ``base`` with ``changes`` (for :func:`_built`)."""

    def build() -> RunConfig:
        return replace(base, **changes)

    return build


def _listed(value: Any) -> Any:
    """A scalar grid entry stands for a one-point grid."""
    return value if isinstance(value, list | tuple) else [value]


class SweepConfig(BaseModel):
    """What a sweep runs (a sweep file; the module doc). ``methods`` maps a method spec (``name``
    or ``name:key=value``, fixed hyperparameters) to the grid of its own hyperparameters, which
    may also set the shared keys (``lr``, ``dropout``, ``weight_decay``) for that method only;
    ``references`` does the same per task for the single-task runs.

    Validated when read (pydantic): required keys, types, non-empty grids, a ``name`` that is a
    plain file name, ``fixed_from`` a list of the sweep's methods; then every point of every grid
    is built once (the method with its hyperparameters, the run configuration), so a bad entry
    fails in one line before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    problem: str
    methods: dict[str, dict[str, Grid]] = Field(min_length=1)
    grid: dict[SharedKey, Grid] = Field(default_factory=_default_grid)
    base: dict[BaseKey, Any] = Field(default_factory=dict)
    n_val_runs: SeedCount = 1
    n_best_runs: SeedCount = 1
    random_seed: StudySeed = 1
    fixed_from: list[str] = Field(default_factory=list)
    name: FileName = "sweep"
    #: the gradient-cosine diagnostic (Gama & Grassi): every N steps of the multi-task runs of
    #: the methods in ``cosine_methods``, log the mean pairwise cosine of the task gradients
    cosine_every: PositiveInt | None = None
    #: the methods (names) whose runs log the cosine diagnostic; the paper logs it for unitary
    cosine_methods: list[str] = Field(default_factory=lambda: ["unitary"])
    #: task → shared keys (scalars or lists) overriding the grid for its single-task runs
    references: dict[str, dict[SharedKey, Grid]] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"sweep: {describe_fields(exc)}") from None

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _listed(v) for k, v in value.items()}
        return value

    @field_validator("methods", "references", mode="before")
    @classmethod
    def _nested_lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: ({g: _listed(v) for g, v in (grid or {}).items()} if isinstance(grid, dict)
                    else grid)
                for k, grid in value.items()
            }  # fmt: skip
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if self.n_val_runs > self.n_best_runs:
            raise ValueError(
                f"need n_val_runs <= n_best_runs, got {self.n_val_runs}, {self.n_best_runs}"
            )
        unknown = [m for m in self.fixed_from if m not in self.methods]
        if unknown:
            raise ValueError(f"fixed_from names methods that are not in the sweep: {unknown}")
        base = _built("base", self.base_config)
        for point in _combinations(self.grid):
            _built("grid", _replaced(base, point))
        for task, overrides in self.references.items():
            for point in _combinations(overrides):
                _built(f"references.{task}", _replaced(base, point))
        for spec, grid in self.methods.items():
            parsed = parse_spec(spec)
            options = run_options(parsed)
            twice = sorted(set(grid) & set(parsed.hparams))
            if twice:
                raise ValueError(
                    f"methods.{spec}: {', '.join(twice)} set by the spec and by its grid: keep one"
                )
            for combo in _combinations(grid):  # every grid point must build (fail fast)
                own = {k: v for k, v in combo.items() if k not in SHARED_KEYS}
                shared = {**{k: v for k, v in combo.items() if k in SHARED_KEYS}, **options}
                _built(f"methods.{spec}", _replaced(base, shared))
                parse_spec(format_spec(parsed.name, {**parsed.hparams, **own}))
        return self

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
        """Read a TOML file; ``overrides`` are ``dotted.key=value`` (lists as ``a/b``), e.g.
        ``base.epochs=2``, ``grid.lr=0.001/0.0005``, ``methods.cagrad.c=0.8``, ``n_val_runs=2``.
        Any problem is one :class:`~mtopt.errors.ConfigError` line naming the file."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"no sweep file {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder, not a sweep file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        data.setdefault("name", path.stem)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: use dotted.key=value")
            *parents, leaf = key.strip().split(".")
            node = data
            for part in parents:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {item!r}: {part!r} is not a table in {path}")
                node = child
            node[leaf] = parse_value(value.strip())
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {str(exc).removeprefix('sweep: ')}") from None

    def seeds(self, count: int) -> list[int]:
        return [self.random_seed + i for i in range(count)]

    def shared_configs(self) -> list[dict[str, Any]]:
        return _combinations(self.grid)

    def base_config(self) -> RunConfig:
        base = dict(self.base)
        if base.get("lr_decay") == 0:  # as on the command line: 0 disables the decay
            base["lr_decay"] = None
        return RunConfig(problem=self.problem, **base)


@dataclass
class MethodResult:
    """The selected configuration of one method (or of a fixed-weights run)."""

    label: str
    hparams: dict[str, Any]
    shared: dict[str, Any]
    val_score: float
    grid_scores: list[tuple[dict[str, Any], float]]
    test: dict[str, dict[str, float]]
    test_std: dict[str, dict[str, float]]
    delta_m: list[float]
    step_seconds: float
    keys: list[str]
    weights: list[float] | None = None
    mean_rank: float | None = None
    #: per-seed flat per-metric Δm (Nash-MTL's form, same sign: higher is better)
    delta_m_flat: list[float] | None = None
    #: runs of the selected configuration that failed (left out of the means)
    failed_runs: int = 0
    #: the row's base optimizer (``adam``, ``apt``, ``muon``, ``muon+apt``)
    optimizer: str = "adam"
    #: per-seed Δm against single-task references trained with the row's own base optimizer
    #: (``None`` when that is the sweep's base optimizer: then it is ``delta_m``)
    delta_m_own: list[float] | None = None


@dataclass
class SweepResult:
    config: SweepConfig
    directions: dict[str, dict[str, bool]]
    references: dict[str, dict[str, dict[str, float]]]
    reference_configs: dict[str, dict[str, dict[str, Any]]]
    rows: list[MethodResult]
    runs: int
    code_version: str
    database: str = ""
    #: test references per other base optimizer (``muon``, ``apt``, ...), for ``delta_m_own``
    optimizer_references: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: a study in progress (``stored_only``): each row not yet shown → what it waits for
    pending: dict[str, str] = field(default_factory=dict)
    #: a study in progress: the runs not stored yet that have an epoch checkpoint (in flight, or
    #: cut short and resumable), each "what, lr, seed: epoch e of n"
    in_flight: list[str] = field(default_factory=list)
    #: rows with no configuration that trained (a failed run at every grid point) → why; a
    #: finished study shows them here, not as rows
    failed: dict[str, str] = field(default_factory=dict)
    #: single-task references whose selected configuration had failed runs: ``task/metric``
    #: (with `` (optimizer)`` when not the sweep's Adam) → how many, left out of its mean
    reference_failed_runs: dict[str, int] = field(default_factory=dict)
    #: the study's stored runs by phase (``Runner.cost``): label → runs and the sum of their
    #: wall times in seconds (each run counted once)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "problem": self.config.problem,
            "config": {
                "methods": self.config.methods,
                "grid": self.config.grid,
                "base": self.config.base,
                "n_val_runs": self.config.n_val_runs,
                "n_best_runs": self.config.n_best_runs,
                "random_seed": self.config.random_seed,
                "fixed_from": self.config.fixed_from,
                "cosine_every": self.config.cosine_every,
                "cosine_methods": self.config.cosine_methods,
                "references": self.config.references,
            },
            "database": self.database,
            "directions": self.directions,
            "references": self.references,
            "reference_configs": self.reference_configs,
            "optimizer_references": self.optimizer_references,
            "rows": [vars(r) for r in self.rows],
            "runs": self.runs,
            "code_version": self.code_version,
            "pending": self.pending,
            "in_flight": self.in_flight,
            "failed": self.failed,
            "reference_failed_runs": self.reference_failed_runs,
            "cost": self.cost,
        }


def run_keys(result: Mapping[str, Any]) -> set[str]:
    """The run keys the rows of ``result`` (a written sweep result, as :meth:`SweepResult.to_dict`
    gives it) were made from."""
    return {key for row in result["rows"] for key in row["keys"]}


def records_of(result: Mapping[str, Any], db: RunDatabase) -> dict[str, dict[str, Any]]:
    """The stored records of :func:`run_keys`, by run key. A key the store does not hold is left
    out: the caller decides whether that is an error (a check of a committed table, or a report,
    demands every run)."""
    return {key: record for key in sorted(run_keys(result)) if (record := db.get(key)) is not None}


def _all_stored(
    records: Sequence[dict[str, Any] | None],
    label: str,
    in_flight: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """``records``, all stored; else (a study in progress) a one-line error, naming the runs in
    flight (``Runner.in_flight``)."""
    missing = sum(r is None for r in records)
    if missing:
        flying = f" (in flight: {'; '.join(in_flight.values())})" if in_flight else ""
        raise ConfigError(
            f"{label}: {missing} of {len(records)} run(s) are not stored yet{flying}; a study "
            "in progress is shown once its single-task references are stored"
        )
    return cast(list[dict[str, Any]], list(records))


def _score(values: Sequence[float | None]) -> float:
    """Mean of the runs' scores; ``-inf`` if any run failed or is not finite (never selected
    over a configuration that trained)."""
    if any(v is None or not np.isfinite(v) for v in values):
        return float("-inf")
    return statistics.fmean(values)  # type: ignore[arg-type]


def _usable(records: Sequence[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    ok = [r for r in records if "failed" not in r]
    if not ok:
        raise RuntimeError(
            f"{label}: every run of the selected configuration failed: {records[0]['failed']}"
        )
    return ok


# -- the protocol --------------------------------------------------------------------------------
def run_sweep(
    config: SweepConfig,
    db: RunDatabase,
    workers: int | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    threads: int | None = None,
    stored_only: bool = False,
) -> SweepResult:
    """Run the sweep (the module doc) on ``db``: runs train on a pool of ``workers`` processes
    with ``threads`` torch threads each (:class:`Runner`), or on ``executor``; ``stored_only``:
    train nothing, the result of what is stored (module doc)."""
    from mtopt.problems import get_problem

    problem = get_problem(config.problem)
    directions = problem.lower_is_better()
    runner = Runner(db, workers, progress, executor, threads, stored_only)
    base = config.base_config()
    shared = config.shared_configs()
    val_seeds, best_seeds = config.seeds(config.n_val_runs), config.seeds(config.n_best_runs)

    # 1. single-task references, with the base optimizer and with every other base optimizer a
    #    method row uses (a row's Δm is then also measured against its own optimizer's)
    references, reference_configs, reference_failed = _references(config, problem, base, runner, db)
    by_optimizer: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    missing_references: list[str] = []
    for spec in config.methods:
        options = parse_spec(spec).optimizer
        label = optimizer_label(options)
        if (
            options
            and label != optimizer_label(_base_optimizer(base))
            and label not in by_optimizer
            and label not in missing_references
        ):
            try:
                refs, _, failed = _references(config, problem, replace(base, **options), runner, db)
            except ConfigError:
                if not stored_only:
                    raise
                missing_references.append(label)  # those rows are shown without Δm vs them
                continue
            by_optimizer[label] = refs
            reference_failed.update(failed)

    # 2. methods: grid × first n_val_runs seeds, then the best configuration to n_best_runs
    candidates = []
    for spec, grid in config.methods.items():
        parsed = parse_spec(spec)
        options = run_options(parsed)
        points = method_points(shared, dict(parsed.hparams), grid)
        candidates.append((spec, parsed.name, [({**p, **options}, h) for p, h in points]))
    selector = _Selector(runner, base, val_seeds, best_seeds, references, directions)
    rows = selector.select(candidates, config.cosine_every, set(config.cosine_methods))

    # 3. fixed weights extracted from SMTOs
    for label in missing_references:
        selector.pending[f"single-task references ({label})"] = "their runs"
    fixed_candidates, fixed_weights = [], {}
    for smto in config.fixed_from:
        if smto in selector.failed:
            selector.failed[f"fixed from {smto}"] = f"{smto} has no configuration that trained"
            continue
        row = next((r for r in rows if r.label == smto), None)
        first = None if row is None else db.get(row.keys[0])
        if row is None or first is None or first["config"]["seed"] != val_seeds[0]:
            selector.pending[f"fixed from {smto}"] = f"{smto}'s first seed"
            continue
        weights = extract_fixed_weights(first["history"])
        fixed_candidates.append(
            (f"fixed from {smto}", "fixed", [(row.shared, {"weights": weights})])
        )
        fixed_weights[f"fixed from {smto}"] = weights
    for fixed_row in selector.select(fixed_candidates, None, set(), "fixed weights: "):
        fixed_row.weights = fixed_weights[fixed_row.label]
        rows.append(fixed_row)

    ranks = mean_rank({r.label: r.test for r in rows}, directions) if rows else {}
    for r in rows:
        r.mean_rank = ranks[r.label]
    for r in rows:
        own = by_optimizer.get(r.optimizer)
        if own is not None:
            tests = [db.get(k) for k in r.keys]
            r.delta_m_own = [delta_m(x["test"], own["test"], directions) for x in tests if x]
    return SweepResult(
        config,
        directions,
        references,
        reference_configs,
        rows,
        runner.executed,
        code_version(),
        str(db.path),
        {label: refs["test"] for label, refs in by_optimizer.items()},
        selector.pending,
        list(runner.in_flight.values()),
        selector.failed,
        reference_failed,
        runner.cost,
    )


def _base_optimizer(config: RunConfig) -> dict[str, Any]:
    return {"optimizer": config.optimizer, "apt": config.apt}


def _references(
    config: SweepConfig, problem: Any, base: RunConfig, runner: Runner, db: RunDatabase
) -> tuple[
    dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, Any]]], dict[str, int]
]:
    """The single-task references of ``base``'s optimizer: every task over the shared grid
    (with its ``references`` overrides), each metric picking its own best configuration, which
    then runs to ``n_best_runs`` seeds. Also returns, per ``task/metric`` (suffixed with the
    optimizer when it is not Adam), how many of those seeds' runs failed and are left out of the
    reference's mean (only those with a failure)."""
    directions = problem.lower_is_better()
    shared = config.shared_configs()
    val_seeds, best_seeds = config.seeds(config.n_val_runs), config.seeds(config.n_best_runs)

    def single(task: str, point: Mapping[str, Any], seed: int) -> RunConfig:
        return replace(base, **point, method="unitary", hparams={}, tasks=(task,), seed=seed)

    unknown = sorted(set(config.references) - set(problem.task_names))
    if unknown:
        raise ValueError(f"references name tasks {unknown}; tasks are {list(problem.task_names)}")
    task_points = {
        t: _override(shared, _combinations(config.references.get(t, {})))
        for t in problem.task_names
    }
    jobs = [
        (single(t, p, s), None)
        for t in problem.task_names
        for p in task_points[t]
        for s in val_seeds
    ]
    tag = (
        ""
        if base.optimizer == "adam" and not base.apt
        else f" ({optimizer_label(_base_optimizer(base))})"
    )
    _all_stored(
        runner.stored(jobs, "single-task grid" + tag), "single-task grid" + tag, runner.in_flight
    )
    chosen: list[tuple[str, str, Mapping[str, Any]]] = []
    for task in problem.task_names:
        points = task_points[task]
        for metric, lower in directions[task].items():
            sign = -1.0 if lower else 1.0

            def score(point: Mapping[str, Any], task=task, metric=metric, sign=sign) -> float:
                # every point's runs are in the database: the grid above ran them
                runs = [
                    cast(dict[str, Any], db.get(run_key(single(task, point, s)))) for s in val_seeds
                ]
                return _score(
                    [None if "failed" in r else sign * r["val"][task][metric] for r in runs]
                )

            best = max(points, key=score)
            if score(best) == float("-inf"):
                raise RuntimeError(f"single-task {task}/{metric}: every configuration failed")
            chosen.append((task, metric, best))
    jobs = [(single(t, p, s), None) for t, _, p in chosen for s in best_seeds]
    label = "single-task selected configurations" + tag
    records = _all_stored(runner.stored(jobs, label), label, runner.in_flight)
    references: dict[str, dict[str, dict[str, float]]] = {"val": {}, "test": {}}
    reference_configs: dict[str, dict[str, dict[str, Any]]] = {}
    failed: dict[str, int] = {}
    for i, (task, metric, point) in enumerate(chosen):
        runs = _usable(records[i * len(best_seeds) : (i + 1) * len(best_seeds)], task)
        if len(runs) < len(best_seeds):
            failed[f"{task}/{metric}{tag}"] = len(best_seeds) - len(runs)
        for split in ("val", "test"):
            references[split].setdefault(task, {})[metric] = statistics.fmean(
                r[split][task][metric] for r in runs
            )
        reference_configs.setdefault(task, {})[metric] = dict(point)
    return references, reference_configs, failed


Candidate = tuple[str, str, Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]]


class _Selector:
    """The selection of ``docs/protocol.md`` for several methods at once: all their grid runs
    in one batch (so the pool is kept busy), then all the selected configurations' extra seeds
    in a second batch."""

    def __init__(
        self,
        runner: Runner,
        base: RunConfig,
        val_seeds: Sequence[int],
        best_seeds: Sequence[int],
        references: References,
        directions: Mapping[str, Mapping[str, bool]],
    ) -> None:
        self.runner, self.base = runner, base
        self.val_seeds, self.best_seeds = val_seeds, best_seeds
        self.references, self.directions = references, directions
        #: rows left out of a study in progress (``Runner.stored_only``) → what they wait for
        self.pending: dict[str, str] = {}
        #: rows whose every grid point has a failed run → the first failure
        self.failed: dict[str, str] = {}

    def select(
        self,
        candidates: Sequence[Candidate],
        cosine_every: int | None,
        cosine_methods: set[str],
        phase: str = "",
    ) -> list[MethodResult]:
        """The rows of ``candidates``: each one's grid on the validation seeds, then its best
        point on the test seeds; ``phase`` prefixes the two phases' names in the study's cost
        (the fixed-weight rows: "fixed weights: grids")."""

        def make(name: str, point: Mapping[str, Any], hparams: Mapping[str, Any], seed: int):
            return replace(
                self.base,
                **point,
                method=name,
                hparams=dict(hparams),
                seed=seed,
                cosine_every=cosine_every if name in cosine_methods else None,
            )

        refs, n_val, n_best = self.references, len(self.val_seeds), len(self.best_seeds)
        jobs = [
            (make(name, p, h, s), refs)
            for _, name, points in candidates
            for p, h in points
            for s in self.val_seeds
        ]
        records = iter(self.runner.stored(jobs, phase + "grids") if jobs else [])
        picks = []
        for label, name, points in candidates:
            groups = [[next(records) for _ in range(n_val)] for _ in points]
            missing = sum(r is None for g in groups for r in g)
            if missing:
                self.pending[label] = f"{missing} of its {n_val * len(points)} grid run(s)"
                continue
            scores = [_score([r.get("val_delta_m") for r in g if r is not None]) for g in groups]
            if max(scores) == float("-inf"):
                # no configuration to select: the row is reported as failed, and the rest of the
                # study goes on (one diverged seed of a one-point grid must not hide every row)
                errors = [r["failed"] for g in groups for r in g if r and "failed" in r]
                self.failed[label] = (
                    f"a failed run at each of its {len(points)} grid point(s): "
                    + (errors[0] if errors else "validation Δm not finite")
                )
                continue
            picks.append((label, name, points, scores, int(np.argmax(scores))))
        jobs = [
            (make(name, *points[best], s), refs)
            for _, name, points, _, best in picks
            for s in self.best_seeds
        ]
        finals = iter(self.runner.stored(jobs, phase + "selected configurations") if jobs else [])
        rows = []
        for label, _, points, scores, best in picks:
            final = [r for r in (next(finals) for _ in range(n_best)) if r is not None]
            if not final:
                self.pending[label] = "its selected configuration's runs"
                continue
            failed = sum("failed" in r for r in final)
            final = _usable(final, label)
            point, hparams = points[best]
            tests = [r["test"] for r in final]
            spread = {
                t: {m: sample_std([x[t][m] for x in tests]) for m in tests[0][t]} for t in tests[0]
            }
            rows.append(
                MethodResult(
                    label=label,
                    hparams=dict(hparams),
                    shared=dict(point),
                    val_score=scores[best],
                    grid_scores=[({**p, **h}, v) for (p, h), v in zip(points, scores, strict=True)],
                    test=mean_table(tests),
                    test_std=spread,
                    delta_m=[delta_m(t, refs["test"], self.directions) for t in tests],
                    delta_m_flat=[delta_m_flat(t, refs["test"], self.directions) for t in tests],
                    step_seconds=statistics.median(r["step_seconds_median"] for r in final),
                    keys=[r["key"] for r in final],
                    failed_runs=failed,
                    optimizer=optimizer_label({**_base_optimizer(self.base), **point}),
                )
            )
        return rows


def extract_fixed_weights(history: Sequence[Mapping[str, Any]], beta: float = 0.9) -> list[float]:
    """Fixed weights from a run (``docs/protocol.md``): per-epoch mean weights → normalised to
    sum 1 → EMA over epochs (``beta``, started at the first epoch) → last value renormalised to
    sum 1."""
    epochs = [h["mean_weights"] for h in history if h.get("mean_weights") is not None]
    if not epochs:
        raise ValueError("the run logged no weights (a method without weights?)")
    ema = None
    for w in epochs:
        w = np.asarray(w, dtype=np.float64)
        total = w.sum()
        if not total > 0:
            raise ValueError(f"cannot normalise epoch weights {w.tolist()} (sum {total})")
        w = w / total
        ema = w if ema is None else beta * ema + (1.0 - beta) * w
    assert ema is not None
    return (ema / ema.sum()).tolist()


def method_points(
    shared: Sequence[Mapping[str, Any]],
    fixed: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """A method's configurations: (shared point, hyperparameters) for every shared point and
    every point of the method's own grid; shared keys in the method's grid override the shared
    point (duplicates dropped, first occurrence kept)."""
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    seen: set[str] = set()
    for p in shared:
        for m in _combinations(grid):
            point = {**p, **{k: v for k, v in m.items() if k in SHARED_KEYS}}
            hparams = {**fixed, **{k: v for k, v in m.items() if k not in SHARED_KEYS}}
            tag = repr((sorted(point.items()), sorted(hparams.items())))
            if tag not in seen:
                seen.add(tag)
                out.append((point, hparams))
    return out


def _override(
    shared: Sequence[Mapping[str, Any]], overrides: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every shared point with every override applied, duplicates dropped (order kept)."""
    out: list[dict[str, Any]] = []
    for p in shared:
        for o in overrides:
            point = {**p, **o}
            if point not in out:
                out.append(point)
    return out


def _combinations(grid: Mapping[_Key, Sequence[Any]]) -> list[dict[str, Any]]:
    keys: list[str] = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
