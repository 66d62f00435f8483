"""The registry (``mtopt.make``, ``mtopt.methods``) and the ``Method`` base class contract."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import mtopt
from mtopt import Method, MethodInput
from mtopt.core.registry import method_class, register

EXPECTED = ("fixed", "mgda", "mgda_ub", "unitary")


def test_methods_lists_the_registered_names():
    names = mtopt.available_methods()
    assert set(EXPECTED) <= set(names)
    assert names == sorted(names)
    for name in names:
        cls = method_class(name)
        assert issubclass(cls, Method)
        assert cls.name == name


def test_make_rejects_unknown_method_and_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'mgdaa'") as exc:
        mtopt.make("mgdaa")
    for name in EXPECTED:
        assert name in str(exc.value)


def test_make_rejects_unknown_hyperparameters_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"\['lr', 'normalisation'\]") as exc:
        mtopt.make("mgda", normalisation="l2", lr=0.1)
    message = str(exc.value)
    for hp in (
        "normalization='loss+'",
        "solver='wolfe'",
        "apply_to=",
        "max_iter=250",
        "tol=",
        "pair_clamp=",
        "head_policy='weighted'",
    ):
        assert hp in message, (hp, message)


def test_fixed_requires_weights():
    assert method_class("fixed").hyperparameters()["weights"] is inspect.Parameter.empty
    with pytest.raises(ValueError, match=r"requires hyperparameter\(s\) \['weights'\]"):
        mtopt.make("fixed")
    with pytest.raises(ValueError, match="weights=<required>"):
        mtopt.make("fixed", weight=[1.0])


@pytest.mark.parametrize("name", EXPECTED)
def test_hyperparameters_are_attributes_and_head_policy_is_last(name):
    extra = {"weights": [0.25, 0.75]} if name == "fixed" else {}
    method = mtopt.make(name, **extra)
    hps = type(method).hyperparameters()
    assert list(hps)[-1] == "head_policy"
    assert set(method.hparams) == set(hps)
    assert method.hparams["head_policy"] == method.head_policy == "weighted"
    method_raw = mtopt.make(name, head_policy="raw", **extra)
    assert method_raw.head_policy == "raw"
    assert method_raw.hparams["head_policy"] == "raw"
    with pytest.raises(ValueError, match="head_policy"):
        mtopt.make(name, head_policy="sum", **extra)
    assert repr(method).startswith(type(method).__name__ + "(")


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("unitary", {"reduction": "mean"}),
        ("fixed", {"weights": [0.2, 0.8]}),
        ("mgda", {"normalization": "l2", "solver": "wolfe", "max_iter": 17}),
        ("mgda_ub", {"apply_to": "normalized_grads", "head_policy": "raw"}),
    ],
)
def test_state_dict_round_trip(name, hparams):
    method = mtopt.make(name, **hparams)
    state = method.state_dict()
    assert state["name"] == name
    state = json.loads(json.dumps(state))  # plain data: checkpointable anywhere
    twin = mtopt.make(name, **hparams)
    twin.load_state_dict(state)
    assert twin.hparams == method.hparams
    assert twin.state_dict() == method.state_dict()
    # the round trip preserves behaviour
    losses = torch.tensor([0.5, 2.0], dtype=torch.float64)
    grads = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
    a = method.aggregate(MethodInput(losses, ("a", "b"), grads=grads)).weights
    b = twin.aggregate(MethodInput(losses, ("a", "b"), grads=grads)).weights
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_with_other_hparams_is_rejected():
    state = mtopt.make("mgda", normalization="l2").state_dict()
    with pytest.raises(ValueError, match="hyperparameters"):
        mtopt.make("mgda", normalization="none").load_state_dict(state)
    state = mtopt.make("fixed", weights=[1.0, 2.0]).state_dict()
    with pytest.raises(ValueError, match="hyperparameters"):
        mtopt.make("fixed", weights=[1.0, 3.0]).load_state_dict(state)


def test_state_dict_of_another_method_is_rejected():
    state = mtopt.make("mgda").state_dict()
    with pytest.raises(ValueError, match="'mgda', not 'mgda_ub'"):
        mtopt.make("mgda_ub").load_state_dict(state)
    with pytest.raises(ValueError, match="method None"):
        mtopt.make("unitary").load_state_dict({})


def test_stateless_method_rejects_state():
    method = mtopt.make("unitary")
    state = method.state_dict()
    assert state["state"] == {}
    state["state"] = {"ema": 1.0}
    with pytest.raises(ValueError, match="stateless"):
        method.load_state_dict(state)


def test_register_rejects_nameless_and_duplicate_names():
    class Nameless(Method):
        pass

    class Impostor(Method):
        name = "mgda"

    with pytest.raises(ValueError, match="no name"):
        register(Nameless)
    with pytest.raises(ValueError, match="registered twice"):
        register(Impostor)
    assert method_class("mgda").__name__ == "MGDA"
    assert register(method_class("mgda")) is method_class("mgda")  # idempotent


def test_gramian_is_computed_once_and_requires_grads():
    grads = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    inputs = MethodInput(torch.ones(2, dtype=torch.float64), ("a", "b"), grads=grads)
    M = inputs.gramian()
    torch.testing.assert_close(M, torch.tensor([[5.0, 1.0], [1.0, 10.0]], dtype=torch.float64))
    assert inputs.gramian() is M
    assert inputs.num_tasks == 2
    with pytest.raises(RuntimeError, match="Gramian"):
        MethodInput(torch.ones(2), ("a", "b")).gramian()


def test_one_method_per_module_named_as_registered():
    """``mtopt.methods.<name>`` defines exactly the method registered as ``<name>``, in a class
    whose name is the registered name in the paper's capitalisation."""
    import importlib
    import inspect as _inspect

    from mtopt.core.method import Method
    from mtopt.core.registry import method_class

    for name in mtopt.available_methods():
        cls = method_class(name)
        assert cls.__module__ == f"mtopt.methods.{name}", name
        assert cls.__name__.lower() == name.replace("_", ""), (name, cls.__name__)
        module = importlib.import_module(f"mtopt.methods.{name}")
        defined = [
            c
            for _, c in _inspect.getmembers(module, _inspect.isclass)
            if issubclass(c, Method) and c.__module__ == module.__name__
        ]
        assert defined == [cls], (name, defined)


def test_the_methods_subpackage_is_importable_by_module():
    import mtopt.methods.imtl as imtl

    assert imtl.IMTL.name == "imtl"
    assert callable(mtopt.available_methods)


def test_problems_are_registered_like_methods():
    from mtopt.problems import MultiMNIST, available_problems, get_problem, register_problem
    from mtopt.problems.registry import _FAMILIES

    names = available_problems()
    assert "multi_mnist/cl_rr" in names
    assert "yeast" in names
    assert "qm9/mlp" in names
    assert len(names) == len(set(names))
    for bad in ("multi_mnist", "multi_mnist/xx", "yeast/a", "nope"):
        with pytest.raises(ValueError, match="unknown problem"):
            get_problem(bad)
    with pytest.raises(ValueError, match="registered twice"):
        register_problem("multi_mnist")(type("Other", (MultiMNIST,), {}))
    assert _FAMILIES["multi_mnist"][0] is MultiMNIST
