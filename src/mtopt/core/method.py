"""The contract every multi-task method implements.

A method declares what it *needs* from a training step (:class:`Need`), receives exactly that in a
:class:`MethodInput`, and answers with an :class:`Aggregation`: the effective per-task weights
``w`` such that the shared update is ``d = Σ_k w_k g_k`` (``g_k`` the per-task gradients the method
was given), and/or an explicit ``direction``. The engine (:mod:`mtopt.step`) turns that into
``.grad`` values; a method never touches a model.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mtopt.core.gradients import gram_matrix
from mtopt.core.hparams import validated

HEAD_POLICIES = ("raw", "weighted")


class Need(enum.Flag):
    """What a method needs from a step; combine with ``|``.

    - ``LOSSES``: the per-task loss values (every method gets them).
    - ``PARAM_GRADS``: per-task gradients of the shared parameters, a ``K × D`` matrix.
    - ``REP_GRADS``: per-task gradients of the shared representation ``z`` (flattened over batch
      and features), a ``K × numel(z)`` matrix; the closure must return ``features=z``.
    - ``CLOSURE``: the method re-runs the forward itself (sequential or bilevel methods); it
      gets ``MethodInput.evaluate``, the optimized ``parameters`` and the base ``optimizer``.
    - ``META_BATCH``: the method also needs the losses on a second ("meta") batch: pass
      ``step(closure, meta_closure=...)``; the method's ``meta_split`` says which split the
      trainer draws it from.
    """

    LOSSES = enum.auto()
    PARAM_GRADS = enum.auto()
    REP_GRADS = enum.auto()
    CLOSURE = enum.auto()
    META_BATCH = enum.auto()


#: Methods that work either on the shared parameters or on the representation (``level``).
LEVEL_NEEDS = {"param": Need.PARAM_GRADS, "rep": Need.REP_GRADS}


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
    """What the engine hands a method for one step.

    Attributes:
        losses: detached per-task losses, shape ``(K,)``.
        task_names: the K task names, in the order of ``losses``.
        grads: per-task gradients (rows), ``(K, N)``, when the method needs them: of the shared
            parameters (``Need.PARAM_GRADS``) or of the representation (``Need.REP_GRADS``).
        step: index of this step (0-based) in the optimizer's life.
        loss_types: each task's loss type ("regression", "classification", "l1") when the user
            declared them (``MultiTaskOptimizer(..., loss_types=...)``), else ``None``.
        evaluate_meta: for ``Need.META_BATCH`` methods: the per-task losses on the meta batch.
        features: for ``Need.REP_GRADS`` methods: the (detached) shared representation itself,
            shape ``(B, ...)``, whose per-task gradients are the rows of ``grads``.
        parameters, optimizer: for ``Need.CLOSURE`` methods: every optimized parameter (shared
            and task-specific) and the base optimizer (its lr, momentum, weight decay).
        evaluate: for methods that declare ``Need.CLOSURE``: re-runs the user's closure on the
            same batch and returns the validated per-task losses (a ``(K,)`` tensor that is still
            part of the autograd graph); ``None`` otherwise.
        evaluate_each: like ``evaluate`` but the K scalar losses as a list (back-propagating a
            subset of them then reaches only their own heads; through a stacked tensor every
            head would get a zero gradient).
        live_losses: for ``Need.CLOSURE`` methods: the step's own losses, still attached to the
            graph of the step's forward (so a method can back-propagate them without a second
            forward).
        update: for ``Need.CLOSURE`` methods: ``update(loss, zero_missing=False)`` runs one
            update of the engine's kind on ``loss`` (a scalar in the autograd graph): zero every
            gradient, back-propagate into the shared and task-specific parameters (a head that
            ``loss`` does not reach keeps ``grad = None``, so the base optimizer skips it, unless
            ``zero_missing`` gives it a zero gradient), apply ``max_grad_norm``, step the base
            optimizer. A method that updates this way returns ``applied=True``.
    """

    losses: Tensor
    task_names: tuple[str, ...]
    grads: Tensor | None = None
    step: int = 0
    evaluate: Callable[[], Tensor] | None = None
    loss_types: tuple[str, ...] | None = None
    evaluate_meta: Callable[[], Tensor] | None = None
    features: Tensor | None = None
    parameters: list[Tensor] | None = None
    optimizer: Any = None
    evaluate_each: Callable[[], list[Tensor]] | None = None
    live_losses: list[Tensor] | None = None
    update: Callable[..., None] | None = None
    _gramian: Tensor | None = field(default=None, repr=False)

    @property
    def num_tasks(self) -> int:
        return int(self.losses.shape[0])

    def gramian(self) -> Tensor:
        """``M = G Gᵀ`` (``K × K``, float64), computed once per step without overflow whatever
        the gradients' dtype (:func:`mtopt.core.gradients.gram_matrix`). Under the Gramian engine
        it is all the method gets: ``grads`` is then ``None``."""
        if self._gramian is None:
            if self.grads is None:
                raise RuntimeError("this method did not declare a gradient need; no Gramian")
            self._gramian = gram_matrix(self.grads)
        return self._gramian


@dataclass
class Aggregation:
    """A method's answer for one step.

    Attributes:
        weights: effective weights ``w`` with ``d = Σ_k w_k g_k`` (shape ``(K,)``); for
            loss-only methods they weight the losses. ``None`` when the method has no natural
            weights (it must then give ``direction``).
        direction: explicit shared update in the space of ``MethodInput.grads``; overrides
            ``Gᵀw`` when given.
        solver: the inner solver's report, if the method has one.
        extras: anything else worth logging (e.g. the min-norm simplex weights).
        head_weights: coefficients ``c`` for the task-specific parameters (they receive
            ``Σ c_k ∇ℓ_k``) when the method defines them itself (hybrid IMTL: ``e^{s_k}``);
            overrides the head policy.
        applied: the method already updated the parameters itself through
            ``MethodInput.update`` (sequential methods such as selective group updates): the
            engine writes no gradient and does not step the optimizer again.
    """

    weights: Tensor | None
    direction: Tensor | None = None
    solver: SolverReport | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    head_weights: Tensor | None = None
    applied: bool = False


class Method:
    """Base class of every multi-task method.

    Subclasses set ``name`` and ``needs``, take their hyperparameters as keyword-only arguments of
    ``__init__`` (with the papers' defaults) and store each one as an attribute of the same name,
    then implement :meth:`aggregate`. ``head_policy`` says what task-specific parameters receive:
    ``raw`` (head k gets ``∇ℓ_k``) or ``weighted`` (head k gets ``w_k ∇ℓ_k``).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[Need] = Need.LOSSES
    default_head_policy: ClassVar[str] = "weighted"
    #: For ``Need.META_BATCH`` methods: the data split the meta batch is drawn from.
    meta_split: str | None = None
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
        if "head_policy" in out:  # shown last, with the class's own default
            del out["head_policy"]
            out["head_policy"] = cls.default_head_policy
        return out

    @property
    def hparams(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.hyperparameters()}

    # -- the step ----------------------------------------------------------------------------
    def aggregate(self, inputs: MethodInput) -> Aggregation:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, inputs: MethodInput) -> dict[str, Any]:
        """Called once the base optimizer has stepped, for methods that declare
        ``Need.CLOSURE`` (e.g. a post-step update from the new losses of the same batch, which
        ``inputs.evaluate()`` provides). Returns values to merge into ``StepInfo.extras``."""
        return {}

    def task_input(self, features: Tensor, index: int | None) -> Tensor:
        """What the head of task ``index`` sees: ``features`` itself, unless the method
        transforms the representation per task (RotoGrad rotates it). ``index`` is ``None``
        while the engine does not know the task names yet (before the first step)."""
        return features

    def to(self, device: torch.device) -> None:
        """Move state restored by ``load_state_dict`` to the model's device (no-op unless the
        method holds tensors that join the computation, like RotoGrad's rotations)."""

    def new_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups the method created since the last call (RotoGrad's rotations),
        for the engine to add to the base optimizer. A group's ``lr_scale`` entry multiplies the
        learning rate of the base optimizer's first group that is not a Muon group. Methods
        without parameters return ``[]``."""
        return []

    def end_epoch(self) -> None:
        """Told by :meth:`MultiTaskOptimizer.end_epoch` when a training epoch is over
        (epoch-based methods such as DWA's original form use it; others ignore it)."""

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


def check_choice(method: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise a ValueError naming the method, the option and the valid choices."""
    if value not in choices:
        raise ValueError(f"{method}: {name} must be one of {choices}, got {value!r}")


def as_weights(values: Any, inputs: MethodInput) -> Tensor:
    """``values`` (array or tensor) as weights on the device of the method's gradient inputs (of
    the losses for loss-only methods), in their dtype or float32, whichever is wider: weights of
    a float16 model may exceed float16's range while ``Gᵀw`` does not."""
    ref = inputs.grads if inputs.grads is not None else inputs.losses
    dtype = torch.promote_types(ref.dtype, torch.float32)
    return torch.as_tensor(values).to(dtype=dtype, device=ref.device)
