"""Run options added to the trainer: base optimizers, the cosine diagnostic, stable run keys."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mtopt.experiments.compare import parse_row_spec
from mtopt.experiments.train import RunConfig, build_optimizer, mean_gradient_cosine
from mtopt.problems.multi_mnist import MultiMNIST


def test_keys_of_default_configs_did_not_change():
    """Records stored before the optimizer/APT/cosine fields existed keep their keys."""
    config = RunConfig(problem="multi_mnist/cl_rr", method="mgda", seed=3)
    old_fields = {
        k: v
        for k, v in config.to_dict().items()
        if k
        not in ("optimizer", "apt", "muon_lr", "cosine_every", "engine", "lr_schedule", "device")
    }
    blob = json.dumps(old_fields, sort_keys=True, default=str)
    assert config.key() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert RunConfig(problem="p", optimizer="muon").key() != RunConfig(problem="p").key()
    assert RunConfig(problem="p", apt=True).key() != RunConfig(problem="p").key()
    assert RunConfig(problem="p", engine="gramian").key() != RunConfig(problem="p").key()
    assert RunConfig(problem="p", device="cuda").key() != RunConfig(problem="p").key()
    with pytest.raises(ValueError, match="device"):
        RunConfig(problem="p", device="tpu")
    assert RunConfig(problem="p", muon_lr=0.1).key() == RunConfig(problem="p").key()  # unused
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'muon'"):
        RunConfig(problem="p", optimizer="sgd")


def test_base_optimizers_split_the_model_as_documented():
    from mtopt.optim import Adam, Muon

    model = MultiMNIST("cl_rr").make_model()
    plain = build_optimizer(RunConfig(problem="p", lr=1e-3), model)
    assert type(plain) is torch.optim.Adam
    apt = build_optimizer(RunConfig(problem="p", apt=True), model)
    assert isinstance(apt, Adam)
    assert [g["apt"] for g in apt.param_groups] == [True, False]
    assert apt.param_groups[0]["params"] == list(model.encoder.parameters())

    muon = build_optimizer(RunConfig(problem="p", optimizer="muon", lr=1e-3, muon_lr=0.03), model)
    assert isinstance(muon, Muon)
    by_kind = {True: set(), False: set()}
    for group in muon.param_groups:
        by_kind[group["use_muon"]].update(id(p) for p in group["params"])
        assert group["lr"] == (0.03 if group["use_muon"] else 1e-3)
    conv1 = model.encoder.conv1.weight if hasattr(model.encoder, "conv1") else None
    muon_params = [p for p in model.parameters() if id(p) in by_kind[True]]
    assert all(p.dim() >= 2 for p in muon_params)
    for head in model.heads.values():  # output layers go to AdamW, hidden ones to Muon
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        assert id(linears[-1].weight) in by_kind[False]
        assert all(id(m.weight) in by_kind[True] for m in linears[:-1])
    first = next(p for p in model.encoder.parameters() if p.dim() >= 2)
    assert id(first) in by_kind[False]  # the first layer stays on AdamW
    if conv1 is not None:
        assert id(conv1) in by_kind[False]
    assert by_kind[True] | by_kind[False] == {id(p) for p in model.parameters()}


def test_mean_gradient_cosine_on_constructed_gradients():
    w = torch.zeros(2, requires_grad=True)
    # ℓ_a = wᵀ(1, 0), ℓ_b = wᵀ(0, 1): orthogonal unit gradients, mean (½, ½): cos = 1/√2 each
    losses = [w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([0.0, 1.0])]
    assert mean_gradient_cosine(losses, [w]) == pytest.approx(2**-0.5)
    same = [w @ torch.tensor([1.0, 2.0]), 3 * (w @ torch.tensor([1.0, 2.0]))]
    assert mean_gradient_cosine(same, [w]) == pytest.approx(1.0)
    opposite = [w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-2.0, 0.0])]
    # mean (-½, 0): cos(g_a, mean) = -1, cos(g_b, mean) = 1
    assert mean_gradient_cosine(opposite, [w]) == pytest.approx(0.0)
    cancel = [w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 0.0])]
    assert mean_gradient_cosine(cancel, [w]) == 0.0  # zero mean: cosine 0 by convention


def test_row_specs_choose_the_base_optimizer():
    assert parse_row_spec("mgda_ub") == ("mgda_ub", {}, {})
    assert parse_row_spec("cagrad:c=0.2@muon") == (
        "cagrad",
        {"c": 0.2},
        {"optimizer": "muon", "apt": False},
    )
    assert parse_row_spec("unitary@apt")[2] == {"optimizer": "adam", "apt": True}
    assert parse_row_spec("unitary@muon+apt")[2] == {"optimizer": "muon", "apt": True}
    with pytest.raises(ValueError, match="bad optimizer suffix"):
        parse_row_spec("unitary@sgd")
