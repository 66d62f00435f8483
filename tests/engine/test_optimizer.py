"""The step engine ``MultiTaskOptimizer`` on tiny float64 models, against hand-computed grads.

``torch.optim.SGD(lr=0)`` keeps the parameters still, so ``.grad`` after ``step`` is exactly what
the engine wrote; references are computed independently with ``torch.autograd.grad`` per loss.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mtopt
from _asserts import assert_min_norm_kkt, assert_weights_shape_finite
from mtopt import Losses, MultiTaskOptimizer, StepInfo
from mtopt.core.capabilities import MetaBatchMethod, SequentialMethod

F64 = torch.float64
PHASES = {"forward", "gradients", "method", "backward", "optimizer", "total"}


class Net(nn.Module):
    """Encoder ``Linear(4, 3) + tanh``, K heads ``Linear(3, 1)`` with different targets/scales."""

    def __init__(self, k: int = 3, seed: int = 0, batch: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.encoder = nn.Linear(4, 3, dtype=F64)
        self.heads = nn.ModuleList(nn.Linear(3, 1, dtype=F64) for _ in range(k))
        self.x = torch.randn(batch, 4, generator=gen, dtype=F64)
        self.y = torch.randn(k, batch, 1, generator=gen, dtype=F64) * torch.tensor(
            [3.0**i for i in range(k)], dtype=F64
        ).view(k, 1, 1)
        self.k = k

    def forward(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = torch.tanh(self.encoder(self.x))
        losses = {f"t{k}": ((h(z) - self.y[k]) ** 2).mean() for k, h in enumerate(self.heads)}
        return losses, z

    def closure(self) -> Losses:
        losses, z = self()
        return Losses(losses, features=z)

    def shared(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


def _mto(model: Net, method="unitary", lr: float = 0.0, **kw) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), method, shared=model.shared(), **kw
    )


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _reference(model: Net, weights: torch.Tensor, head_coeffs: torch.Tensor):
    """Shared: Σ w_k ∇θs ℓ_k; head k: c_k ∇θk ℓ_k; plus the Jacobians G (θs) and R (z)."""
    losses, z = model()
    losses = list(losses.values())
    shared = model.shared()
    G = torch.stack(
        [_flat(torch.autograd.grad(loss, shared, retain_graph=True)) for loss in losses]
    )
    R = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    )
    shared_ref = weights.to(F64) @ G
    heads_ref = [
        [c * g for g in torch.autograd.grad(losses[k], list(model.heads[k].parameters()))]
        for k, c in enumerate(head_coeffs.to(F64))
    ]
    return shared_ref, heads_ref, G, R


METHODS = [
    ("unitary", {}),
    ("unitary", {"reduction": "mean"}),
    ("fixed", {"weights": [0.3, 1.7, 0.9]}),
    ("mgda", {}),  # Sener's defaults: loss+ normalisation, pgd
    ("mgda", {"solver": "wolfe", "normalization": "l2"}),
    ("mgda", {"solver": "wolfe", "normalization": "none", "apply_to": "normalized_grads"}),
    ("mgda_ub", {}),
    ("mgda_ub", {"solver": "wolfe", "normalization": "loss", "apply_to": "normalized_grads"}),
]


@pytest.mark.parametrize("head_policy", ["raw", "weighted"])
@pytest.mark.parametrize(("name", "hparams"), METHODS, ids=lambda x: str(x))
def test_written_grads_match_reference(name, hparams, head_policy):
    model = Net(k=3, seed=1)
    mto = _mto(model, name, head_policy=head_policy, **hparams)
    info = mto.step(model.closure)
    w = info.weights
    assert_weights_shape_finite(w, 3)
    assert info.task_names == ("t0", "t1", "t2")
    c = w if head_policy == "weighted" else torch.ones(3, dtype=F64)
    shared_ref, heads_ref, G, R = _reference(model, w, c)

    torch.testing.assert_close(
        _flat(p.grad for p in model.shared()), shared_ref, rtol=1e-12, atol=1e-14
    )
    for k, head in enumerate(model.heads):
        for p, ref in zip(head.parameters(), heads_ref[k], strict=True):
            torch.testing.assert_close(p.grad, ref, rtol=1e-12, atol=1e-14)

    # the reported weights are the ones the method was supposed to produce
    if name == "unitary":
        expected = 1.0 if hparams.get("reduction", "sum") == "sum" else 1.0 / 3
        torch.testing.assert_close(w, torch.full((3,), expected, dtype=F64))
    elif name == "fixed":
        torch.testing.assert_close(w, torch.tensor(hparams["weights"], dtype=F64))
    elif hparams.get("solver") == "wolfe":
        # the engine handed the method the right Jacobian: KKT holds for an independent one
        J = G if name == "mgda" else R
        losses = torch.tensor(list(info.losses.values()), dtype=F64)
        norms = J.norm(dim=1)
        n = {"l2": norms, "loss": losses, "loss+": losses * norms, "none": torch.ones(3)}[
            hparams["normalization"]
        ].to(F64)
        simplex = torch.tensor(info.extras["simplex_weights"], dtype=F64)
        assert_min_norm_kkt((J / n[:, None]).numpy(), simplex.numpy(), rtol=1e-9)
        if hparams.get("apply_to") == "normalized_grads":
            torch.testing.assert_close(w, simplex / n, rtol=1e-12, atol=0)
        else:
            torch.testing.assert_close(w, simplex, rtol=0, atol=0)
        assert info.solver.converged
    else:
        assert info.solver is not None
        assert info.solver.iterations <= 250
    assert not torch.all(shared_ref == 0)


@pytest.mark.parametrize("head_policy", ["raw", "weighted"])
def test_all_parameters_shared(head_policy):
    model = Net(k=2, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mto = MultiTaskOptimizer(opt, "mgda", solver="wolfe", head_policy=head_policy)
    info = mto.step(model.closure)
    losses, _ = model()
    params = list(model.parameters())
    rows = []
    for loss in losses.values():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            _flat(torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True))
        )
    G = torch.stack(rows)
    torch.testing.assert_close(
        _flat(p.grad for p in params), info.weights @ G, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("head_policy", ["raw", "weighted"])
def test_fixed_ones_equals_plain_sum_backward(k, head_policy):
    model = Net(k=k, seed=2)
    mto = _mto(model, "fixed", weights=[1.0] * k, head_policy=head_policy)
    mto.step(model.closure)
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    losses, _ = model()
    sum(losses.values()).backward()
    for a, b in zip(got, _grads(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("head_policy", ["raw", "weighted"])
def test_fixed_weights_gradient_is_linear_in_c(head_policy):
    rng = np.random.default_rng(0)
    c1, c2 = rng.normal(size=3).tolist(), rng.uniform(0.1, 2, size=3).tolist()
    alpha = 0.37

    def grads(c):
        model = Net(k=3, seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # c1 has negative entries
            mto = _mto(model, "fixed", weights=c, head_policy=head_policy)
        mto.step(model.closure)
        heads = [_flat(p.grad for p in h.parameters()) for h in model.heads]
        return _flat(p.grad for p in model.shared()), heads

    s1, h1 = grads(c1)
    s2, h2 = grads(c2)
    s12, h12 = grads([a + alpha * b for a, b in zip(c1, c2, strict=True)])
    torch.testing.assert_close(s12, s1 + alpha * s2, rtol=1e-12, atol=1e-14)
    for a, b, ab in zip(h1, h2, h12, strict=True):
        if head_policy == "weighted":
            torch.testing.assert_close(ab, a + alpha * b, rtol=1e-12, atol=1e-14)
        else:  # raw heads ignore c
            torch.testing.assert_close(ab, a, rtol=0, atol=0)
            torch.testing.assert_close(ab, b, rtol=0, atol=0)


def test_grads_do_not_accumulate_across_steps():
    model = Net(k=3, seed=5)
    mto = _mto(model, "mgda", solver="wolfe")
    mto.step(model.closure)
    first = _grads(model)
    info = mto.step(model.closure)
    assert info.step == 1
    # the same gradients, not twice them (the exact solver's warm start from step 0 may take
    # another path to the same optimum: equal to rounding, not bit for bit)
    for a, b in zip(first, _grads(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["unitary", "mgda", "mgda_ub"])
def test_optimizer_applies_the_written_gradient(name):
    model = Net(k=3, seed=6)
    before = [p.detach().clone() for p in model.parameters()]
    mto = _mto(model, name, lr=0.1)
    mto.step(model.closure)
    for p, p0 in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * p.grad, rtol=0, atol=1e-15)
    for p, p0 in zip(model.shared(), before, strict=False):
        assert not torch.equal(p.detach(), p0)


# -- what a closure may return ---------------------------------------------------------------------
def _variants(model: Net):
    def as_list():
        return list(model()[0].values())

    def as_tuple():
        return tuple(model()[0].values())

    def as_tensor():
        return torch.stack(list(model()[0].values()))

    def as_dict():
        return model()[0]

    def losses_list():
        losses, z = model()
        return Losses(list(losses.values()), features=z)

    def losses_tensor():
        losses, z = model()
        return Losses(torch.stack(list(losses.values())), features=z)

    return {
        "list": as_list,
        "tuple": as_tuple,
        "tensor": as_tensor,
        "dict": as_dict,
        "Losses(dict)": model.closure,
        "Losses(list)": losses_list,
        "Losses(tensor)": losses_tensor,
    }


@pytest.mark.parametrize(
    "kind", ["list", "tuple", "tensor", "dict", "Losses(dict)", "Losses(list)", "Losses(tensor)"]
)
@pytest.mark.parametrize("name", ["fixed", "mgda", "mgda_ub"])
def test_closure_return_types(kind, name):
    hp = {"weights": [0.5, 1.0, 2.0]} if name == "fixed" else {"solver": "wolfe"}
    if name == "mgda_ub" and not kind.startswith("Losses"):
        model = Net(k=3, seed=7)
        with pytest.raises(ValueError, match="needs the shared representation"):
            _mto(model, name, **hp).step(_variants(model)[kind])
        return
    ref_model = Net(k=3, seed=7)
    # with the features or without, as the variant (with them the heads' gradient is taken in
    # the per-task passes, without them by a backward pass: the same up to rounding)
    with_z = kind.startswith("Losses")
    ref_info = _mto(ref_model, name, **hp).step(
        ref_model.closure if with_z else lambda: Losses(ref_model()[0])
    )
    model = Net(k=3, seed=7)
    info = _mto(model, name, **hp).step(_variants(model)[kind])
    named = "dict" in kind
    assert info.task_names == (("t0", "t1", "t2") if named else ("0", "1", "2"))
    assert list(info.losses) == list(info.task_names)
    assert list(info.losses.values()) == list(ref_info.losses.values())
    torch.testing.assert_close(info.weights, ref_info.weights, rtol=0, atol=0)
    for a, b in zip(_grads(model), _grads(ref_model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_task_names_given_to_the_optimizer_name_sequences():
    model = Net(k=3, seed=8)
    mto = _mto(model, tasks=["seg", "depth", "normal"])
    info = mto.step(lambda: list(model()[0].values()))
    assert info.weight_dict() == {"seg": 1.0, "depth": 1.0, "normal": 1.0}


# -- StepInfo -----------------------------------------------------------------------------------
def test_step_info_contents():
    model = Net(k=3, seed=9)
    mto = _mto(model, "mgda", solver="wolfe")
    info = mto.step(model.closure)
    assert isinstance(info, StepInfo)
    assert info.step == 0
    assert set(info.times) == PHASES
    assert all(t >= 0 for t in info.times.values())
    parts = sum(v for key, v in info.times.items() if key != "total")
    assert info.times["total"] >= parts - 1e-9
    losses, _ = model()
    assert info.losses == {k: v.item() for k, v in losses.items()}
    assert info.weight_dict() == dict(zip(info.task_names, info.weights.tolist(), strict=True))
    assert info.solver.name == "min_norm/wolfe"
    assert set(info.extras) == {"simplex_weights", "normalizers"}
    assert mto.step(model.closure).step == 1


# -- bad input ------------------------------------------------------------------------------------
def test_wrong_number_of_losses_on_a_later_step():
    model = Net(k=3, seed=10)
    mto = _mto(model)
    mto.step(lambda: list(model()[0].values()))
    with pytest.raises(ValueError, match="expected 3 losses"):
        mto.step(lambda: list(model()[0].values())[:2])
    with pytest.raises(ValueError, match="expected tasks"):
        mto.step(lambda: {f"x{k}": v for k, v in enumerate(model()[0].values())})


def test_declared_task_count_is_enforced_on_the_first_step():
    model = Net(k=3, seed=10)
    mto = _mto(model, tasks=2)
    with pytest.raises(ValueError, match="expected 2 losses"):
        mto.step(lambda: list(model()[0].values()))


PER_TASK = [
    ("fixed", {"weights": [0.5, 0.5]}, "weights"),
    ("famo", {"min_losses": [0.0, 0.0]}, "min_losses"),
    ("upgrad", {"pref_vector": [0.5, 0.5]}, "pref_vector"),
    ("uw", {"variant": "typed", "loss_types": ["regression"] * 2}, "loss_types"),
]


@pytest.mark.parametrize(("name", "hparams", "label"), PER_TASK)
def test_a_per_task_hyperparameter_of_the_wrong_length_is_refused_when_the_tasks_are_known(
    name, hparams, label
):
    model = Net(k=3, seed=12)
    # an instance: uw's loss_types would otherwise be the optimizer's own keyword
    with pytest.raises(ValueError, match=rf"{name}: {label} has 2 values for 3 tasks"):
        _mto(model, mtopt.make(name, **hparams), tasks=3)
    _mto(model, mtopt.make(name, **hparams), tasks=2)  # the right length: built
    mto = _mto(model, mtopt.make(name, **hparams))  # tasks unknown: the first step says it
    with pytest.raises(ValueError, match=rf"{label} has 2 values for 3 tasks"):
        mto.step(model.closure)


def test_loss_types_must_have_one_entry_per_declared_task():
    model = Net(k=3, seed=13)
    with pytest.raises(ValueError, match=r"2 loss_types for 3 tasks"):
        _mto(model, tasks=3, loss_types=["regression"] * 2)


def test_non_scalar_loss():
    model = Net(k=2, seed=11)
    mto = _mto(model)

    def per_sample():
        z = torch.tanh(model.encoder(model.x))
        return {
            "t0": ((model.heads[0](z) - model.y[0]) ** 2).squeeze(1),
            "t1": ((model.heads[1](z) - model.y[1]) ** 2).mean(),
        }

    with pytest.raises(ValueError, match="'t0' must be a scalar"):
        mto.step(per_sample)
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        mto.step(lambda: torch.stack(list(model()[0].values())).view(1, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_names_the_task(bad):
    model = Net(k=3, seed=12)
    mto = _mto(model)

    def closure():
        losses, _ = model()
        losses["t1"] = losses["t1"] * bad
        return losses

    with pytest.raises(ValueError, match=rf"t1={bad}") as exc:
        mto.step(closure)
    assert "t0" not in str(exc.value)
    assert "t2" not in str(exc.value)
    assert all(p.grad is None for p in model.parameters())


def test_loss_without_grad():
    model = Net(k=2, seed=13)
    mto = _mto(model)

    def closure():
        losses, _ = model()
        losses["t1"] = losses["t1"].detach()
        return losses

    with pytest.raises(ValueError, match="'t1' does not require grad"):
        mto.step(closure)


def test_non_tensor_loss():
    model = Net(k=2, seed=13)
    with pytest.raises(TypeError, match="'t1' is a float"):
        _mto(model).step(lambda: {"t0": model()[0]["t0"], "t1": 1.0})


@pytest.mark.parametrize("out", [3.0, None, {1, 2}, object()])
def test_unsupported_closure_return_type(out):
    model = Net(k=2, seed=14)
    with pytest.raises(TypeError, match="closure must return"):
        _mto(model).step(lambda: out)


def test_empty_losses():
    with pytest.raises(ValueError, match="no losses"):
        _mto(Net(k=2)).step(dict)


def test_rep_grads_method_needs_features():
    model = Net(k=2, seed=15)
    with pytest.raises(ValueError, match="features"):
        _mto(model, "mgda_ub").step(lambda: model()[0])
    with pytest.raises(ValueError, match="features"):
        _mto(model, "mgda_ub").step(lambda: Losses(model()[0], features=model()[1].detach()))


def test_shared_parameter_must_be_in_the_optimizer():
    model = Net(k=2, seed=16)
    outsider = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = torch.optim.SGD(model.heads.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"positions \[0, 1\]"):
        MultiTaskOptimizer(opt, "unitary", shared=model.encoder.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"positions \[2\]"):
        MultiTaskOptimizer(opt, "unitary", shared=[*model.shared(), outsider])
    with pytest.raises(ValueError, match="no shared parameter"):
        MultiTaskOptimizer(opt, "unitary", shared=[])


def test_method_instance_with_hparams_is_rejected():
    model = Net(k=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="Method instance"):
        MultiTaskOptimizer(opt, mtopt.make("mgda"), shared=model.shared(), solver="fw")
    mto = MultiTaskOptimizer(opt, mtopt.make("mgda", solver="fw"), shared=model.shared())
    assert mto.method.solver == "fw"


# -- state -----------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    def fresh(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return MultiTaskOptimizer(
            opt, "mgda", shared=model.shared(), solver="wolfe", normalization="l2"
        )

    model = Net(k=3, seed=17)
    mto = fresh(model)
    for _ in range(3):
        mto.step(model.closure)
    state = copy.deepcopy(mto.state_dict())
    assert state["step"] == 3
    assert state["task_names"] == ["t0", "t1", "t2"]

    twin = copy.deepcopy(model)
    twin_mto = fresh(twin)
    twin_mto.load_state_dict(state)
    assert twin_mto.step_count == 3
    assert twin_mto.task_names == ("t0", "t1", "t2")

    control = copy.deepcopy(model)  # same parameters, but no momentum: must differ
    fresh(control).step(control.closure)

    info = mto.step(model.closure)
    twin_info = twin_mto.step(twin.closure)
    assert info.step == twin_info.step == 3
    for a, b, c in zip(model.parameters(), twin.parameters(), control.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="expected 3 losses"):
        twin_mto.step(lambda: list(twin()[0].values())[:2])

    other = fresh(copy.deepcopy(model))
    other.method = mtopt.make("mgda", solver="pgd", normalization="l2")
    with pytest.raises(ValueError, match="hyperparameters"):
        other.load_state_dict(state)


# -- solver reports --------------------------------------------------------------------------------
def test_non_converged_solver_is_logged(caplog):
    model = Net(k=4, seed=0)  # an interior optimum: one pgd iteration cannot reach it
    mto = _mto(model, "mgda", solver="pgd", max_iter=1, tol=1e-300, normalization="l2")
    with caplog.at_level(logging.WARNING, logger="mtopt"):
        info = mto.step(model.closure)
    # one pgd iteration cannot reach an interior optimum: the certificate fails on any machine
    assert info.solver.converged is False
    assert info.solver.residual > info.solver.tolerance
    assert info.solver.status == "max_iter"
    assert info.solver.iterations == 1
    records = [r for r in caplog.records if r.name == "mtopt"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "not certified" in records[0].getMessage()
    assert "mgda" in records[0].getMessage()


def test_converged_solver_is_not_logged(caplog):
    model = Net(k=4, seed=18)
    mto = _mto(model, "mgda", solver="wolfe")
    with caplog.at_level(logging.WARNING, logger="mtopt"):
        info = mto.step(model.closure)
    assert info.solver.converged
    assert not [r for r in caplog.records if r.name == "mtopt"]


def test_rep_grads_method_requires_explicit_shared_parameters():
    enc, head = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="shared=<the encoder or its parameters>"):
        mtopt.MultiTaskOptimizer(opt, "mgda_ub")


@pytest.mark.parametrize("name", sorted(set(mtopt.available_methods()) - {"fixed"}))
def test_no_method_writes_nan_when_a_task_has_a_zero_shared_gradient(name):
    """Task b reaches the encoder through a detached representation: its shared gradient (and
    its representation gradient) is exactly zero. Every method must still write finite grads."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 3).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(3, 1).double() for _ in range(3)])
    x = torch.randn(8, 4, dtype=torch.float64)
    opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.01)
    mto = mtopt.MultiTaskOptimizer(opt, name, shared=enc.parameters())

    def closure():
        z = torch.tanh(enc(x))
        losses = {
            "a": (heads[0](z) - 1).pow(2).mean() + 0.1,
            "b": (heads[1](z.detach()) + 1).pow(2).mean() + 0.1,
            "c": (heads[2](z) - 0.5).pow(2).mean() + 0.1,
        }
        return mtopt.Losses(losses, features=z)

    for _ in range(3):
        mto.step(closure, meta_closure=closure)
        for p in [*enc.parameters(), *heads.parameters()]:
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        assert all(torch.isfinite(p).all() for p in enc.parameters())


def test_a_repeated_uncertified_solve_is_logged_once_then_counted(caplog):
    model = Net(k=4, seed=0)
    mto = _mto(model, "mgda", solver="pgd", max_iter=1, tol=1e-300, normalization="l2")
    with caplog.at_level(logging.WARNING, logger="mtopt"):
        for _ in range(5):
            mto.step(model.closure)
    warnings = [r for r in caplog.records if r.name == "mtopt" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "counted" in warnings[0].getMessage()
    assert sum(mto.uncertified.values()) == 5
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mtopt"):  # --verbose: every occurrence
        mto.step(model.closure)
    assert [r.levelno for r in caplog.records if r.name == "mtopt"] == [logging.DEBUG]


@pytest.mark.parametrize("name", sorted(mtopt.available_methods()))
@pytest.mark.parametrize("where", ["head", "shared"])
def test_a_non_finite_written_gradient_stops_the_step(name, where):
    """A finite loss whose gradient is NaN, in one head's weight or through the shared features:
    every method raises ``FloatingPointError`` before the NaN reaches a parameter, and nothing
    moves (a sequential method's group updates before the broken one stand). A per-task gradient
    names its task; a gradient that exists only once written (a head's, or any of a loss-level
    method) names the parameter."""
    model = Net(k=3, seed=3)
    start = [p.detach().clone() for p in model.parameters()]
    hparams = {"weights": [1.0, 1.0, 1.0]} if name == "fixed" else {}
    mto = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), mtopt.make(name, **hparams),
        shared=model.shared(),
    )  # fmt: skip

    def closure():
        losses, z = model()
        # 0 in value, NaN in gradient (the square root's derivative at 0)
        broken = model.heads[1].weight if where == "head" else z
        losses["t1"] = losses["t1"] + torch.sqrt(((broken - broken.detach()) ** 2).sum())
        return Losses(losses, features=z)

    named = r"task-specific parameter 2 \(shape \(1, 3\)\)" if where == "head" else (
        r"shared parameter 0 \(shape \(3, 4\)\)"
    )  # fmt: skip
    meta = closure if isinstance(mto.method, MetaBatchMethod) else None
    with pytest.raises(FloatingPointError, match=rf"task\(s\) \['t1'\]|{named}"):
        mto.step(closure, meta_closure=meta)
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.isfinite(p).all(), f"{name}: a non-finite gradient reached a parameter"
        if not isinstance(mto.method, SequentialMethod):  # its earlier group updates stand
            assert torch.equal(p.detach(), p0), f"{name}: a stopped step moved a parameter"


def test_nonfinite_flags_exactly_the_tensors_with_inf_or_nan():
    """Huge finite entries (whose sum of squares overflows in their dtype) are not flagged; NaN,
    +inf and -inf are, in every dtype, mixed devices and dtypes in one call."""
    from mtopt.engine.writeback import nonfinite

    huge = torch.finfo(torch.float32).max / 2
    tensors = [
        torch.full((4,), huge),  # ‖·‖² overflows float32; finite
        torch.tensor([1.0, float("nan")]),
        torch.ones(3, dtype=F64),
        torch.tensor([float("-inf")], dtype=F64),
        torch.full((2,), 6e4, dtype=torch.float16),  # ‖·‖ overflows float16; finite
        torch.tensor([float("inf"), 0.0], dtype=torch.bfloat16),
        torch.zeros(0),
    ]
    assert nonfinite(tensors) == [1, 3, 5]
    assert nonfinite([]) == []
