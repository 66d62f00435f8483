r"""Selective task group updates (Jeong & Yoon, "Selective Task Group Updates for Multi-Task
Optimization", ICLR 2025; reference code ``wooseong97/sel-update-mtl``).

Instead of one update on a combined loss, each batch is used for :math:`M` *sequential* updates,
one per task group :math:`\mathcal G_m` (visited in random order): forward, group loss
:math:`\sum_{k\in\mathcal G_m}\ell_k` (÷ :math:`|\mathcal G_m|` with ``group_norm``), backward,
optimizer step. Only the heads of the group's tasks are updated (``inactive_heads="skip"``; with
``"momentum"`` a parameter that has taken part in an update before and is not reached by this
group's loss gets a zero gradient, so Adam still moves it by momentum and weight decay, as the
reference does under torch 1.13; one never updated yet keeps no gradient and is skipped). A
single group is run twice.

**Proximal inter-task affinity.** The step of group :math:`\mathcal G` changes task :math:`t`'s
loss from :math:`\ell^{pre}_t` to :math:`\ell_t`; with
:math:`a_t=(1-\ell_t/\ell^{pre}_t)/|\mathcal G|`, for every source :math:`s\in\mathcal G` the
matrix :math:`A` (rows: source, columns: target, zero at the start) is updated by the EMA
:math:`A_{st}\leftarrow(1-\beta)A_{st}+\beta a` with :math:`\beta` = ``affinity_decay`` and

- :math:`t\notin\mathcal G`: :math:`a=a_t`;
- :math:`t=s`: :math:`a=a_t`, only if :math:`a_t\ge0`;
- :math:`t\in\mathcal G\setminus\{s\}`: :math:`a=a_t` if :math:`a_ta_s\ge0`, else
  :math:`a=-\max(a_t,a_s)`.

``attribution="definition"`` (default) credits the change to the group whose step caused it
(the paper's definition): after group :math:`m`'s step the next forward measures it, and one extra
forward without gradients measures the last group's step. ``attribution="released_code"``
reproduces the reference loop, where the change between two consecutive forwards (caused by the
*previous* group's step) is credited to the *current* group, the first group of a batch is not
measured and the last group's step is never measured (no extra forward).

**Grouping** (every step after ``warmup_steps`` steps of one task per group): normalise each
column by the target's self-affinity, :math:`X_{:,i}=A_{:,i}/A_{ii}`, symmetrise
:math:`X\leftarrow(X+X^\top)/2`, and cluster the tasks by Affinity Propagation on :math:`X`
(damping 0.5, ``max_iter`` 200, preference = median, ``convergence_iter`` 50 — scikit-learn's
algorithm, our implementation in :mod:`mtopt.core.affinity_propagation`); without exemplars retry up
to ``max_retries`` times with ``convergence_iter`` + 100, and otherwise keep the previous groups.
If a self-affinity is not positive yet (the reference divides by it unguarded) the grouping is
skipped and the previous groups are kept; ``StepInfo.extras["grouping"]`` says which happened.

Cost: :math:`M` forwards, backwards and optimizer steps per batch (+ one forward without
gradients under ``"definition"``); no per-task gradient. The method updates the model itself
(:class:`~mtopt.core.capabilities.SequentialMethod`): ``StepInfo.updates`` is :math:`M`,
``StepInfo.weights`` counts the updates each task took part in, and ``StepInfo.sequential`` holds
the groups (in visiting order), their number and :math:`A`. The closure must return separate
scalar losses (a dict or list, not one stacked tensor), so that a group's loss reaches only its
own heads. Losses must be ≥ 0 (the affinity is a relative loss change); a target whose previous
loss is exactly 0 is skipped, as in the reference. The reference's per-task head learning rate
× K (``lr_ts``) is a training-setup choice left to the user's optimizer param groups.

**Where the paper and the released code differ.** With ``attribution="released_code"``,
``inactive_heads="momentum"`` and ``warmup_steps`` = ``prepos`` + 1 this method follows the
released training loop bit for bit on a small problem once that loop's normalisation is
corrected (first point; ``tests/methods/test_selective_groups_reference.py``):

- *Normalisation*: the released code divides column :math:`i` in place by :math:`A_{ii}`, an
  element of that same column, so under current torch only rows :math:`0,\dots,i` are divided
  (the divisor reads 1 once row :math:`i` is done); we divide the whole column by the original
  :math:`A_{ii}`, as the paper's normalisation intends, and do not reproduce that bug.
- *Inactive heads*: under torch 1.13 ``zero_grad()`` keeps zeroed gradients, so a head gets a zero
  gradient (Adam moves it by momentum) only once it has been back-propagated, and one never
  back-propagated yet keeps ``grad = None`` and is skipped; ``inactive_heads="momentum"`` does the
  same.
- *Warm-up*: the released loop warms up while its batch counter (from 0) is :math:`\le`
  ``prepos``, i.e. for ``prepos`` + 1 batches; ``warmup_steps`` counts warm-up batches, so its
  default 101 is the released configs' ``prepos`` of 100.
- *Attribution*: the paper credits a step's loss changes to the group that made it
  (``"definition"``); the released loop credits them to the next group (``"released_code"``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from mtopt.core.affinity_propagation import affinity_propagation
from mtopt.core.capabilities import SequentialMethod, StepContext, UpdateReport
from mtopt.core.checks import require_positive_losses
from mtopt.core.hparams import NonNegativeInt, NotBool, PositiveInt, PositiveUnit, Real, Seed
from mtopt.core.method import Method, MethodInput
from mtopt.core.registry import register
from mtopt.core.seeded import SeededRandomness

#: Affinity Propagation's damping: a float in [0.5, 1), as scikit-learn requires.
Damping = Annotated[float, Field(ge=0.5, lt=1, allow_inf_nan=False), NotBool]


def update_affinity(
    affinity: np.ndarray, group: list[int], before: np.ndarray, after: np.ndarray, decay: float
) -> None:
    """One EMA update of ``affinity`` (in place) for the step of ``group`` that changed the
    losses from ``before`` to ``after`` (rules in the module doc)."""
    size = len(group)
    valid = before > 0
    change = np.zeros_like(before)
    change[valid] = (1.0 - after[valid] / before[valid]) / size
    members = set(group)
    for s in group:
        for t in range(affinity.shape[0]):
            if not valid[t]:
                continue
            a = change[t]
            if t == s:
                if a < 0:
                    continue
            elif t in members:
                if not valid[s]:
                    continue
                if a * change[s] < 0:
                    a = -max(a, change[s])
            affinity[s, t] = (1.0 - decay) * affinity[s, t] + decay * a


def group_tasks(
    affinity: np.ndarray,
    *,
    preference: float | None,
    damping: float,
    max_iter: int,
    convergence_iter: int,
    max_retries: int,
) -> tuple[list[list[int]] | None, str]:
    """Groups of task indices from the affinity matrix, or ``None`` and the reason."""
    self_affinity = np.diag(affinity)
    if not np.all(self_affinity > 0):
        return None, "kept_previous:non_positive_self_affinity"
    x = affinity / self_affinity[None, :]
    x = (x + x.T) / 2.0
    for _ in range(max_retries):
        result = affinity_propagation(
            x,
            preference=preference,
            damping=damping,
            max_iter=max_iter,
            convergence_iter=convergence_iter,
        )
        if result is not None:
            groups = [
                np.flatnonzero(result.labels == c).tolist() for c in range(len(result.exemplars))
            ]
            return groups, "affinity_propagation"
        convergence_iter += 100
    return None, "kept_previous:no_exemplar"


@register
class SelectiveGroups(SeededRandomness, Method, SequentialMethod):
    """Selective task group updates (Jeong & Yoon 2025): sequential per-group updates, groups
    from the tracked proximal inter-task affinity."""

    name = "selective_groups"
    levels = ("loss",)
    default_head_policy = "raw"

    def __init__(
        self,
        *,
        affinity_decay: PositiveUnit = 1e-3,
        warmup_steps: NonNegativeInt = 101,
        attribution: Literal["definition", "released_code"] = "definition",
        inactive_heads: Literal["skip", "momentum"] = "skip",
        group_norm: bool = False,
        preference: Real | None = None,
        damping: Damping = 0.5,
        max_iter: PositiveInt = 200,
        convergence_iter: PositiveInt = 50,
        max_retries: PositiveInt = 10,
        seed: Seed = None,
        head_policy: Literal["raw", "weighted"] | None = None,
    ) -> None:
        super().__init__(head_policy=head_policy)
        self.affinity_decay = float(affinity_decay)
        self.warmup_steps = int(warmup_steps)
        self.attribution = attribution
        self.inactive_heads = inactive_heads
        self.group_norm = bool(group_norm)
        self.preference = None if preference is None else float(preference)
        self.damping = float(damping)
        self.max_iter = int(max_iter)
        self.convergence_iter = int(convergence_iter)
        self.max_retries = int(max_retries)
        self.seed = seed
        self._init_generator(seed)
        self.affinity: np.ndarray | None = None
        self.groups: list[list[int]] | None = None
        # per parameter of the step context: has it taken part in an update yet ("momentum")
        self.stepped: list[bool] | None = None

    def _order(self, count: int) -> list[int]:
        return torch.randperm(count, generator=self._generator).tolist()

    def apply(self, inputs: MethodInput, context: StepContext) -> UpdateReport:
        """Update the groups of this step in a random order, one optimizer update each, and
        track the affinity from the loss changes."""
        k = inputs.num_tasks
        names = inputs.task_names
        require_positive_losses(self.name, inputs.losses, names, "the affinity", allow_zero=True)
        if self.affinity is None:
            self.affinity = np.zeros((k, k))
        elif self.affinity.shape != (k, k):
            raise ValueError(f"selective_groups: built for {self.affinity.shape[0]} tasks, got {k}")

        if inputs.step < self.warmup_steps or self.groups is None:
            grouping = "warmup" if inputs.step < self.warmup_steps else "initial"
            self.groups = [[i] for i in range(k)]
        if inputs.step >= self.warmup_steps:
            groups, grouping = group_tasks(
                self.affinity,
                preference=self.preference,
                damping=self.damping,
                max_iter=self.max_iter,
                convergence_iter=self.convergence_iter,
                max_retries=self.max_retries,
            )
            if groups is not None:
                self.groups = groups
        schedule = [self.groups[i] for i in self._order(len(self.groups))]
        if len(schedule) == 1:
            schedule = schedule * 2

        live: list[Tensor] = context.live_losses
        before: np.ndarray | None = None  # the losses before the current group's step
        previous_group: list[int] | None = None
        counts = torch.zeros(k, dtype=inputs.losses.dtype)
        for m, group in enumerate(schedule):
            if m > 0:
                live = context.evaluate_each()
            current = torch.stack([loss.detach() for loss in live]).double().cpu()
            self._check(current, names)
            now = current.numpy()
            if self.attribution == "definition" and previous_group is not None:
                assert before is not None  # set together with previous_group
                update_affinity(self.affinity, previous_group, before, now, self.affinity_decay)
            elif self.attribution == "released_code" and before is not None:
                update_affinity(self.affinity, group, before, now, self.affinity_decay)
            loss = torch.stack([live[i] for i in group]).sum()
            if self.group_norm:
                loss = loss / len(group)
            self._update(context, loss)
            counts[group] += 1
            before, previous_group = now, group
        if self.attribution == "definition":
            with torch.no_grad():
                after = context.evaluate()
            self._check(after, names)
            assert previous_group is not None and before is not None  # the schedule is not empty
            update_affinity(
                self.affinity,
                previous_group,
                before,
                after.double().cpu().numpy(),
                self.affinity_decay,
            )
        return UpdateReport(
            weights=counts,
            # a lone group is stepped twice, as in the released code
            updates=len(schedule),
            groups=[[names[i] for i in g] for g in schedule],
            num_groups=len(self.groups),
            affinity=self.affinity.tolist(),
            extras={"grouping": grouping},
        )

    def _update(self, context: StepContext, loss: Tensor) -> None:
        """One optimizer update on ``loss``; with ``inactive_heads="momentum"`` a parameter that
        ``loss`` does not reach gets a zero gradient if it has been updated before (just before
        the optimizer steps, after the engine's backward), and keeps none otherwise."""
        if self.inactive_heads == "skip":
            context.update(loss)
            return
        params = context.parameters
        if self.stepped is None:
            self.stepped = [False] * len(params)
        elif len(self.stepped) != len(params):
            raise ValueError(
                f"selective_groups: built for {len(self.stepped)} parameters, got {len(params)}"
            )
        stepped = self.stepped

        def zero_gradients(*_: Any) -> None:
            for p, done in zip(params, stepped, strict=True):
                if done and p.grad is None:
                    p.grad = torch.zeros_like(p)

        handle = context.optimizer.register_step_pre_hook(zero_gradients)
        try:
            context.update(loss)
        finally:
            handle.remove()
        for i, p in enumerate(params):
            if p.grad is not None:
                stepped[i] = True

    def _check(self, losses: Tensor, names: tuple[str, ...]) -> None:
        require_positive_losses(self.name, losses.detach(), names, "the affinity", allow_zero=True)

    # -- state -----------------------------------------------------------------------------
    def _get_state(self) -> dict[str, Any]:
        state = super()._get_state()
        if self.affinity is not None:
            state["affinity"] = self.affinity.tolist()
        if self.groups is not None:
            state["groups"] = [list(g) for g in self.groups]
        if self.stepped is not None:
            state["stepped"] = list(self.stepped)
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self.affinity = np.array(state["affinity"]) if "affinity" in state else None
        self.groups = [list(g) for g in state["groups"]] if "groups" in state else None
        self.stepped = [bool(b) for b in state["stepped"]] if "stepped" in state else None
