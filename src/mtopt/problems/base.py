"""What a benchmark problem is: tasks with losses and metrics, data splits, a model factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtopt.errors import ConfigError

Batch = dict[str, Tensor]
#: ``(z, task name) -> the head's input``; see :meth:`mtopt.MultiTaskOptimizer.task_input`.
TaskInput = Callable[[Tensor, str], Tensor]


@dataclass(frozen=True)
class Metric:
    """A per-task metric. ``batch_sum(pred, batch)`` returns the sum over the batch of the
    per-sample value; the dataset mean is the sum over all batches divided by the count."""

    name: str
    lower_is_better: bool
    batch_sum: Callable[[Tensor, Batch], Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its loss (batch mean), its metrics and the loss type (for typed UW)."""

    name: str
    loss: Callable[[Tensor, Batch], Tensor]
    metrics: tuple[Metric, ...]
    loss_type: str  # "classification" | "regression"


class MultiTaskModel(nn.Module):
    """A shared encoder and one head per task; ``forward`` returns ``(z, {task: output})``."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def forward(
        self, x: Tensor, task_input: TaskInput | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``task_input(z, name)`` (e.g. :meth:`mtopt.MultiTaskOptimizer.task_input`) gives each
        head its input when the method transforms the representation per task."""
        z = self.encoder(x)
        if task_input is None:
            return z, {name: head(z) for name, head in self.heads.items()}
        return z, {name: head(task_input(z, name)) for name, head in self.heads.items()}


class Split:
    """An in-memory split: a dict of equally long tensors and a per-batch ``prepare`` step."""

    def __init__(self, arrays: Mapping[str, Tensor], prepare: Callable[[Batch], Batch]) -> None:
        sizes = {k: v.shape[0] for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"split arrays differ in length: {sizes}")
        self.arrays = dict(arrays)
        self.prepare = prepare
        self.size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.size

    def subset(self, n: int | None) -> Split:
        if n is None or n >= self.size:
            return self
        if n <= 0:
            raise ValueError(f"subset size must be positive, got {n}")
        return Split({k: v[:n] for k, v in self.arrays.items()}, self.prepare)

    def digest(self, into: Any) -> None:
        """Feed the split's arrays (names, dtypes, shapes and bytes) to the hash ``into``
        (:mod:`hashlib`): what a run trained on, so that a run resumed or reused on other data
        can tell (:func:`mtopt.experiments.train.train_run`)."""
        for name, array in sorted(self.arrays.items()):
            into.update(f"{name}:{array.dtype}:{tuple(array.shape)};".encode())
            flat = array.detach().cpu().contiguous().reshape(-1)
            into.update(flat.view(torch.uint8).numpy())  # a buffer: hashed without a copy

    def to(self, device: torch.device | str) -> Split:
        """The split with its arrays on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if all(v.device == device for v in self.arrays.values()):
            return self
        return Split({k: v.to(device) for k, v in self.arrays.items()}, self.prepare)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        order = (
            torch.randperm(self.size, generator=generator) if shuffle else torch.arange(self.size)
        )
        for start in range(0, self.size, batch_size):
            idx = order[start : start + batch_size]
            yield self.prepare({k: v[idx] for k, v in self.arrays.items()})


class Problem:
    """Base class of benchmark problems. Subclasses fill ``name``, ``tasks`` and the factories."""

    name: str = ""
    tasks: tuple[TaskSpec, ...] = ()

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"{self.name} has no task {name!r}; tasks: {self.task_names}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def model_tasks(self, tasks: Sequence[str] | None) -> tuple[str, ...]:
        """The tasks a model is built for: ``tasks`` (each checked to exist) or all of them."""
        names = self.task_names if tasks is None else tuple(tasks)
        for name in names:
            self.task(name)  # raises, naming the valid tasks
        return names

    def splits(self) -> dict[str, Split]:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_model(self, tasks: Sequence[str], dropout: float = 0.0) -> MultiTaskModel:
        raise NotImplementedError  # pragma: no cover - abstract

    def lower_is_better(self) -> dict[str, dict[str, bool]]:
        return {t.name: {m.name: m.lower_is_better for m in t.metrics} for t in self.tasks}


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    problem: Problem,
    split: Split,
    batch_size: int = 1000,
    task_input: TaskInput | None = None,
) -> dict[str, dict[str, float]]:
    """Dataset means of every metric of every task the model has a head for (``task_input``:
    as in :meth:`MultiTaskModel.forward`)."""
    was_training = model.training
    model.eval()
    sums: dict[str, dict[str, float]] = {}
    for batch in split.batches(batch_size):
        _, outputs = model(batch["x"], task_input)
        for name, pred in outputs.items():
            per_task = sums.setdefault(name, {})
            for metric in problem.task(name).metrics:
                value = float(metric.batch_sum(pred, batch))
                per_task[metric.name] = per_task.get(metric.name, 0.0) + value
    model.train(was_training)
    return {t: {m: v / len(split) for m, v in ms.items()} for t, ms in sums.items()}
