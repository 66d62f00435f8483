"""Train one run with best-validation-epoch selection (Gama & Grassi's protocol,
``docs/protocol.md``).

A multi-task run keeps the epoch with the best *validation* Δm against single-task references and
evaluates that epoch's model once on test. A single-task run (one task) keeps, for each metric,
the epoch with the best validation value of that metric. Optimiser: Adam, with an optional
per-epoch exponential learning-rate decay (γ = 0.95 in the paper's MNIST setting).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

import mtopt
from mtopt.core.capabilities import MetaBatchMethod
from mtopt.core.hparams import (
    HalfOpenUnit,
    NonNegative,
    NotBool,
    Positive,
    PositiveInt,
    RunSeed,
    describe_fields,
)
from mtopt.engine import Losses, MultiTaskOptimizer, StepInfo
from mtopt.errors import ConfigError
from mtopt.evaluation.metrics import delta_m
from mtopt.experiments import checkpoint as checkpoints
from mtopt.experiments import data_parallel
from mtopt.experiments.database import ClaimLostError, code_version
from mtopt.problems import MultiTaskModel, Problem, evaluate, get_problem
from mtopt.problems.base import Batch

logger = logging.getLogger("mtopt")

References = Mapping[str, Mapping[str, Mapping[str, float]]]  # {"val"|"test": {task: {metric}}}
Callback = Callable[[str, dict[str, Any]], None]


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class RunConfig:
    """Everything that defines a run; its :meth:`key` identifies stored results.

    Validated at construction (pydantic): types, ranges and finiteness of every field, so that a
    bad option fails before any training, in one line naming the field."""

    problem: str
    method: str = "unitary"
    hparams: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] | None = None
    epochs: PositiveInt = 10
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    dropout: HalfOpenUnit = 0.0
    batch_size: PositiveInt = 256
    #: per-epoch factor of the learning rate (ExponentialLR); ``None`` disables it
    lr_decay: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), NotBool] | None = 0.95
    #: ``exponential`` (``lr_decay`` per epoch; Gama & Grassi's MNIST and Cityscapes) or
    #: ``plateau`` (× 0.7 after 5 epochs without a lower mean training loss, down to 1e-5; their
    #: QM9 setting, which steps on the last batch's loss where we step on the epoch's mean)
    lr_schedule: Literal["exponential", "plateau"] = "exponential"
    seed: RunSeed = 1
    train_subset: PositiveInt | None = None
    eval_subset: PositiveInt | None = None
    #: base optimizer: "adam" (torch's Adam) or "muon" (Muon on hidden matrices, AdamW at ``lr``
    #: on the rest; see :func:`build_optimizer`)
    optimizer: Literal["adam", "muon"] = "adam"
    #: experimental APT (adaptive momentum) on the shared parameters' groups
    apt: bool = False
    muon_lr: Positive = 0.02
    #: every N steps, the mean cosine between each task's shared gradient and their mean
    #: (the gradient-cosine diagnostic, ``docs/protocol.md``)
    cosine_every: PositiveInt | None = None
    #: how per-task gradients are obtained (``MultiTaskOptimizer(engine=...)``; same math)
    engine: Literal["auto", "jacobian", "batched", "gramian"] = "auto"
    #: where the model and the data live: ``cpu``, ``cuda`` or ``cuda:N``
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$")] = "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = None if self.tasks is None else list(self.tasks)
        return d

    def key_fields(self) -> dict[str, Any]:
        """The fields that identify a run: ``to_dict()`` without the fields added after the first
        records when they are at their defaults (older records keep their keys), and without
        ``muon_lr`` unless Muon is used."""
        d = self.to_dict()
        if self.optimizer != "muon":
            del d["muon_lr"]
        for name, default in _KEY_NEUTRAL_DEFAULTS.items():
            if name in d and d[name] == default:
                del d[name]
        return d

    def key(self) -> str:
        blob = json.dumps(self.key_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _one_line_errors(cls: type[Any]) -> None:
    """Make a pydantic dataclass raise :class:`~mtopt.errors.ConfigError` (one line naming the
    field) instead of pydantic's multi-line ``ValidationError``; ``dataclasses.replace`` goes
    through the same ``__init__``. Changes ``cls`` in place."""
    init = cls.__init__

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(f"run configuration: {describe_fields(exc)}") from None

    cls.__init__ = checked


_one_line_errors(RunConfig)

OPTIMIZERS = ("adam", "muon")
#: fields added after the first records: left out of the key at their defaults
_KEY_NEUTRAL_DEFAULTS = {
    "optimizer": "adam",
    "apt": False,
    "muon_lr": 0.02,
    "cosine_every": None,
    "engine": "auto",
    "lr_schedule": "exponential",
    "device": "cpu",
}


def build_optimizer(config: RunConfig, model: MultiTaskModel) -> torch.optim.Optimizer:
    """The run's base optimizer. ``adam``: torch's Adam (``lr``, L2 ``weight_decay``), or with
    ``apt`` mtopt's APT-capable Adam with APT on the encoder's group only. ``muon``: Muon at
    ``muon_lr`` on the hidden matrices of the encoder and heads, AdamW at ``lr`` on the encoder's
    first layer, the heads' output layers, biases and norms; APT (if set) on the encoder's
    groups."""
    from mtopt.optim import Adam, Muon, muon_param_groups

    encoder, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    if config.optimizer == "adam":
        if not config.apt:
            return torch.optim.Adam(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        groups = [{"params": encoder, "apt": True}, {"params": heads, "apt": False}]
        return Adam(groups, lr=config.lr, weight_decay=config.weight_decay, apt=True)
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    outputs = []  # each head's output layer (its last Linear or convolution) goes to AdamW
    for head in model.heads.values():
        found = [m for m in head.modules() if isinstance(m, layers)]
        outputs += found[-1:]
    groups = muon_param_groups(model.encoder, apt=config.apt)
    groups += muon_param_groups(model.heads, first_layer=False, output_modules=outputs, apt=False)
    return Muon(
        groups,
        lr=config.muon_lr,
        adamw_lr=config.lr,
        weight_decay=config.weight_decay,
        apt=config.apt,
    )


def mean_gradient_cosine(losses: Sequence[torch.Tensor], shared: Sequence[torch.Tensor]) -> float:
    r"""The gradient-cosine diagnostic: :math:`\frac1K\sum_i\cos(g_i,\bar g)` with
    :math:`g_i` task i's gradient of the shared parameters and :math:`\bar g` their mean (a zero
    gradient counts as cosine 0)."""
    from mtopt.core.gradients import jacobian

    grads = jacobian(list(losses), list(shared)).double()
    mean = grads.mean(0)
    norms = grads.norm(dim=1) * mean.norm()
    cos = torch.where(norms > 0, grads @ mean / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return float(cos.mean())


def _improves(score: float, best: float | None) -> bool:
    """Whether an epoch's validation score replaces the best so far (``None``: the first
    epoch). A number replaces a NaN best (a metric an epoch could not compute), and a NaN never
    replaces anything: ``score > best`` alone would keep a NaN first epoch for ever.

    >>> _improves(1.0, None), _improves(1.0, 2.0), _improves(1.0, float("nan"))
    (True, False, True)
    >>> _improves(float("nan"), 1.0), _improves(2.0, 1.0)
    (False, True)
    """
    if best is None or score > best:
        return True
    return math.isnan(best) and not math.isnan(score)


def run_key(config: RunConfig, references: References | None = None) -> str:
    """The stored-result key of a run: its config, plus the validation references that decided
    its epoch selection (a multi-task run selected against other references is another run)."""
    if references is None:
        return config.key()
    blob = json.dumps([config.key_fields(), references["val"]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that orders the training batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_run(
    config: RunConfig,
    references: References | None = None,
    problem: Problem | None = None,
    callback: Callback | None = None,
    checkpoint: str | Path | None = None,
    holds: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train, select the best validation epoch(s), evaluate on test; return a JSON-able record.

    ``checkpoint``: a file the run saves its whole state to after every epoch, and resumes from
    when it exists and belongs to this run (:mod:`mtopt.experiments.checkpoint`); the record is
    then the one an uninterrupted run gives (``seconds`` and ``step_seconds_median`` aside, which
    are measured), with ``resumed`` listing each resumption. The caller deletes the file once the
    record is stored (:func:`mtopt.experiments.checkpoint.remove`), so that a kill between the
    last epoch and the store loses nothing either. One process per run: a run under torchrun
    (several ranks) takes no checkpoint. ``holds``: whether this process still holds the run's
    claim in its store (:meth:`~mtopt.experiments.database.RunDatabase.holds`), asked after each
    epoch; when it answers ``False`` the run stops there without writing its checkpoint
    (:class:`~mtopt.experiments.database.ClaimLostError`): the process that took it over owns it."""
    run = _Run(config, references, problem, callback)
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and run.world > 1:
        raise ConfigError(
            "checkpoints are kept by single-process runs; under torchrun leave checkpoint unset"
        )
    start = 0
    if path is not None:
        saved = checkpoints.load(path, run_key(config, references))
        began = {} if saved is None else saved.get("began") or {}
        data = began.get("data_digest", run.began["data_digest"])
        if saved is not None and data != run.began["data_digest"]:
            checkpoints.set_aside(
                path, f"of other data (digest {data}; the data here: {run.began['data_digest']})"
            )
        elif saved is not None:
            _warn_if_changed(run_key(config, references), began, run.began)
            try:
                start = run.restore(saved)
            except Exception as exc:  # written by code whose state no longer fits: start over
                checkpoints.set_aside(path, f"not this code's ({type(exc).__name__}: {exc})")
                run = _Run(config, references, run.problem, callback)
    for epoch in range(start, config.epochs):
        run.train_epoch(epoch)
        if holds is not None and not holds():
            raise ClaimLostError(
                f"run {run_key(config, references)}: this process no longer holds its claim "
                "(taken over after it stalled past the lease, or the store could not renew "
                f"it); stopped after epoch {epoch + 1}, its checkpoint left to the claim's holder"
            )
        if path is not None and not checkpoints.save(path, run.state(epoch + 1)):
            path = None  # warned once; the run goes on without
    return run.result()


def _warn_if_changed(key: str, began: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """A run resumed under another code version or thread count than it began with: one
    warning line (its numbers may then differ in the last bits from an uninterrupted run's, and
    its record lists each version in ``resumed`` and the first in ``began_with``)."""
    changed = [
        f"{what} {began[what]} then, {now[what]} now"
        for what in ("code_version", "threads")
        if began.get(what) is not None and began[what] != now[what]
    ]
    if changed:
        logger.warning("run %s resumes under another setting: %s", key, "; ".join(changed))


class _Run:
    """One training run (:func:`train_run`): set-up, epochs with best-epoch tracking, selection."""

    def __init__(
        self,
        config: RunConfig,
        references: References | None,
        problem: Problem | None,
        callback: Callback | None,
    ) -> None:
        problem = problem if problem is not None else get_problem(config.problem)
        tasks = config.tasks if config.tasks is not None else problem.task_names
        for t in tasks:
            problem.task(t)  # validates the name
        self.directions = {t: problem.lower_is_better()[t] for t in tasks}
        if len(tasks) > 1 and (references is None or "val" not in references):
            # the caller's mistake, raised (a ValueError would be stored as a diverged run)
            raise ConfigError(
                "a multi-task run selects its best-validation-Δm epoch and needs single-task "
                "references (run the single-task runs first, e.g. with `mtopt compare`)"
            )
        self.config, self.references, self.problem, self.callback = (
            config,
            references,
            problem,
            callback,
        )
        self.tasks = tuple(tasks)
        self.generator = seed_everything(config.seed)
        self.rank, self.world = data_parallel.rank_and_world()
        device = _device(config.device)
        splits = problem.splits()
        parts = {
            "train": splits["train"].subset(config.train_subset),
            "val": splits["val"].subset(config.eval_subset),
            "test": splits["test"].subset(config.eval_subset),
        }
        digest = hashlib.blake2b(digest_size=8)
        for name, part in parts.items():
            digest.update(f"{name};".encode())
            part.digest(digest)
        #: what the run trains on and where: kept in the checkpoint, checked when it resumes
        self.began = {
            "code_version": code_version(),
            "threads": torch.get_num_threads(),
            "data_digest": digest.hexdigest(),
        }
        self.train = parts["train"].to(device)
        self.val = parts["val"].to(device)
        self.test = parts["test"].to(device)
        self.model = problem.make_model(tasks, dropout=config.dropout).to(device)
        self.eval_batch = getattr(problem, "eval_batch_size", 1000)  # dense maps: smaller
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler: Any = None
        if config.lr_schedule == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=0.7, patience=5, min_lr=1e-5
            )
        elif config.lr_decay:
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
                self.optimizer, gamma=config.lr_decay
            )
        self.specs = [problem.task(t) for t in tasks]
        try:
            self.mto = MultiTaskOptimizer(
                self.optimizer,
                config.method,
                shared=self.model.encoder,
                tasks=tasks,
                loss_types=[s.loss_type for s in self.specs],
                engine=config.engine,
                **config.hparams,
            )
        except (ValueError, TypeError) as exc:  # nothing trained yet: the configuration's
            # mistake (an engine the method cannot use, a bad hyperparameter), raised rather
            # than stored as a diverged run
            raise ConfigError(f"{config.method}: {exc}") from None
        if self.rank:  # independent dropout masks per rank (data_parallel)
            torch.manual_seed(config.seed + self.rank)
        self.criteria = self._criteria()
        self.best: dict[str, dict[str, Any]] = {}
        self.meta_batches: _Endless | None = None
        if isinstance(self.mto.method, MetaBatchMethod):
            meta_split = {"train": self.train, "val": self.val}[str(self.mto.method.meta_split)]
            self.meta_batches = _Endless(meta_split, config.batch_size, config.seed + 1)
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.solver_failures = 0
        self.started = time.perf_counter()
        self.earlier_seconds = 0.0  # the epochs of earlier sessions (a resumed run)
        self.resumed: list[dict[str, Any]] = []
        self.device = device
        self.n_batches = (len(self.train) + config.batch_size - 1) // config.batch_size

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self, epochs_done: int) -> dict[str, Any]:
        """Everything the next epoch depends on (:mod:`mtopt.experiments.checkpoint`)."""
        return {
            "key": run_key(self.config, self.references),
            "epochs_done": epochs_done,
            "model": self.model.state_dict(),
            "mto": self.mto.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "meta_batches": None if self.meta_batches is None else self.meta_batches.state(),
            "random": checkpoints.random_state(self.device),
            "best": self.best,
            "history": self.history,
            "step_times": self.step_times,
            "solver_failures": self.solver_failures,
            "seconds": self.earlier_seconds + time.perf_counter() - self.started,
            "resumed": self.resumed,
            "began": self.began,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Continue from :meth:`state`; returns the first epoch still to train."""
        self.model.load_state_dict(state["model"])
        self.mto.load_state_dict(state["mto"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.meta_batches is not None:
            self.meta_batches.restore(state["meta_batches"])
        checkpoints.set_random_state(state["random"], self.device)
        self.best = state["best"]
        self.history = state["history"]
        self.step_times = state["step_times"]
        self.solver_failures = state["solver_failures"]
        self.earlier_seconds = state["seconds"]
        self.started = time.perf_counter()
        epochs_done = int(state["epochs_done"])
        now = {"code_version": code_version(), "threads": torch.get_num_threads()}
        self.resumed = [*state["resumed"], {"epoch": epochs_done, **now}]
        self.began = state.get("began", {**self.began, "code_version": None, "threads": None})
        return epochs_done

    def _criteria(self) -> dict[str, Callable[[dict], float]]:
        """Validation scores to select epochs by (higher is better): Δm for a multi-task run,
        each metric for a single-task run."""
        tasks, references = self.tasks, self.references
        if len(tasks) > 1:
            assert references is not None
            return {"delta_m": lambda val_m: delta_m(val_m, references["val"], self.directions)}
        return {
            metric: _metric_score(tasks[0], metric, lower)
            for metric, lower in self.directions[tasks[0]].items()
        }

    def _closures(self, batch: Batch) -> tuple[Callable[[], Losses], Callable[[], Any] | None]:
        model, mto, specs = self.model, self.mto, self.specs

        def closure() -> Losses:
            z, outputs = model(batch["x"], mto.task_input)
            return Losses({s.name: s.loss(outputs[s.name], batch) for s in specs}, features=z)

        if self.meta_batches is None:
            return closure, None
        meta = data_parallel.shard(next(self.meta_batches), self.rank, self.world)

        def meta_closure() -> dict[str, torch.Tensor]:
            _, outputs = model(meta["x"], mto.task_input)
            return {s.name: s.loss(outputs[s.name], meta) for s in specs}

        return closure, meta_closure

    def _cosine(self, closure: Callable[[], Losses]) -> float:
        """The gradient-cosine diagnostic; the run's random stream and buffers (BatchNorm
        statistics) are left as they were."""
        saved = [b.detach().clone() for b in self.model.buffers()]
        with torch.random.fork_rng():
            # this run's closures name their losses (``_closures``): a mapping
            losses = cast(Mapping[str, torch.Tensor], closure().losses)
            value = mean_gradient_cosine(list(losses.values()), self.mto.shared)
        with torch.no_grad():
            for b, old in zip(self.model.buffers(), saved, strict=True):
                b.copy_(old)
        return value

    def train_epoch(self, epoch: int) -> None:
        config, mto = self.config, self.mto
        self.model.train()
        log = _EpochLog(self.tasks)
        for i, batch in enumerate(self.train.batches(config.batch_size, True, self.generator)):
            closure, meta_closure = self._closures(
                data_parallel.shard(batch, self.rank, self.world)
            )
            if config.cosine_every and mto.step_count % config.cosine_every == 0:
                log.cosines.append(self._cosine(closure))
            info = mto.step(closure, meta_closure=meta_closure)
            self.step_times.append(info.times["total"])
            log.add(info)
            if self.callback is not None:
                progress = {"epoch": epoch, "batch": i, "batches": self.n_batches, "info": info}
                self.callback("step", progress)
        self.solver_failures += log.failures
        mto.end_epoch()
        val_metrics = self._evaluate(self.val)
        record = log.record(epoch, self.n_batches, val_metrics, self.optimizer)
        for name, score_fn in self.criteria.items():
            score = score_fn(val_metrics)
            record[f"score_{name}"] = score
            if _improves(score, self.best[name]["score"] if name in self.best else None):
                self.best[name] = {
                    "epoch": epoch,
                    "score": score,
                    "state": copy.deepcopy(self.model.state_dict()),
                    "method_state": copy.deepcopy(mto.method.state_dict()),
                }
        self.history.append(record)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(sum(record["train_loss"].values()))
        elif self.scheduler is not None:
            self.scheduler.step()
        if self.callback is not None:
            self.callback("epoch", record)

    def _evaluate(self, split: Any) -> dict[str, dict[str, float]]:
        return evaluate(
            self.model,
            self.problem,
            split,
            batch_size=self.eval_batch,
            task_input=self.mto.task_input,
        )

    def result(self) -> dict[str, Any]:
        """Each criterion's best epoch evaluated on test, and the run's record."""
        tasks, references = self.tasks, self.references
        val_best: dict[str, dict[str, float]] = {t: {} for t in tasks}
        test_best: dict[str, dict[str, float]] = {t: {} for t in tasks}
        selection = {}
        for name, chosen in self.best.items():
            self.model.load_state_dict(chosen["state"])
            self.mto.method.load_state_dict(chosen["method_state"])  # e.g. RotoGrad's rotations
            test_metrics = self._evaluate(self.test)
            val_metrics = self.history[chosen["epoch"]]["val"]
            selection[name] = {"epoch": chosen["epoch"], "val_score": chosen["score"]}
            for t in tasks:
                metrics = self.directions[t] if name == "delta_m" else {name: None}
                for m in metrics:
                    val_best[t][m] = val_metrics[t][m]
                    test_best[t][m] = test_metrics[t][m]
        result: dict[str, Any] = {
            "key": run_key(self.config, references),
            "config": self.config.to_dict(),
            "method_repr": repr(self.mto.method),
            "tasks": list(tasks),
            "history": self.history,
            "selection": selection,
            "val": val_best,
            "test": test_best,
            "solver_failures": self.solver_failures,
            "seconds": self.earlier_seconds + time.perf_counter() - self.started,
            "step_seconds_median": statistics.median(self.step_times),
            "mtopt_version": mtopt.__version__,
            "torch_version": torch.__version__,
            "threads": self.began["threads"],
            "data_digest": self.began["data_digest"],
        }
        result["began_with"] = self.began["code_version"]  # ``code_version``: who finished it
        if self.resumed:
            result["resumed"] = self.resumed
        if len(tasks) > 1 and references is not None:
            result["val_delta_m"] = delta_m(val_best, references["val"], self.directions)
            if "test" in references:
                result["test_delta_m"] = delta_m(test_best, references["test"], self.directions)
        return result


class _EpochLog:
    """What one epoch's steps leave in its history record."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.loss_sums = dict.fromkeys(tasks, 0.0)
        self.groups: dict[str, list] = {"step": [], "num_groups": [], "affinity": []}
        self.cosines: list[float] = []
        self.failures = 0
        self.weight_sum: torch.Tensor | None = None
        self.weighted = 0

    def add(self, info: StepInfo) -> None:
        for t, v in info.losses.items():
            self.loss_sums[t] += v
        if info.weights is not None:
            w = info.weights.double()
            self.weight_sum = w if self.weight_sum is None else self.weight_sum + w
            self.weighted += 1
        if info.solver is not None and not info.solver.converged:
            self.failures += 1
        if info.sequential is not None:  # a sequential method: its groups and affinity
            self.groups["step"].append(info.step)
            self.groups["num_groups"].append(info.sequential.num_groups)
            self.groups["affinity"].append(info.sequential.affinity)

    def record(
        self,
        epoch: int,
        n_batches: int,
        val_metrics: dict[str, dict[str, float]],
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        mean = None if self.weight_sum is None else (self.weight_sum / self.weighted).tolist()
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": {t: s / n_batches for t, s in self.loss_sums.items()},
            "val": val_metrics,
            "mean_weights": mean,
            "lr": optimizer.param_groups[0]["lr"],
            "solver_failures": self.failures,
        }
        if self.groups["step"]:
            record["groups"] = self.groups
        if self.cosines:
            record["cosine"] = statistics.fmean(self.cosines)
            record["cosine_samples"] = len(self.cosines)
        return record


def _device(name: str) -> torch.device:
    """The run's device; under torchrun with CUDA, each rank's ``LOCAL_RANK`` GPU."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available on this machine")
        if data_parallel.rank_and_world()[1] > 1:
            if name != "cuda":  # every rank would train on that one GPU
                raise ConfigError(
                    f"device {name!r} under torchrun: pass --device cuda (each process takes "
                    "its LOCAL_RANK GPU; choose the GPUs with CUDA_VISIBLE_DEVICES)"
                )
            return torch.device("cuda", torch.cuda.current_device())
        device = torch.device(name)  # RunConfig's pattern: cuda or cuda:N
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {name!r}: this machine has {count} CUDA device(s), numbered from 0"
            )
        return device
    return torch.device(name)


def _metric_score(task: str, metric: str, lower: bool) -> Callable[[dict], float]:
    """A single-task run's selection score: the validation value of ``metric`` (negated when
    lower is better, so that higher is better)."""

    def score(val_m: dict) -> float:
        return (-1 if lower else 1) * val_m[task][metric]

    return score


class _Endless:
    """Shuffled batches of a split, pass after pass, from their own generator; its position (the
    generator's state where the current pass began, and the batches taken since) is part of a
    checkpoint."""

    def __init__(self, split: Any, batch_size: int, seed: int) -> None:
        self.split, self.batch_size = split, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._new_pass()

    def _new_pass(self) -> None:
        self.pass_state = self.generator.get_state()  # the pass's permutation is drawn from here
        self.taken = 0
        self._batches = self.split.batches(self.batch_size, True, self.generator)

    def __iter__(self) -> _Endless:
        return self

    def __next__(self) -> Batch:
        for _ in range(2):
            batch = next(self._batches, None)
            if batch is not None:
                self.taken += 1
                return batch
            self._new_pass()
        raise RuntimeError("the meta-batch split is empty")

    def state(self) -> dict[str, Any]:
        return {"pass_state": self.pass_state, "taken": self.taken}

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["pass_state"])
        self._new_pass()
        for _ in range(int(state["taken"])):
            next(self)
