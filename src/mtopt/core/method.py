"""The contract every multi-task method implements.

A method works at one *level* (:data:`LEVELS`): on the task losses alone (``"loss"``), on the
per-task gradients of the shared parameters (``"param"``, a ``K × D`` Jacobian or only its
Gramian) or on the per-task gradients of the shared representation (``"rep"``). It receives a
:class:`MethodInput` (what every method may read) and answers with an :class:`Aggregation`: the
effective per-task weights ``w`` such that the shared update is ``d = Σ_k w_k g_k``, and/or an
explicit ``direction``. The engine (:mod:`mtopt.engine`) turns that into ``.grad`` values; a
method never touches a model.

What a few methods need beyond that comes through small capabilities the engine checks with
``isinstance`` (:mod:`mtopt.core.capabilities`): re-running the closure (FAMO, Auto-Lambda),
updating the model itself group by group (selective group updates), transforming the
representation per task (RotoGrad), being told when an epoch ends (DWA).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mtopt.core.gradients import gram_matrix
from mtopt.core.hparams import validated

__all__ = [
    "LEVELS",
    "Aggregation",
    "Method",
    "MethodInput",
    "Need",
    "SolverReport",
    "as_weights",
]

#: The levels a method works at: the losses, the shared parameters' gradients, the shared
#: representation's gradients.
LEVELS = ("loss", "param", "rep")
Level = Literal["loss", "param", "rep"]

HEAD_POLICIES = ("raw", "weighted")


class Need(enum.Flag):
    """A description of what a method needs from a step (``Method.needs``, for listings and
    reports; the engine itself dispatches on ``Method.level`` and the capabilities).

    - ``LOSSES``: the per-task loss values (every method gets them).
    - ``PARAM_GRADS``: per-task gradients of the shared parameters (level ``param``).
    - ``REP_GRADS``: per-task gradients of the shared representation ``z`` (level ``rep``); the
      closure must return ``features=z``.
    - ``CLOSURE``: the method re-runs the closure itself
      (:class:`~mtopt.core.capabilities.ClosureMethod`).
    - ``META_BATCH``: the method also needs the losses on a second ("meta") batch
      (:class:`~mtopt.core.capabilities.MetaBatchMethod`): ``step(closure, meta_closure=...)``.
    """

    LOSSES = enum.auto()
    PARAM_GRADS = enum.auto()
    REP_GRADS = enum.auto()
    CLOSURE = enum.auto()
    META_BATCH = enum.auto()


_LEVEL_NEEDS = {"loss": Need.LOSSES, "param": Need.PARAM_GRADS, "rep": Need.REP_GRADS}


@dataclass(frozen=True)
class SolverReport:
    """How an inner solver ended, with its certificate.

    ``converged`` is a certificate, not a stopping rule: the optimality conditions of the
    solver's problem (KKT residual, duality gap, or the defining equations) were checked after
    the solve and hold to ``tolerance``; ``residual`` is the measured value, in the relative
    units the solver documents. ``converged=False`` is always also logged by the engine.
    """

    name: str
    converged: bool
    iterations: int
    status: str = "ok"
    message: str = ""
    residual: float | None = None
    tolerance: float | None = None


@dataclass
class MethodInput:
    """What the engine hands a method for one step (the same for every method).

    Attributes:
        losses: detached per-task losses, shape ``(K,)``.
        task_names: the K task names, in the order of ``losses``.
        step: index of this step (0-based) in the optimizer's life.
        grads: per-task gradients (rows), ``(K, N)``, at the method's level: of the shared
            parameters (``param``) or of the representation (``rep``); ``None`` at level
            ``loss``, and under the Gramian engine (which gives ``gramian`` only).
        gramian: ``M = G Gᵀ`` (``K × K``, float64) when the engine formed it without ``G``;
            otherwise read it with :meth:`gramian` (formed once, on demand).
        features: at level ``rep``: the (detached) shared representation, shape ``(B, ...)``,
            whose per-task gradients are the rows of ``grads``.
        loss_types: each task's loss type ("regression", "classification", "l1") when the user
            declared them (``MultiTaskOptimizer(..., loss_types=...)``), else ``None``.
    """

    losses: Tensor
    task_names: tuple[str, ...]
    grads: Tensor | None = None
    step: int = 0
    loss_types: tuple[str, ...] | None = None
    features: Tensor | None = None
    gramian_matrix: Tensor | None = field(default=None, repr=False)

    @property
    def num_tasks(self) -> int:
        return int(self.losses.shape[0])

    def gramian(self) -> Tensor:
        """``M = G Gᵀ`` (``K × K``, float64), formed once per step without overflow whatever
        the gradients' dtype (:func:`mtopt.core.gradients.gram_matrix`)."""
        if self.gramian_matrix is None:
            if self.grads is None:
                raise RuntimeError("this method works on the losses only; it has no Gramian")
            self.gramian_matrix = gram_matrix(self.grads)
        return self.gramian_matrix


@dataclass
class Aggregation:
    """A method's answer for one step.

    Attributes:
        weights: effective weights ``w`` with ``d = Σ_k w_k g_k`` (shape ``(K,)``); for
            loss-level methods they weight the losses. ``None`` when the method has no natural
            weights (it must then give ``direction``).
        direction: explicit shared update in the space of ``MethodInput.grads``; overrides
            ``Gᵀw`` when given.
        solver: the inner solver's report, if the method has one.
        extras: anything else worth logging (e.g. the min-norm simplex weights); read by no
            part of mtopt.
        head_weights: coefficients ``c`` for the task-specific parameters (they receive
            ``Σ c_k ∇ℓ_k``) when the method defines them itself (hybrid IMTL: ``e^{s_k}``);
            overrides the head policy.
    """

    weights: Tensor | None
    direction: Tensor | None = None
    solver: SolverReport | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    head_weights: Tensor | None = None


class Method:
    """Base class of every multi-task method.

    Subclasses set ``name`` and ``levels`` (the levels they can work at; the first is the
    default), take their hyperparameters as keyword-only arguments of ``__init__`` (with the
    papers' defaults, annotated with what is valid: :mod:`mtopt.core.hparams`) and store each
    one as an attribute of the same name, then implement :meth:`aggregate`. A method that can
    work at several levels takes a ``level`` hyperparameter. ``head_policy`` says what
    task-specific parameters receive: ``raw`` (head k gets ``∇ℓ_k``) or ``weighted`` (head k
    gets ``w_k ∇ℓ_k``).
    """

    name: ClassVar[str] = ""
    #: the levels the method can work at, its default first
    levels: ClassVar[tuple[str, ...]] = ("loss",)
    default_head_policy: ClassVar[str] = "weighted"
    #: ``aggregate`` reads the gradients only through ``inputs.gramian()`` (and the losses) and
    #: returns weights, never a direction: the engine may then compute the Gramian without the
    #: ``K × D`` Jacobian (``MultiTaskOptimizer(engine="gramian")``).
    gramian_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__mtopt_validated__", False):
            cls.__init__ = validated(init)  # type: ignore[method-assign]

    def __init__(self, *, head_policy: Literal["raw", "weighted"] | None = None) -> None:
        policy = self.default_head_policy if head_policy is None else head_policy
        if policy not in HEAD_POLICIES:
            raise ValueError(
                f"{self.name}: head_policy must be one of {HEAD_POLICIES}, got {head_policy!r}"
            )
        self.head_policy = policy

    # -- the level -----------------------------------------------------------------------------
    @property
    def level(self) -> str:
        """The level this instance works at (its ``level`` hyperparameter, if it has one)."""
        return self.__dict__.get("_level") or type(self).levels[0]

    @level.setter
    def level(self, value: str) -> None:
        if value not in type(self).levels:
            raise ValueError(
                f"{self.name}: level must be one of {type(self).levels}, got {value!r}"
            )
        self.__dict__["_level"] = value

    @classmethod
    def default_level(cls) -> str:
        return cls.levels[0]

    @property
    def needs(self) -> Need:
        """A description of what this instance needs (:class:`Need`)."""
        return self.describe_needs(self.level)

    @classmethod
    def describe_needs(cls, level: str | None = None) -> Need:
        from mtopt.core.capabilities import ClosureMethod, MetaBatchMethod

        need = _LEVEL_NEEDS[level or cls.levels[0]]
        if issubclass(cls, ClosureMethod):
            need |= Need.CLOSURE
        if issubclass(cls, MetaBatchMethod):
            need |= Need.META_BATCH
        return need

    # -- hyperparameters -------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Valid hyperparameter names and their defaults (``inspect.Parameter.empty``: required)."""
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is inspect.Parameter.KEYWORD_ONLY:
                    out[p.name] = p.default
        if "level" in out and out["level"] is None:
            out["level"] = cls.levels[0]
        if "head_policy" in out:  # shown last, with the class's own default
            del out["head_policy"]
            out["head_policy"] = cls.default_head_policy
        return out

    @property
    def hparams(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.hyperparameters()}

    # -- per-task hyperparameters ----------------------------------------------------------------
    def per_task(self) -> Mapping[str, Sequence[Any]]:
        """The hyperparameters given as one value per task (``fixed``'s ``weights``), by name;
        none by default. Their lengths are checked against the number of tasks by
        :meth:`check_tasks`."""
        return {}

    def check_tasks(self, num_tasks: int) -> None:
        """Raise ``ValueError`` if a per-task hyperparameter does not have ``num_tasks``
        values. ``MultiTaskOptimizer`` calls it when it is built with its ``tasks``, so that the
        mistake is reported before training rather than at the first step."""
        for label, values in self.per_task().items():
            if len(values) != num_tasks:
                raise ValueError(
                    f"{self.name}: {label} has {len(values)} values for {num_tasks} tasks"
                )

    # -- the step ----------------------------------------------------------------------------
    def aggregate(self, inputs: MethodInput) -> Aggregation:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state, like torch.optim ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters plus whatever state the method carries across steps."""
        return {"name": self.name, "hparams": self.hparams, "state": self._get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("name") != self.name:
            raise ValueError(
                f"state_dict is for method {state_dict.get('name')!r}, not {self.name!r}"
            )
        if state_dict.get("hparams") != self.hparams:
            raise ValueError(
                f"{self.name}: state_dict hyperparameters {state_dict.get('hparams')} differ "
                f"from this instance's {self.hparams}"
            )
        self._set_state(state_dict.get("state", {}))

    def _get_state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} is stateless but got state {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def as_weights(values: Any, inputs: MethodInput) -> Tensor:
    """``values`` (array or tensor) as weights on the device of the method's gradient inputs (of
    the losses for loss-only methods), in their dtype or float32, whichever is wider: weights of
    a float16 model may exceed float16's range while ``Gᵀw`` does not. On CUDA the copy from
    the host does not wait for the device (``non_blocking``: CUDA stages the K values from
    ordinary host memory before the call returns, so the temporary source may go; a blocking
    copy would wait for every kernel queued before it). Elsewhere it blocks: on MPS a
    non-blocking copy may read its source after it is freed."""
    ref = inputs.grads if inputs.grads is not None else inputs.losses
    dtype = torch.promote_types(ref.dtype, torch.float32)
    async_copy = ref.device.type == "cuda"
    return torch.as_tensor(values).to(dtype=dtype, device=ref.device, non_blocking=async_copy)
