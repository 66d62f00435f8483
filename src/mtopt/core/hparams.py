"""Hyperparameter types and their validation at construction.

Every method's ``__init__`` declares its hyperparameters as keyword-only arguments whose
annotations say what is valid (``Positive``, ``UnitInterval``, ``Literal["sum", "mean"]``, ...).
:class:`~mtopt.core.method.Method` wraps each subclass's ``__init__`` with pydantic's
``validate_call``: a value of the wrong type, out of range, or not finite is refused before the
method exists, with one line that names the method, the hyperparameter, what it must be and
what it got. Values are coerced the way a user means them (``"0.5"`` and ``1`` are floats, ``2.0``
an integer), never silently changed (``2.5`` is not an integer; ``"yes"`` is not a float; a
boolean is not a number, although Python counts ``True`` as 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, validate_call


def _not_bool(value: Any) -> Any:
    """``value`` unchanged unless it is a boolean: pydantic's lax mode would read ``True`` as the
    number 1 (``lr = true`` in a sweep file, ``epochs=True`` in code), never what was meant."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")  # callers show the value
    return value


#: The validator every numeric type here carries: a boolean is refused, with one line;
#: a method declaring its own numeric range adds it too.
NotBool = BeforeValidator(_not_bool)
#: A finite float.
Real = Annotated[float, Field(allow_inf_nan=False), NotBool]
#: A finite float ≥ 0.
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False), NotBool]
#: A finite float > 0.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False), NotBool]
#: A float in [0, 1].
UnitInterval = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False), NotBool]
#: A float in [0, 1).
HalfOpenUnit = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False), NotBool]
#: A float in (0, 1] (a rate that must move something, such as an EMA's decay).
PositiveUnit = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), NotBool]
#: An integer ≥ 1.
PositiveInt = Annotated[int, Field(ge=1), NotBool]
#: An integer ≥ 0.
NonNegativeInt = Annotated[int, Field(ge=0), NotBool]
#: A random seed (an integer in [0, 2⁶⁴ − 1], what ``torch.Generator.manual_seed`` takes) or
#: ``None`` (the global generator).
Seed = Annotated[int, Field(ge=0, le=2**64 - 1), NotBool] | None
#: A run's seed: an integer in [0, 2⁶³ − 1], what torch takes and a run store's SQLite INTEGER
#: holds.
RunSeed = Annotated[int, Field(ge=0, le=2**63 - 1), NotBool]
#: A study's first seed (its runs use ``random_seed + i``): [0, 2⁶²], far from 2⁶³ for any count.
StudySeed = Annotated[int, Field(ge=0, le=2**62), NotBool]
#: The most seeds a study or a comparison runs per configuration: far above any protocol's
#: (Gama & Grassi run 10), and a bound that turns a typo (``n_best_runs = 1e12``) into an error
#: instead of a process that builds the list of its seeds until memory runs out.
MAX_SEEDS = 10_000
#: A count of seeds: an integer in [1, :data:`MAX_SEEDS`].
SeedCount = Annotated[int, Field(ge=1, le=MAX_SEEDS), NotBool]
#: The most torch intra-op threads a ``--threads`` accepts: far above any machine's cores, and
#: below the counts at which torch's thread pool crashes the process (100,000 segfaults).
MAX_THREADS = 1024


def check_threads(threads: int | None) -> None:
    """A ``--threads`` value (``None``: torch's choice) in [1, :data:`MAX_THREADS`], or a
    one-line ``ValueError``."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {threads}")


def _as_list(value: Any) -> Any:
    """A NumPy array or tensor as its ``tolist()`` (so that it validates as a sequence);
    anything else unchanged."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and not isinstance(value, str | bytes):
        return tolist()
    return value


#: A sequence of finite floats: a list, a tuple, or a 1-D NumPy array or tensor (a string is
#: not one). Its length is the method's to check, against the number of tasks.
Reals = Annotated[Sequence[Real], BeforeValidator(_as_list)]
#: A sequence of finite floats ≥ 0, like :data:`Reals`.
NonNegatives = Annotated[Sequence[NonNegative], BeforeValidator(_as_list)]

_CONFIG = ConfigDict(arbitrary_types_allowed=True)


def validated(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` with its arguments validated against its annotations; a failure is a one-line
    ``ValueError`` naming the method (the instance's ``name``) and the hyperparameter."""
    # the decorator-factory form: the same call as ``validate_call(init, config=...)``, which
    # pydantic's overloads do not spell
    checked = validate_call(config=_CONFIG)(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            checked(self, *args, **kwargs)
        except ValidationError as exc:
            raise ValueError(describe(getattr(self, "name", type(self).__name__), exc)) from None

    wrapper.__mtopt_validated__ = True  # type: ignore[attr-defined]
    return wrapper


def describe(owner: str, exc: ValidationError) -> str:
    """One line for every invalid argument: ``owner: name must ... (got value)``."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error.get("loc", ()) if p not in ("self",)]
        name = loc[0] if loc else "argument"
        message = str(error.get("msg", "is invalid"))
        message = message.replace("Input should be", "must be").replace("Value error, ", "")
        if message.startswith("Input"):
            message = message.replace("Input", "must", 1)
        got = error.get("input")
        parts.append(f"{name} {message} (got {got!r})")
    return f"{owner}: " + "; ".join(parts)


def describe_fields(exc: ValidationError) -> str:
    """One line for a failed model or dataclass validation: ``field must ... (got value)``;
    nested fields are dotted (``base.epochs``)."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in error.get("loc", ()))
        kind = error.get("type")
        if kind == "missing":
            message = "is required"
        elif kind == "too_short":
            message = "must not be empty"
        else:
            message = str(error.get("msg", "is invalid"))
            message = message.replace("Input should be", "must be").replace("Value error, ", "")
            message = message.replace("String should match pattern", "must match")
            if message.startswith("Input"):
                message = message.replace("Input", "must", 1)
        shown = ""
        if loc and kind not in ("missing", "too_short", "value_error"):
            shown = f" (got {error.get('input')!r})"
        parts.append(f"{loc + ' ' if loc else ''}{message}{shown}".strip())
    return "; ".join(parts)
