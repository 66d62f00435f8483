"""Every method's hyperparameters are validated at construction.

A value of the wrong type, out of range or not finite is refused by ``mtopt.make`` with a one-line
``ValueError`` that starts with the method's name and names the hyperparameter, before the method
exists (never a ``TypeError``, never an error steps later). The bad values are derived from the
annotations of each method's ``__init__`` (:mod:`mtopt.core.hparams`), over the whole registry: a
new method is covered without touching this file.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
import warnings
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mtopt
from mtopt.core.registry import method_class

NAMES = mtopt.available_methods()
#: Hyperparameters without a default, given a valid value.
REQUIRED: dict[str, dict[str, Any]] = {"fixed": {"weights": [0.5, 1.5]}}


def make(name: str, **hparams: Any) -> mtopt.Method:
    with warnings.catch_warnings():  # e.g. fixed's warning about negative weights
        warnings.simplefilter("ignore")
        return mtopt.make(name, **{**REQUIRED.get(name, {}), **hparams})


def annotations(name: str) -> dict[str, Any]:
    """Each hyperparameter's annotation (with its ``Annotated`` constraints), as the most
    derived ``__init__`` that takes it declares it."""
    cls = method_class(name)
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        raw = inspect.unwrap(init)
        hints = typing.get_type_hints(raw, include_extras=True)
        for p in inspect.signature(raw).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out[p.name] = hints.get(p.name, Any)
    assert set(out) == set(cls.hyperparameters()), name
    return out


# -- reading an annotation ---------------------------------------------------------------------
def _split_optional(annotation: Any) -> tuple[list[Any], bool]:
    """The non-``None`` members of a union, and whether ``None`` is one of them."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _constraints(annotation: Any) -> tuple[Any, list[Any]]:
    """``(base type, [annotated_types constraints, ...])`` of a possibly ``Annotated`` type."""
    if get_origin(annotation) is not Annotated:
        return annotation, []
    found: list[Any] = []
    for meta in annotation.__metadata__:
        found.extend(getattr(meta, "metadata", [meta]))  # a pydantic Field holds a list
    base, inner = _constraints(annotation.__origin__)
    return base, inner + found


def _finite_only(constraints: list[Any]) -> bool:
    return any(getattr(c, "allow_inf_nan", True) is False for c in constraints)


def _bounds(constraints: list[Any]) -> dict[str, Any]:
    out = {}
    for c in constraints:
        for kind in ("ge", "gt", "le", "lt"):
            if isinstance(c, getattr(annotated_types, kind.capitalize())):
                out[kind] = getattr(c, kind)
    return out


def bad_values(annotation: Any) -> list[Any]:
    """Inputs that ``annotation`` refuses (one of each kind of mistake)."""
    members, optional = _split_optional(annotation)
    bad: list[Any] = [] if optional else [None]
    for member in members:
        bad.extend(_bad_for(member))
    return bad


def _bad_for(annotation: Any) -> list[Any]:
    base, constraints = _constraints(annotation)
    bounds = _bounds(constraints)
    origin = get_origin(base)
    if origin is Literal:
        choices = get_args(base)
        if all(isinstance(c, str) for c in choices):
            return ["not-a-choice", 1.5]
        return [max(choices) + 1, min(choices) - 1, "x", True]  # True == 1, never a choice
    if origin is collections.abc.Sequence:
        (item,) = get_args(base)
        inner = [b for b in _bad_for(item) if b is not None]
        return ["abc", 1.5, *[[b] for b in inner]]
    if base is bool:
        return ["maybe", 2]
    if base is int:
        out: list[Any] = [2.5, "x", True]  # Python's bool is an int; never a count or a seed
        if "ge" in bounds:
            out.append(bounds["ge"] - 1)
        if "gt" in bounds:
            out.append(bounds["gt"])
        if "le" in bounds:
            out.append(bounds["le"] + 1)
        if "lt" in bounds:
            out.append(bounds["lt"])
        return out
    if base is float:
        out = ["abc", True, False]
        if _finite_only(constraints):
            out += [math.nan, math.inf, -math.inf]
        if "ge" in bounds:
            out.append(math.nextafter(bounds["ge"], -math.inf))
        if "gt" in bounds:
            out.append(bounds["gt"])
        if "le" in bounds:
            out.append(math.nextafter(bounds["le"], math.inf))
        if "lt" in bounds:
            out.append(bounds["lt"])
        return out
    if base is str:  # only Method's own head_policy (checked by hand there)
        return []
    raise AssertionError(f"no bad values known for the annotation {annotation!r}")


def edge_values(annotation: Any) -> list[Any]:
    """Values on the edge of a numeric range, which must be accepted."""
    members, _ = _split_optional(annotation)
    out: list[Any] = []
    for member in members:
        base, constraints = _constraints(member)
        bounds = _bounds(constraints)
        if base not in (int, float):
            continue
        if "ge" in bounds:
            out.append(bounds["ge"])
        if "le" in bounds:
            out.append(bounds["le"])
        if base is float and "gt" in bounds:
            out.append(math.nextafter(bounds["gt"], math.inf))
        if base is float and "lt" in bounds:
            out.append(math.nextafter(bounds["lt"], -math.inf))
    return out


def _cases(values, extra: dict[str, list[Any]] | None = None) -> list[Any]:
    return [
        pytest.param(name, hp, value, id=f"{name}-{hp}-{value!r}")
        for name in NAMES
        for hp, annotation in annotations(name).items()
        for value in [*values(annotation), *(extra or {}).get(hp, [])]
    ]


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_defaults_construct(name):
    method = make(name)
    assert method.name == name
    defaults = method_class(name).hyperparameters()
    assert set(method.hparams) == set(defaults)
    for hp, default in defaults.items():
        if default is not inspect.Parameter.empty and hp != "head_policy":
            assert method.hparams[hp] == default, (name, hp)


@pytest.mark.parametrize("name", NAMES)
def test_every_hyperparameter_is_constrained(name):
    """Every float is declared finite, every choice a ``Literal``, no bare ``Any``; so that a
    new hyperparameter cannot skip validation by a loose annotation."""
    for hp, annotation in annotations(name).items():
        assert annotation is not Any, (name, hp)
        for member in _split_optional(annotation)[0]:
            base, constraints = _constraints(member)
            if base is float:
                assert _finite_only(constraints), f"{name}: {hp} accepts nan/inf"
            if get_origin(base) is collections.abc.Sequence:
                item, item_constraints = _constraints(get_args(base)[0])
                if item is float:
                    assert _finite_only(item_constraints), f"{name}: {hp} accepts nan/inf"
            if base is str:
                assert hp == "head_policy", f"{name}: {hp} is a bare str"
                assert name == "gls", f"{name}: {hp} is a bare str"


@pytest.mark.parametrize(("name", "hp", "value"), _cases(bad_values, {"head_policy": ["sum"]}))
def test_bad_values_are_refused_at_construction(name, hp, value):
    with pytest.raises(ValueError, match=f"^{name}: ") as exc:
        make(name, **{hp: value})
    message = str(exc.value)
    assert message.startswith(f"{name}: "), message
    assert hp in message, message
    assert "\n" not in message, message


@pytest.mark.parametrize(("name", "hp", "value"), _cases(edge_values))
def test_edges_of_the_ranges_are_accepted(name, hp, value):
    method = make(name, **{hp: value})
    assert method.hparams[hp] == value


@pytest.mark.parametrize(
    ("name", "hparams", "fragment"),
    [
        ("graddrop", {"k": math.nan}, "k must be a finite number"),
        ("nash_mtl", {"tol": -1}, "tol must be greater than 0"),
        ("selective_groups", {"damping": 5}, "damping must be less than 1"),
        ("selective_groups", {"damping": 0.4}, "damping must be greater than or equal to 0.5"),
        ("cagrad", {"c": "abc"}, "c must be a valid number"),
        ("fixed", {"weights": [0.0, 0.0]}, "weights are all 0"),
        ("fixed", {"weights": []}, "weights must not be empty"),
        ("fixed", {"weights": [1.0, math.inf]}, "weights must be a finite number"),
        ("fixed", {"weights": "12"}, "weights"),
        ("upgrad", {"pref_vector": [0.0, 0.0]}, "pref_vector must have an entry > 0"),
        ("upgrad", {"pref_vector": [0.5, -0.5]}, "pref_vector must be greater than or equal"),
        ("uw", {"loss_types": ["gaussian"]}, "loss_types must be 'regression'"),
        ("famo", {"min_losses": [0.0, math.nan]}, "min_losses must be a finite number"),
        ("pcgrad", {"seed": 2**64}, "seed must be less than or equal"),
        ("rotograd", {"rotation_size": 0}, "rotation_size must be greater than or equal to 1"),
    ],
)
def test_named_examples(name, hparams, fragment):
    with pytest.raises(ValueError, match=f"^{name}: ") as exc:
        make(name, **hparams)
    assert fragment in str(exc.value)


def _literal(name: str, hp: str) -> set[Any]:
    return set(_choices(annotations(name)[hp]))


def test_choices_match_the_constants_the_code_dispatches_on():
    from mtopt.core.method import HEAD_POLICIES
    from mtopt.core.min_norm import SOLVERS
    from mtopt.core.registry import method_class
    from mtopt.methods.mgda import APPLY_TO, NORMALIZATIONS
    from mtopt.methods.uw import UW_TYPED_CONSTANTS

    reductions = {"sum", "mean"}

    for name in NAMES:
        hints = annotations(name)
        if name != "gls":  # Method.__init__ itself (head_policy: str | None)
            assert _literal(name, "head_policy") == set(HEAD_POLICIES), name
        if "level" in hints:
            assert _literal(name, "level") == set(method_class(name).levels), name
        if "reduction" in hints:
            assert _literal(name, "reduction") == reductions, name
    for name in ("mgda", "mgda_ub", "edm", "cdtt"):
        assert _literal(name, "solver") == set(SOLVERS), name
    assert _literal("mgda", "normalization") == set(NORMALIZATIONS)
    assert _literal("mgda", "apply_to") == set(APPLY_TO)
    (item,) = get_args(_split_optional(annotations("uw")["loss_types"])[0][0])
    assert set(get_args(item)) == set(UW_TYPED_CONSTANTS)


def test_a_boolean_for_a_number_is_one_line_with_the_value_once():
    exact = r"^cagrad: c must be a number, not a boolean \(got True\)$"
    with pytest.raises(ValueError, match=exact):
        make("cagrad", c=True)
    with pytest.raises(ValueError, match="rescale"):
        make("cagrad", rescale=True)  # a Literal[0, 1, 2]: True == 1 would be a second key


def test_values_are_coerced_the_way_a_user_means_them():
    method = make("cagrad", c="0.25", max_iter=7.0)
    assert method.c == 0.25
    assert method.max_iter == 7
    assert isinstance(method.max_iter, int)
    np = pytest.importorskip("numpy")
    import torch

    assert make("fixed", weights=np.array([0.25, 0.75])).weights == (0.25, 0.75)
    assert make("fixed", weights=torch.tensor([0.5, 1.0])).weights == (0.5, 1.0)
    assert make("upgrad", pref_vector=(1, 2)).pref_vector == (1.0, 2.0)


_ANY_VALUE = st.one_of(
    st.floats(),  # nan, ±inf, huge, tiny, negative
    st.integers(),
    st.integers(-3, 3),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.one_of(st.floats(), st.integers(-3, 3), st.text(max_size=3)), max_size=4),
)


def _choices(annotation: Any) -> list[Any]:
    members, _ = _split_optional(annotation)
    out = []
    for member in members:
        base, _ = _constraints(member)
        if get_origin(base) is Literal:
            out.extend(get_args(base))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_hyperparameters_are_accepted_finite_or_refused_in_one_line(data):
    name = data.draw(st.sampled_from(NAMES), label="method")
    hints = annotations(name)
    chosen = data.draw(st.lists(st.sampled_from(sorted(hints)), unique=True), label="hparams")
    hparams = {}
    for hp in chosen:
        choices = _choices(hints[hp])
        strategy = _ANY_VALUE if not choices else st.one_of(_ANY_VALUE, st.sampled_from(choices))
        hparams[hp] = data.draw(strategy, label=hp)
    try:
        method = make(name, **hparams)
    except ValueError as exc:  # any other exception type fails the test
        message = str(exc)
        assert message.startswith(f"{name}: "), message
        assert "\n" not in message, message
        event("refused")
        return
    event("accepted")
    for hp, value in method.hparams.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int | float) and not isinstance(v, bool):
                assert math.isfinite(v), (name, hp, value)
