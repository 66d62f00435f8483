"""Method specs: one grammar for ``train``, ``compare``, ``sweep`` and ``bench``, parsed here.

::

    spec     := NAME (":" KEY "=" VALUE)* ("@" OPTIMIZER)? ("#" ENGINE)?
    VALUE    := a number, true/false, a word, or a list "a/b/c"
    OPTIMIZER:= adam | muon | apt | muon+apt      (the base optimizer: Adam, Muon, with APT)
    ENGINE   := auto | jacobian | batched | gramian (how per-task gradients are obtained)

Examples: ``mgda``, ``cagrad:c=0.2``, ``fixed:weights=0.1/0.9``, ``mgda_ub@muon``,
``upgrad#gramian``, ``cagrad:c=0.5@apt#jacobian``. The base optimizer and the gradient engine
have distinct suffixes; without one the run's (or the benchmark's) default applies. Parsing
builds the method once, so an unknown name or hyperparameter fails before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtopt.core.registry import make
from mtopt.engine.optimizer import ENGINES

__all__ = [
    "OPTIMIZERS",
    "MethodSpec",
    "format_spec",
    "optimizer_label",
    "parse_spec",
    "parse_value",
    "run_options",
]

#: The base optimizers a spec may name after ``@``, with the run options they set.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adam": {"optimizer": "adam", "apt": False},
    "muon": {"optimizer": "muon", "apt": False},
    "apt": {"optimizer": "adam", "apt": True},
    "muon+apt": {"optimizer": "muon", "apt": True},
}


def optimizer_label(options: Mapping[str, Any]) -> str:
    """The name in :data:`OPTIMIZERS` of a run's base-optimizer options (``optimizer``, ``apt``;
    absent ones are the defaults, Adam without APT).

    >>> optimizer_label({}), optimizer_label({"apt": True}), optimizer_label(OPTIMIZERS["muon+apt"])
    ('adam', 'apt', 'muon+apt')
    """
    name = str(options.get("optimizer", "adam"))
    if options.get("apt"):
        return "apt" if name == "adam" else f"{name}+apt"
    return name


@dataclass(frozen=True)
class MethodSpec:
    """A parsed spec: the method's registered name and hyperparameters, the base-optimizer
    options (``{}``: the default) and the gradient engine (``None``: the default)."""

    text: str
    name: str
    hparams: Mapping[str, Any] = field(default_factory=dict)
    optimizer: Mapping[str, Any] = field(default_factory=dict)
    engine: str | None = None

    @property
    def method(self) -> str:
        """The method part, ``NAME:key=value...``, without the suffixes."""
        return format_spec(self.name, self.hparams)


def run_options(spec: MethodSpec) -> dict[str, Any]:
    """The run-configuration fields a spec's suffixes set (``optimizer``, ``apt``, ``engine``;
    empty without suffixes).

    >>> run_options(parse_spec("mgda_ub@muon#jacobian"))
    {'optimizer': 'muon', 'apt': False, 'engine': 'jacobian'}
    >>> run_options(parse_spec("mgda_ub"))
    {}
    """
    options = dict(spec.optimizer)
    if spec.engine is not None:
        options["engine"] = spec.engine
    return options


def parse_value(text: str) -> Any:
    """A value typed in a spec, on the command line or in ``--set``: ``a/b`` a list,
    ``true``/``false`` booleans, then int, float, else the string itself.

    >>> parse_value("0.1/0.9"), parse_value("True"), parse_value("2"), parse_value("l2")
    ([0.1, 0.9], True, 2, 'l2')
    """
    if "/" in text:
        return [parse_value(t) for t in text.split("/")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def format_spec(name: str, hparams: Mapping[str, Any]) -> str:
    """The inverse of the method part of :func:`parse_spec`: ``NAME:key=value...``.

    >>> format_spec("fixed", {"weights": [0.1, 0.9]})
    'fixed:weights=0.1/0.9'
    """

    def text(v: Any) -> str:
        return "/".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    return ":".join([name, *(f"{k}={text(v)}" for k, v in hparams.items())])


def parse_spec(
    text: str,
    *,
    build: bool = True,
    allow: Sequence[str] = ("optimizer", "engine"),
) -> MethodSpec:
    """Parse ``text`` (module doc). ``build``: build the method once, so an unknown name or a bad
    hyperparameter fails here. ``allow``: the suffixes the caller supports (a ``ValueError``
    names a suffix it does not).

    >>> spec = parse_spec("cagrad:c=0.5@apt#jacobian")
    >>> spec.name, dict(spec.hparams), spec.engine
    ('cagrad', {'c': 0.5}, 'jacobian')
    >>> dict(spec.optimizer)
    {'optimizer': 'adam', 'apt': True}
    >>> spec.method
    'cagrad:c=0.5'
    >>> parse_spec("fixed:weights=0.1/0.9").hparams
    {'weights': [0.1, 0.9]}
    >>> parse_spec("mgda@sgd")
    Traceback (most recent call last):
    ...
    ValueError: bad optimizer suffix @sgd in 'mgda@sgd': use @adam, @muon, @apt, @muon+apt
    >>> parse_spec("cagrad:c=0.5:c=0.6")
    Traceback (most recent call last):
    ...
    ValueError: c is set twice in method spec 'cagrad:c=0.5:c=0.6': keep one
    >>> parse_spec("mgda#gramian", allow=("optimizer",))
    Traceback (most recent call last):
    ...
    ValueError: 'mgda#gramian': a gradient engine (#gramian) is not supported here
    """
    spec = text.strip()
    rest, hash_, engine = spec.partition("#")
    rest, at, optimizer = rest.partition("@")
    if hash_ and "@" in engine:
        raise ValueError(f"in {spec!r}: write the base optimizer before the engine (NAME@opt#eng)")
    name, *pairs = rest.strip().split(":")
    name = name.strip()
    if not name:
        raise ValueError(f"method spec {spec!r} names no method")
    hparams: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad hyperparameter {pair!r} in method spec {spec!r}: use key=value")
        if key.strip() in hparams:
            raise ValueError(f"{key.strip()} is set twice in method spec {spec!r}: keep one")
        hparams[key.strip()] = parse_value(value.strip())
    options: dict[str, Any] = {}
    if at:
        if "optimizer" not in allow:
            raise ValueError(f"{spec!r}: a base optimizer (@{optimizer}) is not supported here")
        if optimizer.strip() not in OPTIMIZERS:
            raise ValueError(
                f"bad optimizer suffix @{optimizer} in {spec!r}: use "
                + ", ".join("@" + k for k in OPTIMIZERS)
            )
        options = dict(OPTIMIZERS[optimizer.strip()])
    chosen = None
    if hash_:
        if "engine" not in allow:
            raise ValueError(f"{spec!r}: a gradient engine (#{engine}) is not supported here")
        chosen = engine.strip()
        if chosen not in ENGINES:
            choices = ", ".join("#" + e for e in ENGINES)
            raise ValueError(f"bad engine suffix #{engine} in {spec!r}: use {choices}")
    if build:
        make(name, **hparams)
    return MethodSpec(spec, name, hparams, options, chosen)
