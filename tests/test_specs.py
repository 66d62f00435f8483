"""The one spec grammar (``mtopt.specs``): NAME[:key=value...][@optimizer][#engine]."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtopt.experiments.compare import parse_row_spec
from mtopt.specs import OPTIMIZERS, format_spec, parse_spec, parse_value, run_options


def test_the_method_part():
    assert parse_spec("mgda").name == "mgda"
    assert parse_spec("mgda").hparams == {}
    spec = parse_spec("mgda:normalization=l2:max_iter=10:tol=1e-6")
    assert (spec.name, dict(spec.hparams)) == (
        "mgda",
        {"normalization": "l2", "max_iter": 10, "tol": 1e-6},
    )
    assert parse_spec("fixed:weights=0.1/0.9").hparams == {"weights": [0.1, 0.9]}
    assert parse_spec(" cagrad : c = 0.2 ").hparams == {"c": 0.2}


def test_the_suffixes_are_distinct():
    spec = parse_spec("cagrad:c=0.5@apt#jacobian")
    assert spec.name == "cagrad"
    assert spec.hparams == {"c": 0.5}
    assert spec.optimizer == {"optimizer": "adam", "apt": True}
    assert spec.engine == "jacobian"
    assert run_options(spec) == {"optimizer": "adam", "apt": True, "engine": "jacobian"}
    assert run_options(parse_spec("upgrad#gramian")) == {"engine": "gramian"}
    assert run_options(parse_spec("mgda_ub@muon")) == {"optimizer": "muon", "apt": False}
    assert run_options(parse_spec("unitary")) == {}
    for suffix, options in OPTIMIZERS.items():
        assert parse_spec(f"unitary@{suffix}").optimizer == options


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mgda:l2", "key=value"),
        ("", "names no method"),
        ("unitary@sgd", "bad optimizer suffix @sgd"),
        ("unitary#fast", "bad engine suffix #fast"),
        ("unitary#gramian@muon", "before the engine"),
        ("nope", "unknown method 'nope'"),
        ("mgda:colour=red", "unknown hyperparameter"),
        ("cagrad:c=-1", "cagrad"),
    ],
)
def test_bad_specs_fail_in_one_line(text, match):
    with pytest.raises(ValueError, match=match) as exc:
        parse_spec(text)
    assert "\n" not in str(exc.value)


def test_a_caller_states_which_suffixes_it_supports():
    with pytest.raises(ValueError, match=r"base optimizer .* not supported"):
        parse_spec("unitary@muon", allow=("engine",))
    with pytest.raises(ValueError, match=r"gradient engine .* not supported"):
        parse_spec("upgrad#gramian", allow=("optimizer",))
    assert parse_spec("nope:x=1", build=False).name == "nope"


def test_compare_rows_use_the_grammar():
    assert parse_row_spec("mgda_ub") == ("mgda_ub", {}, {})
    assert parse_row_spec("cagrad:c=0.2@muon#batched") == (
        "cagrad",
        {"c": 0.2},
        {"optimizer": "muon", "apt": False, "engine": "batched"},
    )


def test_values():
    assert parse_value("3") == 3
    assert parse_value("1e-3") == 1e-3
    assert parse_value("true") is True
    assert parse_value("False") is False
    assert parse_value("a/2/0.5") == ["a", 2, 0.5]
    assert parse_value("l2") == "l2"


words = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
values = st.one_of(
    st.integers(-1000, 1000),
    st.floats(-1e6, 1e6, allow_nan=False).filter(lambda v: v != int(v)),
    words.filter(lambda w: w not in ("true", "false")),
    st.booleans(),
)


@given(words, st.dictionaries(words, values, max_size=4))
def test_format_and_parse_are_inverse(name, hparams):
    text = format_spec(
        name, {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in hparams.items()}
    )
    spec = parse_spec(text, build=False)
    assert spec.name == name
    assert dict(spec.hparams) == hparams
    assert spec.method == format_spec(name, spec.hparams)
