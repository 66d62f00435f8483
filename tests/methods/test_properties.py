"""The property battery over the registry: every registered method, checked for the properties
its docstring (and its paper) claims, one line of :data:`PROPERTIES` per method.

A new method is covered by adding its line; ``test_every_registered_method_has_a_line`` fails
until it has one. The assertions, the matrices and the spec → callable adapter live in
``_battery.py``; each test here draws problems (hypothesis, derandomized by ``conftest.py``) and
runs one assertion on a fresh instance of the method for every call.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from _battery import (
    BALANCED,
    GRADIENT_ONLY,
    LOSS_ONLY,
    LOSS_SCALE,
    NO_CONFLICT_MEAN,
    NO_CONFLICT_SUM,
    NON_CONFLICTING,
    PER_TASK_SCALE,
    PER_TASK_SCALE_LINE,
    PERMUTATION,
    PROPERTY_CLAIMS,
    SCALE_0,
    SCALE_1,
    STRUCTURE,
    WEIGHTS_SUM_1,
    WEIGHTS_SUM_K,
    Problem,
    Skip,
    Subject,
    _names,
    assert_balanced_on_orthogonal_equal_norm,
    assert_certified,
    assert_expected_structure,
    assert_loss_permutation_equivariant,
    assert_loss_scale_invariance,
    assert_loss_weights_structure,
    assert_non_conflicting,
    assert_per_task_scale_invariance_of_direction,
    assert_permutation_equivariant,
    assert_reduces_to_mean_without_conflict,
    assert_scale_behaviour,
    assert_weights_structure,
    assert_weights_sum,
    gallery,
    non_conflicting_rows,
    orthonormal_rows,
    parse_spec,
    positive_losses,
    problems,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mtopt
from mtopt.core.method import MethodInput

# =========================================================================== the property table
#: Method spec (``name`` or ``name:key=value,...``, the CLI's grammar, lists as ``a/b/c``) → the
#: properties its docstring claims (names and claims: ``_battery.PROPERTY_CLAIMS``).
#: One fresh instance per call: the claims are those of one step (state carried across steps,
#: such as DB-MTL's moving average or CDTT's tensioners after ``history`` steps, is not tested).
PROPERTIES: dict[str, set[str] | Skip] = {
    # ---------------------------------------------------------- gradient methods (shared params)
    # B = √s V Λ^{-1/2} Vᵀ does not change when M is scaled ⇒ degree 1; M = s²I ⇒ B = I, w = 1.
    "aligned_mtl": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED},
    "aligned_mtl:level=rep": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED},
    # "d is homogeneous of degree 1 in G"; not non-conflicting for c < 1.
    "cagrad": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED},
    # c ≥ 1: d = 0 lies in the ball, so the best worst-case gain min_i g_iᵀd is ≥ 0.
    "cagrad:c=1.5": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED, NON_CONFLICTING},
    # "During the first H steps it equals EDM" (then the direction check changes nothing).
    "cdtt": {STRUCTURE, PERMUTATION, SCALE_1, NON_CONFLICTING, BALANCED, PER_TASK_SCALE},
    # d = Σ_i (max_j‖ĝ_j‖/‖ĝ_i‖) ĝ_i: every task rescaled to the largest norm ⇒ d ∝ Σ ĝ_i/‖ĝ_i‖.
    "db_mtl": {STRUCTURE, PERMUTATION, BALANCED, PER_TASK_SCALE},
    # min-norm point of the unit gradients (a common descent direction), rescaled by γ ∝ ‖g‖;
    # "the problem is on the cosine matrix"; raw weights "sum to 1".
    "edm": {
        STRUCTURE,
        PERMUTATION,
        SCALE_1,
        NON_CONFLICTING,
        BALANCED,
        PER_TASK_SCALE,
        WEIGHTS_SUM_1,
    },
    # symmetric in the tasks (one uniform draw per feature, shared by the tasks).
    "graddrop:seed=0": {STRUCTURE, PERMUTATION},
    # first step (s = 0): IMTL-G on the representation gradients.
    "imtl": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED, PER_TASK_SCALE_LINE},
    # equal projections on the unit gradients, Σw = 1; the common projection may change sign
    # under per-task scaling (the docstring's "ascent" status), so only the line is invariant.
    "imtl_g": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED, PER_TASK_SCALE_LINE, WEIGHTS_SUM_1},
    # min-norm weights of the normalised gradients (loss+: ℓ_k‖g_k‖), applied to the raw ones.
    "mgda": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED, WEIGHTS_SUM_1},
    # KKT of the min-norm point: g_iᵀd ≥ ‖d‖² ≥ 0.
    "mgda:normalization=none": {
        STRUCTURE,
        PERMUTATION,
        SCALE_1,
        BALANCED,
        NON_CONFLICTING,
        WEIGHTS_SUM_1,
    },
    # d = Σ w*_k g_k/‖g_k‖: the min-norm point of the unit gradients itself.
    "mgda:normalization=l2,apply_to=normalized_grads": {
        STRUCTURE,
        PERMUTATION,
        SCALE_0,
        BALANCED,
        NON_CONFLICTING,
        PER_TASK_SCALE,
    },
    "mgda_ub": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED, WEIGHTS_SUM_1},
    # α_i g_iᵀd = 1 with α > 0; α_i = β_i/‖g_i‖ with β from the cosines only ⇒ d depends on the
    # directions only (degree 0, per-task invariant), clipped or not.
    "nash_mtl": {STRUCTURE, PERMUTATION, SCALE_0, NON_CONFLICTING, BALANCED, PER_TASK_SCALE},
    "nash_mtl:max_norm=0": {
        STRUCTURE,
        PERMUTATION,
        SCALE_0,
        NON_CONFLICTING,
        BALANCED,
        PER_TASK_SCALE,
    },
    # a fresh random order per step: permutation-equivariant in distribution only (not tested);
    # no conflict ⇒ nothing is projected ⇒ d = Σ g_i ("sum") or the mean.
    "pcgrad:seed=0": {STRUCTURE, SCALE_1, BALANCED, NO_CONFLICT_SUM},
    "pcgrad:seed=0,reduction=mean": {STRUCTURE, SCALE_1, NO_CONFLICT_MEAN},
    # first step: w_k = C/n_k, every task contributes a gradient of norm C = mean norm.
    "rotograd": {STRUCTURE, PERMUTATION, SCALE_1, BALANCED, PER_TASK_SCALE},
    # "Gd ≥ 0 up to the regularisation, w ≥ p, no conflict ⇒ w = p, d(cG) = c d(G)".
    "upgrad": {STRUCTURE, PERMUTATION, SCALE_1, NON_CONFLICTING, BALANCED, NO_CONFLICT_MEAN},
    # without the regularisation and the trace threshold: exactly non-conflicting, homogeneous.
    "upgrad:reg_eps=0,norm_eps=0": {
        STRUCTURE,
        PERMUTATION,
        SCALE_1,
        NON_CONFLICTING,
        BALANCED,
        NO_CONFLICT_MEAN,
    },
    # ------------------------------------------------------------- loss-only methods (weights)
    "unitary": {STRUCTURE, PERMUTATION, WEIGHTS_SUM_K},
    "unitary:reduction=mean": {STRUCTURE, PERMUTATION, WEIGHTS_SUM_1},
    # user constants bound to positions: not permutation-equivariant.
    "fixed:weights=0.5/0.3/0.2": {STRUCTURE},
    # "rescaling a task's loss by any a_k > 0 leaves the gradient unchanged".
    "si": {STRUCTURE, PERMUTATION, LOSS_SCALE},
    # "rescaling the losses multiplies the gradient by (Π a_k)^{1/K} without changing its
    # direction".
    "gls": {STRUCTURE, PERMUTATION, LOSS_SCALE},
    # random weights drawn by position: permutation-equivariant in distribution only.
    "rlw:seed=0": {STRUCTURE, WEIGHTS_SUM_1},
    "rlw:seed=0,sum_to=k": {STRUCTURE, WEIGHTS_SUM_K},
    "rlw:seed=0,distribution=dirichlet": {STRUCTURE, WEIGHTS_SUM_1},
    # λ = K softmax(r/T) (1 in the first epochs); the window form logs λ/K.
    "dwa": {STRUCTURE, PERMUTATION, WEIGHTS_SUM_K},
    "dwa:mode=window": {STRUCTURE, PERMUTATION, WEIGHTS_SUM_1},
    "uw": {STRUCTURE, PERMUTATION},
    "imtl_l": {STRUCTURE, PERMUTATION},
    # the model step only (aggregate needs no closure; the logit step after the optimizer step,
    # which re-evaluates the closure, is not exercised): w_k = z_k/(c D_k), Σw = 1, weights on
    # log-losses.
    "famo": {STRUCTURE, PERMUTATION, WEIGHTS_SUM_1, LOSS_SCALE},
    "go4align": {STRUCTURE, PERMUTATION},
    "go4align:num_groups=2": {STRUCTURE, PERMUTATION},
    # ---------------------------------------------------------------- not callable on their own
    "auto_lambda": Skip(
        "its aggregate runs a look-ahead: it re-evaluates the closure on the training batch and "
        "on a meta batch and moves the model's parameters (needs CLOSURE and META_BATCH)"
    ),
    "selective_groups": Skip(
        "it updates the model itself, one optimizer step per task group (needs the closure and "
        "the engine's update), and returns no weights to check"
    ),
}

#: Tolerances and options that differ from an assertion's defaults, each with its reason.
OPTIONS: dict[tuple[str, str], dict] = {
    # "Gd ≥ 0 up to the regularisation": the QPs are solved on M/tr M + εI (assertion doc).
    ("upgrad", NON_CONFLICTING): {"reg_eps": "reg_eps"},
    # the 1e-8 guards in ‖ĝ_i‖ + 1e-8 and ℓ_i + 1e-8 perturb each a_i by 1e-8/‖ĝ_i‖ relatively,
    # up to ~1e-4 for the smallest ĝ_i = 0.1 g_i/ℓ_i here; a d that cancels keeps as much.
    ("db_mtl", PER_TASK_SCALE): {"rtol": 1e-4, "vanish": 1e-4},
    # D_k = ℓ_k + 1e-8: relative error 1e-8/ℓ_k ≤ 1e-6 for the losses drawn here (≥ e^-3).
    ("famo", LOSS_SCALE): {"rtol": 1e-6},
    # with 0 in the hull (an opposite pair) a float64 Gram matrix determines ‖Gᵀw‖ only to
    # about √u (core/ball_maxmin.py's _norm), and the exact solver's d to ~1e-8 σ accordingly.
    ("cagrad", PERMUTATION): {"rtol": 1e-7},
    ("cagrad:c=1.5", PERMUTATION): {"rtol": 1e-7},
    ("si", LOSS_SCALE): {"factor": "one"},
    ("gls", LOSS_SCALE): {"factor": "geometric"},
}

#: Properties a docstring claims that the method violates today: xfail(strict=True), with the
#: reason; a fix turns them into XPASS failures, which asks for the line to be removed. (Empty:
#: the battery's first findings, EDM's and CAGrad's order dependence, are fixed.)
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


# =============================================================================== the test cases
def _claims(spec: str) -> set[str]:
    entry = PROPERTIES[spec]
    return set() if isinstance(entry, Skip) else entry


def _cases(prop: str) -> list:
    """The specs that claim ``prop``, as pytest params (xfail where a violation is known)."""
    out = []
    for spec in PROPERTIES:
        if prop not in _claims(spec):
            continue
        reason = KNOWN_VIOLATIONS.get((spec, prop))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(spec, marks=marks, id=spec))
    return out


def _takes_gradients(spec: str) -> bool:
    """Whether ``spec`` is a gradient method; a spec that does not build counts as one, so that
    collection goes on and its tests fail with the error (test_table_line_is_valid names it)."""
    try:
        return _subject(spec).takes_gradients
    except Exception:
        return True


def _gradient_cases(prop: str) -> list:
    return [p for p in _cases(prop) if _takes_gradients(p.values[0])]


def _loss_cases(prop: str) -> list:
    return [p for p in _cases(prop) if not _takes_gradients(p.values[0])]


@functools.cache
def _subject(spec: str) -> Subject:
    return Subject(spec)


def _option(spec: str, prop: str, key: str, default):
    value = OPTIONS.get((spec, prop), {}).get(key, default)
    if key == "reg_eps" and isinstance(value, str):  # read from the spec's hyperparameters
        return float(_subject(spec).hparam(value))
    return value


def _tolerances(spec: str, prop: str, **defaults) -> dict:
    return {k: _option(spec, prop, k, v) for k, v in defaults.items()}


#: CAGrad with c ≥ 1 and a zero gradient, where the stationary answer once depended on the task
#: order (rounding decided between d = 0 and the projection): every permutation test runs it
#: first, for every method.
CAGRAD_ZERO_ROW = Problem(
    torch.tensor(
        [
            [-0.9767138980361014, 0.339160551247366, -0.2341321217103775, 0.4223470880872332],
            [4.5468119322389, -0.7575452286535234, -1.7335751629059653, -1.733804620371092],
            [0.0, 0.0, 0.0, 0.0],
            [1.5085230745793263, -0.4448244121417742, -1.0685952180194935, 1.4689939442641997],
            [-0.446161138767718, -0.7379637997794531, 0.44410696593231025, -0.5823684273290197],
        ],
        dtype=torch.float64,
    ),
    torch.ones(5, dtype=torch.float64),
    "regression",
    -1,
)

#: Two positively collinear gradients of different norms (a tie EDM and MGDA split equally); the
#: losses differ, so that MGDA's normalised gradients do not tie (see test_mgda_collinear_tie).
COLLINEAR_PAIR = Problem(
    torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64),
    torch.tensor([1.0, 2.0], dtype=torch.float64),
    "regression",
    -2,
)

FAST = settings(max_examples=60, deadline=None)
POWERS = st.integers(-4, 8).map(lambda e: 2.0**e)  # exact scalings


@st.composite
def problems_and_permutations(draw) -> tuple[Problem, list[int]]:
    p = draw(problems())
    return p, draw(st.permutations(range(p.k)))


@st.composite
def losses_and_permutations(draw, fixed_k: int | None = None) -> tuple[torch.Tensor, list[int]]:
    k = fixed_k or draw(st.integers(2, 8))
    losses = positive_losses(k, draw(st.integers(0, 2**32 - 1)))
    return losses, draw(st.permutations(range(k)))


# ------------------------------------------------------------------------------ the registry
def test_every_registered_method_has_a_line():
    covered = {parse_spec(spec)[0] for spec in PROPERTIES}
    missing = [name for name in _names() if name not in covered]
    assert not missing, (
        f"registered method(s) {missing} have no line in PROPERTIES "
        "(tests/methods/test_properties.py): add one per method, e.g. "
        + ", ".join(f'"{n}": {{STRUCTURE, PERMUTATION, ...}}' for n in missing)
        + ", with the properties its docstring claims (see _battery.PROPERTY_CLAIMS), or "
        '"name": Skip("why the battery cannot call it")'
    )


@pytest.mark.parametrize("spec", list(PROPERTIES))
def test_table_line_is_valid(spec):
    """Every spec names a registered method with valid hyperparameters, and claims only
    properties the battery knows and that fit the method's level."""
    name, _ = parse_spec(spec)
    assert name in _names(), f"{spec!r}: {name!r} is not a registered method"
    if isinstance(PROPERTIES[spec], Skip):
        return
    claims = _claims(spec)
    unknown = claims - set(PROPERTY_CLAIMS)
    assert not unknown, f"{spec!r} claims unknown properties {unknown}"
    assert STRUCTURE in claims, f"{spec!r}: every method claims at least STRUCTURE"
    subject = _subject(spec)
    misplaced = claims & (LOSS_ONLY if subject.takes_gradients else GRADIENT_ONLY)
    assert not misplaced, f"{spec!r} ({subject.kind} level) cannot be checked for {misplaced}"


def test_options_and_violations_refer_to_claims():
    for spec, prop in [*OPTIONS, *KNOWN_VIOLATIONS]:
        assert prop in _claims(spec), f"({spec!r}, {prop!r}) is not a claim of the table"


# ------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("spec", _gradient_cases(STRUCTURE))
def test_structure(spec):
    """Finite ``d`` of shape (D,) and finite weights of shape (K,) on every gallery problem
    (generic, duplicate, opposite, zero row, rank-deficient; K up to 12, D below and above K),
    and a converged solver certificate where the method reports one."""
    subject = _subject(spec)
    problems_ = gallery()
    assert_expected_structure(subject.aggregate, problems_)
    assert_certified(subject.run, problems_)
    for p in problems_:
        out = subject.run(p.G, p.losses)
        if out.weights is not None:
            assert_weights_structure(out.weights, p.k)


@pytest.mark.parametrize("spec", _loss_cases(STRUCTURE))
def test_loss_structure(spec):
    """Finite weights of shape (K,) for equal, spread (e^±3) and extreme (e^±10) losses."""
    subject = _subject(spec)
    ks = [subject.fixed_k] if subject.fixed_k else [2, 3, 5, 12]
    losses = [
        positive_losses(k, seed, spread) for k in ks for seed, spread in enumerate((0.0, 3.0, 10.0))
    ]
    assert_loss_weights_structure(subject.weigh_losses, losses)


# ------------------------------------------------------------------------- non-conflicting
@pytest.mark.parametrize("spec", _cases(NON_CONFLICTING))
@settings(max_examples=100, deadline=None)
@given(problem=problems())
def test_non_conflicting(spec, problem):
    subject = _subject(spec)
    tol = _tolerances(spec, NON_CONFLICTING, rtol=1e-9, reg_eps=0.0)
    weigh = subject.weigh if tol["reg_eps"] else None
    assert_non_conflicting(subject.aggregate, problem.G, problem.losses, weigh=weigh, **tol)


# ---------------------------------------------------------------------------- permutations
@pytest.mark.parametrize("spec", _gradient_cases(PERMUTATION))
@FAST
@given(case=problems_and_permutations())
@example(case=(CAGRAD_ZERO_ROW, [1, 2, 3, 4, 0]))
@example(case=(COLLINEAR_PAIR, [1, 0]))
def test_permutation_equivariant(spec, case):
    """``d`` is invariant on every kind of problem; the weights follow the tasks where they are
    unique (generic rows, K ≤ D: a non-singular Gram matrix)."""
    problem, perm = case
    subject = _subject(spec)
    unique = problem.kind == "generic" and subject.weigh(problem.G, problem.losses) is not None
    tol = _tolerances(spec, PERMUTATION, rtol=1e-9)
    assert_permutation_equivariant(
        subject.aggregate,
        problem.G,
        problem.losses,
        perm,
        weigh=subject.weigh if unique else None,
        **tol,
    )


@pytest.mark.parametrize("spec", _loss_cases(PERMUTATION))
@FAST
@given(case=losses_and_permutations())
def test_loss_permutation_equivariant(spec, case):
    losses, perm = case
    subject = _subject(spec)
    tol = _tolerances(spec, PERMUTATION, rtol=1e-12)
    assert_loss_permutation_equivariant(subject.weigh_losses, losses, perm, **tol)


# ------------------------------------------------------------------------------- scale
@pytest.mark.parametrize(
    ("spec", "degree"),
    [pytest.param(p.values[0], 1, marks=p.marks, id=p.id) for p in _cases(SCALE_1)]
    + [pytest.param(p.values[0], 0, marks=p.marks, id=p.id) for p in _cases(SCALE_0)],
)
@FAST
@given(problem=problems(), c=POWERS)
def test_scale_behaviour(spec, degree, problem, c):
    """``d(cG) = c^degree d(G)`` for c = 2^-4 … 2^8 (losses unchanged)."""
    prop = SCALE_1 if degree == 1 else SCALE_0
    tol = _tolerances(spec, prop, rtol=1e-9)
    assert_scale_behaviour(_subject(spec).aggregate, problem.G, problem.losses, c, degree, **tol)


# ------------------------------------------------------------ balanced on orthogonal rows
@pytest.mark.parametrize("spec", _cases(BALANCED))
@FAST
@given(
    k=st.integers(2, 8),
    extra=st.integers(0, 16),
    seed=st.integers(0, 2**32 - 1),
    e=st.integers(-6, 6),
)
def test_balanced_on_orthogonal_equal_norm(spec, k, extra, seed, e):
    Q = orthonormal_rows(k, k + min(extra, 2 * k), seed)
    tol = _tolerances(spec, BALANCED, rtol=1e-9)
    assert_balanced_on_orthogonal_equal_norm(_subject(spec).aggregate, Q, 2.0**e, **tol)


# ------------------------------------------------------------- no conflict ⇒ fixed weights
@pytest.mark.parametrize(
    ("spec", "combination"),
    [pytest.param(p.values[0], "mean", marks=p.marks, id=p.id) for p in _cases(NO_CONFLICT_MEAN)]
    + [pytest.param(p.values[0], "sum", marks=p.marks, id=p.id) for p in _cases(NO_CONFLICT_SUM)],
)
@FAST
@given(k=st.integers(2, 8), extra=st.integers(0, 16), seed=st.integers(0, 2**32 - 1))
def test_no_conflict_gives_the_plain_combination(spec, combination, k, extra, seed):
    """Without conflict: the mean (``p = 1/K``) or the sum (``p = 1``)."""
    G = non_conflicting_rows(k, k + min(extra, 2 * k), seed)
    pref = torch.full((k,), 1.0 / k if combination == "mean" else 1.0, dtype=torch.float64)
    prop = NO_CONFLICT_MEAN if combination == "mean" else NO_CONFLICT_SUM
    tol = _tolerances(spec, prop, rtol=1e-9)
    assert_reduces_to_mean_without_conflict(_subject(spec).aggregate, G, pref, **tol)


# ------------------------------------------------------------------ per-task scale invariance
@pytest.mark.parametrize(
    ("spec", "orientation"),
    [pytest.param(p.values[0], True, marks=p.marks, id=p.id) for p in _cases(PER_TASK_SCALE)]
    + [
        pytest.param(p.values[0], False, marks=p.marks, id=p.id)
        for p in _cases(PER_TASK_SCALE_LINE)
    ],
)
@FAST
@given(problem=problems(), data=st.data())
def test_per_task_scale_invariance_of_direction(spec, orientation, problem, data):
    """``d(diag(a) G) = λ d(G)``, λ > 0 (λ ≠ 0 for the "line" claim), a_i = 2^-3 … 2^3."""
    exponents = data.draw(st.lists(st.integers(-3, 3), min_size=problem.k, max_size=problem.k))
    a = torch.tensor([2.0**x for x in exponents], dtype=torch.float64)
    prop = PER_TASK_SCALE if orientation else PER_TASK_SCALE_LINE
    tol = _tolerances(spec, prop, rtol=1e-9, vanish=1e-7)
    assert_per_task_scale_invariance_of_direction(
        _subject(spec).aggregate, problem.G, problem.losses, a, orientation=orientation, **tol
    )


# ------------------------------------------------------------------------------ weight sums
@pytest.mark.parametrize(
    ("spec", "total"),
    [pytest.param(p.values[0], "one", marks=p.marks, id=p.id) for p in _cases(WEIGHTS_SUM_1)]
    + [pytest.param(p.values[0], "k", marks=p.marks, id=p.id) for p in _cases(WEIGHTS_SUM_K)],
)
@FAST
@given(problem=problems(kinds=("generic", "duplicate")))
def test_weights_sum(spec, total, problem):
    """Σw = 1 or K (gradient methods: on problems with a non-degenerate answer; the docstrings
    define zero weights for a zero gradient (EDM) or opposite gradients (IMTL-G))."""
    subject = _subject(spec)
    if subject.takes_gradients:
        weights = subject.weigh(problem.G, problem.losses)
    else:
        weights = subject.weigh_losses(problem.losses)
    expected = 1.0 if total == "one" else float(problem.k)
    prop = WEIGHTS_SUM_1 if total == "one" else WEIGHTS_SUM_K
    assert_weights_sum(weights, expected, **_tolerances(spec, prop, rtol=1e-12))


# ------------------------------------------------------------------- loss-scale invariance
@pytest.mark.parametrize("spec", _loss_cases(LOSS_SCALE))
@FAST
@given(case=losses_and_permutations(), data=st.data())
def test_loss_scale_invariance(spec, case, data):
    losses, _ = case
    k = int(losses.shape[0])
    exponents = data.draw(st.lists(st.integers(-3, 3), min_size=k, max_size=k))
    a = torch.tensor([2.0**x for x in exponents], dtype=torch.float64)
    factor = _option(spec, LOSS_SCALE, "factor", None)
    if factor == "one":
        factor = 1.0
    elif factor == "geometric":
        factor = math.prod(a.tolist()) ** (1.0 / k)
    rtol = _option(spec, LOSS_SCALE, "rtol", 1e-12)
    assert_loss_scale_invariance(_subject(spec).weigh_losses, losses, a, factor, rtol)


# ======================================================= explicit findings outside the battery
def test_upgrad_is_homogeneous_above_norm_eps_and_everywhere_without_it():
    """The docstring: d(cG) = c d(G) while c² tr(M) ≥ norm_eps (absolute, TorchJD's 1e-4); below
    it the weights are the preferences; with norm_eps = 0 homogeneity holds at every scale."""
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # conflicting, tr = 3
    assert_scale_behaviour(_subject("upgrad").aggregate, G, None, 2.0**-2, 1)
    exact = _subject("upgrad:norm_eps=0")
    assert_scale_behaviour(exact.aggregate, G, None, 2.0**-8, 1)
    tiny = 2.0**-8 * G  # tr = 3·2⁻¹⁶ < 1e-4
    inputs = MethodInput(torch.ones(2, dtype=torch.float64), ("a", "b"), tiny)
    weights = mtopt.make("upgrad").aggregate(inputs).weights
    torch.testing.assert_close(weights, torch.full((2,), 0.5, dtype=weights.dtype))


def test_cagrad_stationary_direction_is_the_projection_of_g0():
    # g0 = (0, -1/3); the cone {d: -d1 + 2 d2 ≥ 0, d1 - 3 d2 ≥ 0} is spanned by (-2,-1), (-3,-1);
    # the projection of g0 is (-2/15, -1/15), scaled by K/(1 + c²) (rescale=1, sum_scale).
    G = torch.tensor([[-1.0, 2.0], [0.0, 0.0], [1.0, -3.0]], dtype=torch.float64)
    c = 1.5
    expected = torch.tensor([-2.0 / 15, -1.0 / 15], dtype=torch.float64) * 3 / (1 + c**2)
    out = _subject("cagrad:c=1.5").run(G, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out.direction, expected, rtol=1e-9, atol=1e-12)
    assert out.weights is not None
    assert float(out.weights[1]) == pytest.approx(3 / (1 + c**2) / 3)


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([[1.0, 0.0, 2.0], [-1.0, 3.0, 0.5]], id="generic"),
        pytest.param([[1.0, 0.0], [-4.0, 0.0]], id="opposite"),
        pytest.param([[1.0, 0.0], [3.0, 0.0]], id="collinear"),
    ],
)
@pytest.mark.parametrize("swap", [False, True])
def test_edm_two_task_closed_form(rows, swap):
    """The docstring's two-task form ``d = (g1‖g2‖ + g2‖g1‖)/(‖g1‖ + ‖g2‖)``."""
    G = torch.tensor(rows, dtype=torch.float64)
    G = G.flip(0) if swap else G
    n = G.norm(dim=1)
    expected = (G[0] * n[1] + G[1] * n[0]) / (n[0] + n[1])
    d = _subject("edm").aggregate(G)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12 * float(n.max()))


@pytest.mark.parametrize("spec", ["mgda", "mgda_ub"])
def test_mgda_collinear_tie(spec):
    """A tie of the definition (equal losses, collinear gradients of different norms: equal
    normalised gradients, every split of w* is a min-norm solution), resolved without regard to
    the order of the tasks: the weight is split equally (``mtopt.core.min_norm.split_ties``)."""
    p = COLLINEAR_PAIR
    ones = torch.ones(2, dtype=torch.float64)
    assert_permutation_equivariant(_subject(spec).aggregate, p.G, ones, [1, 0])


# ================================================================== the battery has teeth
def _mean(G, losses=None, names=None):
    return G.mean(0)


def _first_row(G, losses=None, names=None):
    return G[0].clone()


def _unit_sum(G, losses=None, names=None):
    return (G / G.norm(dim=1, keepdim=True)).sum(0)


@pytest.mark.parametrize(
    "check",
    [
        "mean conflicts",
        "mean is not scale-invariant",
        "first row is not permutation-equivariant",
        "unit sum is not degree 1",
        "mean is not per-task invariant",
        "first row is not balanced",
        "unit sum is not the mean without conflict",
    ],
)
def test_battery_detects_violations(check):
    """Each assertion fails on a simple aggregator that lacks its property."""
    G = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.5, 3.0]], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    calls = {
        "mean conflicts": lambda: assert_non_conflicting(_mean, G),
        "mean is not scale-invariant": lambda: assert_scale_behaviour(_mean, G, None, 4.0, 0),
        "first row is not permutation-equivariant": lambda: assert_permutation_equivariant(
            _first_row, G, ones, [1, 0, 2]
        ),
        "unit sum is not degree 1": lambda: assert_scale_behaviour(_unit_sum, G, None, 4.0, 1),
        "mean is not per-task invariant": lambda: assert_per_task_scale_invariance_of_direction(
            _mean, G, None, torch.tensor([1.0, 8.0, 0.5], dtype=torch.float64)
        ),
        "first row is not balanced": lambda: assert_balanced_on_orthogonal_equal_norm(
            _first_row, orthonormal_rows(3, 4, 0), 2.0
        ),
        "unit sum is not the mean without conflict": lambda: (
            assert_reduces_to_mean_without_conflict(
                _unit_sum, non_conflicting_rows(3, 4, 0), ones / 3
            )
        ),
    }
    with pytest.raises(AssertionError):
        calls[check]()


def test_battery_accepts_the_mean():
    """The mean satisfies the properties it has (so the assertions are not vacuous the other
    way round)."""
    rng = np.random.default_rng(0)
    G = torch.from_numpy(rng.normal(size=(4, 6)))
    ones = torch.ones(4, dtype=torch.float64)
    assert_scale_behaviour(_mean, G, None, 8.0, 1)
    assert_permutation_equivariant(_mean, G, ones, [2, 0, 3, 1])
    assert_balanced_on_orthogonal_equal_norm(_mean, orthonormal_rows(4, 6, 1), 0.25)
    assert_reduces_to_mean_without_conflict(_mean, non_conflicting_rows(4, 6, 2), ones / 4)
    assert_per_task_scale_invariance_of_direction(_unit_sum, G, None, ones * 2)
