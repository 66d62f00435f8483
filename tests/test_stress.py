"""The stress suite: every gradient and representation method on adversarial Jacobians and on
models in float16, bfloat16, float32 and float64 (see ``_stress.py``).

Asserted for every method and input: the outputs are finite; a solver's ``converged`` is backed
by its residual (``residual ≤ tolerance``), and an exact solver is certified on every input;
otherwise the step names the failure (``stalled``, ``max_iter``, ``inaccurate``) with a message;
and what the optimizer receives equals what the method reported (``Gᵀw`` or its direction) to
the rounding of the model's dtype. Short training runs (K = 11, loss scales 1e-3..1e3, Adam and
SGD) see no uncertified step from the exact solvers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mtopt
from _stress import (
    DTYPES,
    NAMED_FAILURES,
    PARAM_METHODS,
    REP_METHODS,
    engine_outcome,
    method_outcome,
    rounding_tolerance,
    stress_cases,
)

#: first-order min-norm solvers (Sener's): allowed to end short, with a named status
APPROXIMATE = {"mgda:pgd", "mgda:fw"}
CASES = list(stress_cases())


def _check_report(label: str, where: str, out) -> None:
    assert out.error is None, f"{label} on {where}: {out.error}"
    assert out.finite, f"{label} on {where}: non-finite output"
    if out.converged is None:
        return
    if out.converged:
        assert out.residual is not None, (label, where)
        assert math.isfinite(out.residual), (label, where)
    else:
        assert out.status in NAMED_FAILURES, (label, where, out.status)
        assert out.message, (label, where, out.status)
        assert label in APPROXIMATE, f"{label} (exact) not certified on {where}: {out}"


@pytest.mark.parametrize(("label", "name", "hparams"), PARAM_METHODS)
def test_parameter_level_methods_on_adversarial_jacobians(label, name, hparams):
    for where, G in CASES:
        _check_report(label, where, method_outcome(name, hparams, G, rep=False))


@pytest.mark.parametrize(("label", "name", "hparams"), REP_METHODS)
def test_representation_level_methods_on_adversarial_jacobians(label, name, hparams):
    for where, G in CASES:
        _check_report(label, where, method_outcome(name, hparams, G, rep=True))


def test_the_reported_residual_is_below_the_tolerance_when_converged():
    # the certificate itself: converged ⇔ residual ≤ tolerance, for the solver-backed methods
    for _, name, hparams in PARAM_METHODS:
        for where, G in CASES[::5]:
            k = G.shape[0]
            method = mtopt.make(name, **hparams)
            inputs = mtopt.core.method.MethodInput(
                torch.ones(k, dtype=torch.float64),
                tuple(f"t{i}" for i in range(k)),
                grads=torch.from_numpy(G),
            )
            report = method.aggregate(inputs).solver
            if report is None or report.tolerance is None:
                continue
            if report.status in ("degenerate", "stationary", "zero_gradient", "trivial"):
                continue  # defined outcomes certified by their own checks
            assert report.converged == (report.residual <= report.tolerance), (name, where)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("label", "name", "hparams"), PARAM_METHODS + REP_METHODS)
def test_what_the_step_applies_is_what_it_reports(label, name, hparams, dtype):
    out = engine_outcome(name, hparams, dtype)
    _check_report(label, dtype, out)
    assert out.deviation <= rounding_tolerance(dtype), (label, dtype, out.deviation)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    "name", ["mgda", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "upgrad", "edm", "pcgrad"]
)
def test_the_gramian_engine_applies_what_it_reports(name, dtype):
    out = engine_outcome(name, {}, dtype, engine="gramian")
    _check_report(name, f"{dtype} gramian", out)
    assert out.deviation <= rounding_tolerance(dtype), (name, dtype, out.deviation)


EXACT = ["mgda", "mgda_ub", "edm", "cdtt", "cagrad", "nash_mtl", "upgrad", "imtl_g", "aligned_mtl"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_with_loss_scales_over_six_decades_is_always_certified(optimizer):
    """K = 11 tasks, losses scaled over 1e-3..1e3, 30 steps per method: every exact solver
    certifies every step."""
    k = 11
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=gen), torch.randn(64, k, generator=gen)
    scales = torch.logspace(-3, 3, k)
    failures = {}
    for name in EXACT:
        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(k)])
        params = [*encoder.parameters(), *heads.parameters()]
        base = (
            torch.optim.Adam(params, lr=1e-3)
            if optimizer == "adam"
            else torch.optim.SGD(params, lr=1e-4)
        )
        mto = mtopt.MultiTaskOptimizer(base, name, shared=encoder)

        def closure(encoder=encoder, heads=heads, mto=mto):
            z = encoder(x)
            out = torch.cat([h(mto.task_input(z, i)) for i, h in enumerate(heads)], dim=1)
            return mtopt.Losses(list(scales * ((out - y) ** 2).mean(0)), features=z)

        bad = 0
        for _ in range(30):
            info = mto.step(closure)
            bad += info.solver is not None and not info.solver.converged
        failures[name] = bad
    assert all(v == 0 for v in failures.values()), failures
