"""WUDI-Merging solvers (arXiv 2503.08099): pure tensor math, no mergekit.

For one linear weight with task vectors ``tau_i`` (``[out, in]``, ``y = W x``),
WUDI minimises (paper Eq. 21)

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

from ``tau_m = sum_i tau_i`` with Adam. Writing ``u_i = tau_i / ||tau_i||_F``,

    grad L = 2 (tau_m C - D),  C = sum_i u_i^T u_i  [in, in],  D = sum_i tau_i u_i^T u_i,

so a step is one matmul whatever the number of experts N (the authors' loop forms
N ``[out, out]`` products and back-propagates through them). Where ``in > 2 N out``
the factored product ``(tau_m S^T) S`` with ``S`` the stacked ``u_i`` is cheaper
than ``C`` and smaller too. Either way the memory does not grow with N beyond ``C``.

C and D are accumulated in float64 and the gradient is evaluated against an
exact anchor (see ``_adam_descent``): near the minimum ``tau_m C`` and ``D``
cancel, and float32 copies of them would move the minimum itself.
"""

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.optim.adam import adam as torch_adam_functional

LOG = logging.getLogger(__name__)

# Paper defaults (Section 4.1): Adam, lr 1e-5, 300 steps; betas/eps are PyTorch's.
DEFAULT_ITERATIONS = 300
DEFAULT_LEARNING_RATE = 1e-5
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Ridge coefficient omega of the closed form (WUDI-CFS, paper Eq. 20).
DEFAULT_OMEGA = 1e-4

# The exact (float64) residual tau_m C - D is re-evaluated every this many Adam
# steps; in between, steps add (tau_m - anchor) C in the working precision.
RESIDUAL_REFRESH_STEPS = 50

# Adam's second moment holds grad**2, and grad scales with the task vectors. In
# float32 it overflows above ~1e19 and flushes to zero below ~1e-19, so task
# vectors outside this range are solved in float64, where both are exact.
FLOAT32_SAFE_RANGE = (1e-15, 1e15)


@dataclass(frozen=True)
class InterferenceStatistics:
    """Everything the WUDI loss needs, accumulated one task vector at a time.

    ``gram`` is C; when ``rows`` is set instead, C = rows^T rows (stacked form).
    C, D and the weighted sum are float64: in float32 their rounding is a fixed
    bias that shifts the minimum, most along directions the task vectors barely
    span (low-rank LoRA updates). ``initial`` is summed in ``dtype``, the working
    precision of the Adam steps, as the authors' loop sums it.
    """

    initial: torch.Tensor  # sum_i tau_i: Adam's starting point, in dtype
    target: torch.Tensor  # D
    gram: Optional[torch.Tensor]
    rows: Optional[torch.Tensor]
    # sum_i tau_i / ||tau_i||^2, the closed form's ridge term; None unless asked for.
    weighted_sum: Optional[torch.Tensor]
    weight_total: float  # sum_i 1 / ||tau_i||^2 (closed form only)
    active: int  # task vectors that are not all zero
    dtype: torch.dtype


def prefers_stacked_form(out_features: int, in_features: int, experts: int) -> bool:
    """Stacked ``(tau_m S^T) S`` costs 2 N out^2 in per step, Gram ``tau_m C`` out in^2."""
    return 2 * experts * out_features < in_features


def interference_statistics(
    task_vectors: Iterable[torch.Tensor],
    *,
    stacked: bool = False,
    dtype: torch.dtype = torch.float32,
    ridge_term: bool = False,
) -> InterferenceStatistics:
    """Accumulate C, D and the sums over task vectors, each read once.

    ``ridge_term`` also accumulates ``weighted_sum``, which only the closed form
    reads: an ``[out, in]`` float64 the Adam solver need not hold.

    All-zero task vectors carry no direction (the paper's weight 1/||tau||^2 would
    be infinite); they add nothing, which is also their exact share of the sum.
    """
    initial = target = gram = weighted_sum = None
    rows = []
    weight_total = 0.0
    active = 0
    for tau in task_vectors:
        exact = tau.to(torch.float64)
        if initial is None:
            initial = torch.zeros_like(tau, dtype=dtype)
            target = torch.zeros_like(exact)
            if ridge_term:
                weighted_sum = torch.zeros_like(exact)
            if not stacked:
                gram = exact.new_zeros((tau.shape[1], tau.shape[1]))
        norm = torch.linalg.vector_norm(exact).item()
        if norm == 0.0:
            continue
        active += 1
        initial += tau.to(dtype)
        tau = exact
        unit = tau / norm
        if ridge_term:
            weighted_sum.add_(unit, alpha=1.0 / norm)
        weight_total += 1.0 / norm**2
        if stacked:
            rows.append(unit)
            target += (tau @ unit.T) @ unit
        else:
            unit_gram = unit.T @ unit
            gram += unit_gram
            target += tau @ unit_gram
    if initial is None:
        raise ValueError("WUDI needs at least one task vector")
    return InterferenceStatistics(
        initial=initial,
        target=target,
        gram=gram,
        rows=torch.cat(rows) if stacked and rows else None,
        weighted_sum=weighted_sum,
        weight_total=weight_total,
        active=active,
        dtype=dtype,
    )


def solve_dtype(task_vectors: Iterable[torch.Tensor]) -> torch.dtype:
    """float32 unless the task vectors' scale would over/underflow Adam's state."""
    largest = max(float(tau.abs().max()) if tau.numel() else 0.0 for tau in task_vectors)
    low, high = FLOAT32_SAFE_RANGE
    return torch.float32 if largest == 0.0 or low <= largest <= high else torch.float64


def wudi_adam(
    task_vectors: Sequence[torch.Tensor],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    name: Optional[str] = None,
) -> torch.Tensor:
    """Merged task vector tau_m after ``iterations`` Adam steps on Eq. 21.

    ``task_vectors`` is read twice (scale check, then statistics), so it may be a
    lazy sequence that computes each one on demand: peak memory then does not
    grow with N. Returns float32 (float64 for extreme magnitudes, see
    ``FLOAT32_SAFE_RANGE``) on the task vectors' device.

    Adam moves each entry by about ``learning_rate`` per step whatever the task
    vectors' size, so on task vectors much smaller than that it overshoots. If
    the loss ends above its value at the start, the start (the sum) is returned
    and a warning naming ``name`` is logged.
    """
    if not task_vectors:
        raise ValueError("WUDI needs at least one task vector")
    out_features, in_features = task_vectors[0].shape
    stats = interference_statistics(
        task_vectors,
        stacked=prefers_stacked_form(out_features, in_features, len(task_vectors)),
        dtype=solve_dtype(task_vectors),
    )
    if stats.active <= 1 or iterations == 0:
        # One expert: tau_m = tau_1 is an exact zero of the gradient, so Adam
        # would never move; skip the rounding noise of evaluating it.
        return stats.initial
    merged = _adam_descent(stats, iterations, learning_rate)
    start, end = _loss_less_constant(stats, stats.initial), _loss_less_constant(stats, merged)
    if end > start:
        LOG.warning(
            "wudi: Adam raised the interference loss of tensor %r (learning_rate %g is"
            " too large for task vectors this small: their sum's largest entry is %.3g);"
            " keeping the sum of the task vectors. Lower learning_rate to solve it.",
            name, learning_rate, float(stats.initial.abs().max()),
        )
        return stats.initial
    return merged


def _times_gram(stats: InterferenceStatistics, merged: torch.Tensor) -> torch.Tensor:
    """tau_m C in float64."""
    merged = merged.to(torch.float64)
    if stats.gram is not None:
        return merged @ stats.gram
    return (merged @ stats.rows.T) @ stats.rows


def _loss_less_constant(stats: InterferenceStatistics, merged: torch.Tensor) -> float:
    """Eq. 21 less its tau_m-free term: <tau_m, tau_m C - 2 D>, in float64."""
    return float((merged.to(torch.float64) * (_times_gram(stats, merged) - 2 * stats.target)).sum())


def _adam_descent(
    stats: InterferenceStatistics, iterations: int, learning_rate: float
) -> torch.Tensor:
    """``iterations`` Adam steps on Eq. 21 from the sum of the task vectors.

    The gradient 2 (tau_m C - D) is a small difference of two large terms near the
    minimum, so it is evaluated as 2 R + (tau_m - a) 2C: R = a C - D exactly
    (float64) at an anchor a, re-anchored every ``RESIDUAL_REFRESH_STEPS`` steps,
    and the correction in the working dtype, whose rounding is then relative to
    the small offset tau_m - a rather than to tau_m. Each step stays one matmul.

    Adam's parameter is the offset itself (tau_m = a + offset), so no step spends
    a pass forming it. Adam's update does not depend on its parameter's value, so
    folding the offset into the anchor between steps leaves the trajectory as it
    is; tau_m is rounded to the working dtype once per re-anchoring, not per step.
    """
    working = stats.dtype
    anchor = stats.initial.clone()
    offset = torch.zeros_like(anchor)
    residual = torch.empty_like(anchor)  # 2 R
    # Doubling is exact, so 2 R + offset @ 2C is one fused multiply-add.
    if stats.gram is not None:
        doubled = (stats.gram * 2).to(working)

        def left(offset: torch.Tensor) -> torch.Tensor:
            return offset
    else:
        rows, doubled = stats.rows.to(working), (stats.rows * 2).to(working)

        def left(offset: torch.Tensor) -> torch.Tensor:
            return offset @ rows.T

    def fill_gradient(step: int, gradient: torch.Tensor) -> None:
        if (step - 1) % RESIDUAL_REFRESH_STEPS == 0:
            anchor.add_(offset)
            offset.zero_()
            residual.copy_((_times_gram(stats, anchor) - stats.target) * 2)
            gradient.copy_(residual)
        else:
            torch.addmm(residual, left(offset), doubled, out=gradient)

    adam(offset, fill_gradient, iterations, learning_rate)
    return anchor.add_(offset)


def adam(
    parameter: torch.Tensor,
    fill_gradient: Callable[[int, torch.Tensor], None],
    iterations: int,
    learning_rate: float,
) -> torch.Tensor:
    """Adam with PyTorch's defaults, in place on ``parameter``, which it returns.

    ``fill_gradient(step, out)`` writes the gradient at ``parameter`` for step
    1, 2, ... into ``out``. The update is PyTorch's fused Adam kernel through its
    functional form, so the result is bit-identical to ``torch.optim.Adam(...,
    fused=True)`` (tests/test_solver.py checks the bits) and equal to its default
    paths up to float rounding. Fused, the update is one pass over the four
    tensors instead of seven: on CPU, for a [3072, 768] weight, 3 ms a step
    instead of 8, next to the step's 46 ms matmul.
    """
    beta1, beta2 = ADAM_BETAS
    gradient = torch.empty_like(parameter)
    first_moment = torch.zeros_like(parameter)
    second_moment = torch.zeros_like(parameter)
    step_count = torch.zeros((), dtype=torch.float32, device=parameter.device)
    for step in range(1, iterations + 1):
        fill_gradient(step, gradient)
        # Increments step_count itself.
        torch_adam_functional(
            [parameter], [gradient], [first_moment], [second_moment], [], [step_count],
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=learning_rate,
            weight_decay=0.0, eps=ADAM_EPS, maximize=False,
        )
    return parameter


# C is a sum of unit-trace Grams. Where it is rank-deficient, tau_m along the
# directions no task vector spans is decided by the ridge against C's rounding,
# so the system is solved in float64, and one whose smallest Cholesky pivot (an
# upper bound on its smallest eigenvalue) is below 1e-12 of C's trace (the
# number of active experts) is refused: float64 would be out of digits there.
MIN_RELATIVE_PIVOT = 1e-12


def wudi_closed_form(
    task_vectors: Sequence[torch.Tensor], *, omega: float, name: Optional[str] = None
) -> torch.Tensor:
    """WUDI-CFS, paper Eq. 20: the ridge-regularised minimiser, ``omega > 0``.

    tau_m (sum_i w_i (tau_i^T tau_i + omega I)) = sum_i w_i tau_i (tau_i^T tau_i + omega I),
    w_i = 1/||tau_i||^2, i.e. tau_m (C + omega sum w I) = D + omega sum_i w_i tau_i.
    ``name`` only labels the error raised when omega is too small to solve.
    Returns float64.
    """
    if not task_vectors:
        raise ValueError("WUDI needs at least one task vector")
    stats = interference_statistics(task_vectors, dtype=torch.float64, ridge_term=True)
    if stats.active <= 1:
        return stats.initial
    ridge = omega * stats.weight_total
    system = stats.gram + torch.eye(
        stats.gram.shape[0], dtype=stats.gram.dtype, device=stats.gram.device
    ) * ridge
    rhs = stats.target + omega * stats.weighted_sum
    # system is symmetric positive definite: X system = rhs  <=>  system X^T = rhs^T.
    factor, failed = torch.linalg.cholesky_ex(system)
    if failed or float(factor.diagonal().min()) ** 2 < MIN_RELATIVE_PIVOT * stats.active:
        raise ValueError(
            f"wudi: tensor {name!r}: parameter 'omega' = {omega:g} is too small for"
            " these task vectors, which span too few directions to solve Eq. 20"
            f" without it (omega * mean 1/||tau_i||^2 = {ridge / stats.active:.3g});"
            " raise omega"
        )
    return torch.cholesky_solve(rhs.T, factor).T


def interference_loss(merged: torch.Tensor, task_vectors: Iterable[torch.Tensor]) -> float:
    """Eq. 21 evaluated directly (float64), zero task vectors contributing nothing."""
    merged = merged.double()
    total = 0.0
    for tau in task_vectors:
        tau = tau.double()
        norm_sq = float((tau * tau).sum())
        if norm_sq:
            total += float(torch.linalg.matrix_norm((merged - tau) @ tau.T) ** 2) / norm_sq
    return total
