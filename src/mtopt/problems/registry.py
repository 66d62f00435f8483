"""Name → problem class registry, like the method registry (:mod:`mtopt.core.registry`).

A problem family registers its class with :func:`register_problem`, with the variants it takes
as its first argument (``multi_mnist/cl_rr``) or none (``yeast``); :func:`get_problem` builds one
by name and :func:`available_problems` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from mtopt.problems.base import Problem

P = TypeVar("P", bound=type[Problem])

#: family → (class, its variants; empty when the family is one problem). The class is held as a
#: callable: each family's constructor takes its own arguments (the variant first, or none),
#: which ``Problem`` itself does not declare.
_FAMILIES: dict[str, tuple[Callable[..., Problem], tuple[str, ...]]] = {}


def register_problem(family: str, variants: Iterable[str] = ()) -> Callable[[P], P]:
    """Class decorator: register a problem family (``family/variant`` names, or ``family``
    alone when ``variants`` is empty)."""

    def register(cls: P) -> P:
        if family in _FAMILIES and _FAMILIES[family][0] is not cls:
            raise ValueError(f"problem family {family!r} registered twice")
        _FAMILIES[family] = (cls, tuple(variants))
        return cls

    return register


def available_problems() -> list[str]:
    """Every registered problem name, sorted by family (variants in their declared order)."""
    return [
        f"{family}/{v}" if v else family
        for family, (_, variants) in sorted(_FAMILIES.items())
        for v in (variants or ("",))
    ]


def get_problem(name: str, **kwargs: Any) -> Problem:
    """Build a problem by name (``kwargs`` go to its class: data folders, model sizes)."""
    family, _, variant = name.partition("/")
    entry = _FAMILIES.get(family)
    if entry is not None:
        cls, variants = entry
        if variants and variant in variants:
            return cls(variant, **kwargs)
        if not variants and not variant:
            return cls(**kwargs)
    raise ValueError(f"unknown problem {name!r}; available: {', '.join(available_problems())}")
