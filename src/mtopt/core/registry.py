"""Name → method class registry used by :func:`mtopt.make` and the CLI."""

from __future__ import annotations

import inspect
from typing import Any

from mtopt.core.method import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """The registered method names, sorted.

    >>> import mtopt
    >>> {"mgda", "unitary", "upgrad"} <= set(mtopt.available_methods())
    True
    """
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (a ``ValueError`` lists the registered names).

    >>> method_class("mgda").levels
    ('param', 'rep')
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(available_methods())}"
        ) from None


def make(name: str, **hparams: Any) -> Method:
    """Build a method by name, rejecting unknown hyperparameters with the list of valid ones.

    >>> make("unitary", reduction="mean")
    Unitary(reduction='mean', head_policy='weighted')
    >>> make("unitary", reductoin="mean")
    Traceback (most recent call last):
    ...
    ValueError: unknown hyperparameter(s) ['reductoin'] for method 'unitary'; valid: ...
    >>> make("fixed")
    Traceback (most recent call last):
    ...
    ValueError: method 'fixed' requires hyperparameter(s) ['weights']
    """
    cls = method_class(name)
    valid = cls.hyperparameters()
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={_fmt(v)}" for k, v in valid.items())
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for method {name!r}; valid: {listing}"
        )
    missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in hparams]
    if missing:
        raise ValueError(f"method {name!r} requires hyperparameter(s) {missing}")
    return cls(**hparams)


def _fmt(v: Any) -> str:
    return "<required>" if v is inspect.Parameter.empty else repr(v)
