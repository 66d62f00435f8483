r"""The authors' training loop of selective task group updates, re-implemented for the tests.

What this reproduces, and from where. Jeong & Yoon (ICLR 2025) released their code as the GitHub
repository ``wooseong97/sel-update-mtl``. Its loop is the function ``train_phase_affinity`` in
the file ``sel-update-mtl/utils/train_utils.py``; the affinity bookkeeping is the class
``form_task_affinity`` in the same file (its methods ``update``, ``affin_update``,
``init_pre_loss`` and ``next_group``), the group losses come from ``MTLoss_affinity`` in
``sel-update-mtl/losses/loss_schemes.py`` and the warm-up length ``prepos`` from the configs
under ``sel-update-mtl/configs/sel/``. This module is our own code written from reading them (no
code copied); for one stream of batches it does what that loop does:

* **per batch**: while the batch counter (starting at 0, incremented after the test) is
  ``<= prepos`` the initial groups (one task each) are visited in a random order, afterwards the
  groups come from ``next_group``; the previous losses are reset; a lone group is visited twice;
* **per group**: forward, group loss (sum of its tasks' losses, ÷ its size with ``group_norm``),
  ``optimizer.zero_grad()``, backward, ``optimizer.step()``, then the affinity update with this
  forward's losses against the previous forward's (so a step's effect is credited to the *next*
  group, and the first group of a batch is not measured);
* **affinity update** (``update``): for each source ``s`` of the group and target ``t`` with a
  positive previous loss, :math:`a_t=(1-\ell_t/\ell^{pre}_t)/|G|`; inside the group the self
  entry takes only gains, and opposite signs give :math:`-\max(a_t,a_s)`; EMA with
  ``affinity_decay``;
* **grouping** (``next_group``): each column divided by the target's self-affinity, symmetrised,
  Affinity Propagation (preference = median unless given, ``convergence_iter`` 50, + 100 per retry,
  10 tries), previous groups kept when no exemplar emerges.

Deliberate choices, each an option so a test can show what it changes:

* ``aliased_normalisation`` (default ``True``, as the released code runs under current torch):
  the released code divides ``X[:, i]`` in place by ``X[i, i]``, an element of the same column.
  Current torch (checked with 2.13, CPU) then divides rows ``0..i`` only: once row ``i`` is
  divided the divisor reads 1. ``False`` divides the whole column by the original diagonal.
* ``head_grads`` (default ``"kept_zeroed"``): what ``optimizer.zero_grad()`` leaves. The authors'
  environment is torch 1.13, whose default is ``set_to_none=False``: a head never yet
  back-propagated keeps ``grad = None`` (Adam skips it), a head back-propagated once keeps a zero
  gradient from then on (Adam moves it by momentum). ``"set_to_none"`` is what the same code does
  under torch >= 2.0 (heads outside the group are skipped); ``"all_zero"`` gives every head
  without a gradient a zero one from the first update (mtopt's ``inactive_heads="momentum"``
  before it followed the reference).
* The visiting order: the released code shuffles the group names with Python's
  ``random.shuffle``; here the caller passes ``order(count) -> permutation``, so that both loops
  can visit the same groups in the same order.
* Clustering: the released code calls scikit-learn's ``AffinityPropagation(affinity=
  "precomputed")`` with its defaults (damping 0.5, ``max_iter`` 200, ``random_state`` 0); we call
  :func:`mtopt.core.affinity_propagation.affinity_propagation`, our implementation of the same
  algorithm (``tests/core/test_affinity_propagation.py`` checks it against scikit-learn), so that
  a comparison isolates the loop.
* ``affinity_dtype`` (default float64, as mtopt keeps it): the released code keeps the map in
  torch's default dtype (float32 unless changed); with ``torch.float32`` the map is stored in
  float32 here too, the clustering still runs in float64.
* Not reproduced: DDP (one process here), the learning-rate scheduler (step it yourself if
  needed), the per-task loss weights (all 1.0 in the released configs), logging and evaluation.
  When a self-affinity is still 0 the released code hands non-finite values to scikit-learn,
  which refuses them; here :class:`ReleasedCodeError` is raised.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtopt.core.affinity_propagation import affinity_propagation

HeadGrads = Literal["kept_zeroed", "set_to_none", "all_zero"]
Order = Callable[[int], list[int]]


class ReleasedCodeError(RuntimeError):
    """The released code would have failed here (non-finite input to the clustering)."""


# -- a tiny multi-task problem ---------------------------------------------------------------------
class TinyModel(torch.nn.Module):
    """A linear encoder (+ tanh) and K linear heads regressing one target each; float64."""

    def __init__(self, k: int = 4, d_in: int = 6, d_hidden: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.encoder = torch.nn.Linear(d_in, d_hidden).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(d_hidden, 1).double() for _ in range(k)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Separate scalar losses ``t0 … t{K-1}`` on ``batch = (x, y)`` (``y``: ``n × K``)."""
        x, y = batch
        z = torch.tanh(self.encoder(x))
        return {
            f"t{k}": torch.nn.functional.mse_loss(head(z), y[:, k : k + 1])
            for k, head in enumerate(self.heads)
        }


def make_batches(
    steps: int, k: int = 4, d_in: int = 6, n: int = 16, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """A stream of ``steps`` batches whose targets are related in pairs: task 0 and 1 share a
    direction, task 2 is its opposite, task 3 is unrelated (for K = 4)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d_in, 2, generator=gen, dtype=torch.float64)
    weights = torch.stack(
        [base[:, 0], base[:, 0] + 0.3 * base[:, 1], -base[:, 0], base[:, 1]][:k], dim=1
    )
    batches = []
    for _ in range(steps):
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        noise = 0.1 * torch.randn(n, k, generator=gen, dtype=torch.float64)
        batches.append((x, torch.tanh(x @ weights) + noise))
    return batches


# -- the released loop -----------------------------------------------------------------------------
class ReferenceAffinity:
    """The released code's affinity tracker and grouping (``form_task_affinity``)."""

    def __init__(
        self,
        num_tasks: int,
        affinity_decay: float,
        *,
        preference: float | None = None,
        aliased_normalisation: bool = True,
        affinity_dtype: torch.dtype = torch.float64,
    ) -> None:
        self.num_tasks = num_tasks
        self.decay = affinity_decay
        self.preference = preference
        self.aliased = aliased_normalisation
        self.map = torch.zeros(num_tasks, num_tasks, dtype=affinity_dtype)
        self.groups: list[list[int]] = [[t] for t in range(num_tasks)]  # the configs' start
        self.pre_loss = [-1.0] * num_tasks
        self.convergence_iter = 50

    def init_pre_loss(self) -> None:
        self.pre_loss = [-1.0] * self.num_tasks

    def _ema(self, value: float, s: int, t: int) -> None:
        self.map[s, t] = (1 - self.decay) * self.map[s, t] + self.decay * value

    def update(self, group: list[int], losses: Sequence[float]) -> None:
        """Credit the change since the previous forward to ``group``; remember ``losses``."""
        size = len(group)
        for s in group:
            for t in range(self.num_tasks):
                if self.pre_loss[t] <= 0:
                    continue
                a_t = (1 - losses[t] / self.pre_loss[t]) / size
                if t not in group:
                    self._ema(a_t, s, t)
                    continue
                if self.pre_loss[s] <= 0:
                    continue
                a_s = (1 - losses[s] / self.pre_loss[s]) / size
                if t == s:
                    if a_t >= 0:
                        self._ema(a_t, s, t)
                elif a_t * a_s >= 0:
                    self._ema(a_t, s, t)
                else:
                    self._ema(-max(a_t, a_s), s, t)
        self.pre_loss = list(losses)

    def normalised(self) -> Tensor:
        """Columns divided by the self-affinities (aliased or not), then symmetrised."""
        x = self.map.clone()
        if self.aliased:
            for i in range(self.num_tasks):
                x[:, i] /= x[i, i]  # the divisor is a view into the column being divided
        else:
            x = x / torch.diagonal(x).clone()[None, :]
        return (x + x.T) / 2

    def next_group(self, order: Order) -> list[list[int]]:
        """Regroup from the affinity (keep the groups if no exemplar emerges); the groups in a
        random visiting order."""
        x = self.normalised()
        if not bool(torch.isfinite(x).all()):
            raise ReleasedCodeError(f"non-finite normalised affinity (self-affinity 0?):\n{x}")
        similarity = x.to(torch.float64).numpy()
        convergence_iter = self.convergence_iter
        groups: list[list[int]] = []
        for _ in range(10):
            result = affinity_propagation(
                similarity,
                preference=self.preference,
                damping=0.5,
                max_iter=200,
                convergence_iter=convergence_iter,
            )
            if result is not None:
                groups = [
                    [t for t in range(self.num_tasks) if result.labels[t] == c]
                    for c in range(len(result.exemplars))
                ]
                break
            convergence_iter += 100
        if groups:
            self.groups = groups
        return [self.groups[i] for i in order(len(self.groups))]


@dataclass
class StepRecord:
    """One batch of the reference loop: the groups in visiting order (a lone group twice),
    whether they came from the clustering (``False``: warm-up), the affinity after the batch
    and every parameter after the batch."""

    groups: list[list[int]]
    grouped: bool
    affinity: np.ndarray
    params: list[Tensor]


def run_reference(
    model: TinyModel,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[Tensor, Tensor]],
    order: Order,
    *,
    prepos: int,
    affinity_decay: float,
    aliased_normalisation: bool = True,
    head_grads: HeadGrads = "kept_zeroed",
    group_norm: bool = False,
    preference: float | None = None,
    affinity_dtype: torch.dtype = torch.float64,
    on_step: Callable[[int], None] | None = None,
) -> list[StepRecord]:
    """The released loop over ``batches`` (see the module doc); ``on_step(i)`` is called after
    batch ``i``."""
    tracker = ReferenceAffinity(
        model.num_tasks,
        affinity_decay,
        preference=preference,
        aliased_normalisation=aliased_normalisation,
        affinity_dtype=affinity_dtype,
    )
    records: list[StepRecord] = []
    # ``index`` is the released loop's batch counter at its test (from 0, incremented after it)
    for index, batch in enumerate(batches):
        grouped = index > prepos
        if grouped:
            visit = tracker.next_group(order)
        else:
            visit = [tracker.groups[i] for i in order(len(tracker.groups))]
        tracker.init_pre_loss()
        if len(tracker.groups) == 1:
            visit = visit * 2
        for group in visit:
            losses = list(model.losses(batch).values())
            loss = torch.sum(torch.stack([losses[t] for t in group]))
            if group_norm:
                loss = loss / len(group)
            optimizer.zero_grad(set_to_none=head_grads != "kept_zeroed")
            loss.backward()
            if head_grads == "all_zero":
                for head in model.heads:
                    for p in head.parameters():
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
            optimizer.step()
            tracker.update(group, [v.item() for v in losses])
        records.append(
            StepRecord(
                groups=[list(g) for g in visit],
                grouped=grouped,
                affinity=tracker.map.to(torch.float64).numpy().copy(),
                params=[p.detach().clone() for p in model.parameters()],
            )
        )
        if on_step is not None:
            on_step(index)
    return records


def twin(model: TinyModel) -> TinyModel:
    """An identical, independent copy (same parameters, bit for bit)."""
    return copy.deepcopy(model)
