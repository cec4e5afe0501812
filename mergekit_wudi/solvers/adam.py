"""WUDI's own solver, paper Algorithm 1: Adam on Eq. 21 from the sum of the task vectors.

Each step costs one matmul whatever the number of experts (the gradient is
``2 (tau_m C - D)``, see ``statistics``); the authors' loop forms N
``[out, out]`` products and back-propagates through them. The trajectory is the
authors' step for step (Adam is not rotation-invariant, so reaching the same
minimum would not be enough): tests/oracle.py is the reference.
"""

import logging
from typing import Callable, Optional, Sequence

import torch
from torch.optim.adam import adam as torch_adam_functional

from mergekit_wudi.solvers.statistics import (
    InterferenceStatistics,
    interference_statistics,
    loss_less_constant,
    prefers_stacked_form,
    solve_dtype,
    times_gram,
)

LOG = logging.getLogger(__name__)

# Paper defaults (Section 4.1): Adam, lr 1e-5, 300 steps; betas/eps are PyTorch's.
DEFAULT_ITERATIONS = 300
DEFAULT_LEARNING_RATE = 1e-5
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# The exact (float64) residual tau_m C - D is re-evaluated every this many Adam
# steps; in between, steps add (tau_m - anchor) C in the working precision.
RESIDUAL_REFRESH_STEPS = 50


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
    merged = adam_descent(stats, iterations, learning_rate)
    start, end = loss_less_constant(stats, stats.initial), loss_less_constant(stats, merged)
    if end > start:
        LOG.warning(
            "wudi: Adam raised the interference loss of tensor %r (learning_rate %g is"
            " too large for task vectors this small: their sum's largest entry is %.3g);"
            " keeping the sum of the task vectors. Lower learning_rate to solve it.",
            name, learning_rate, float(stats.initial.abs().max()),
        )
        return stats.initial
    return merged


def adam_descent(
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
            residual.copy_((times_gram(stats, anchor) - stats.target) * 2)
            gradient.copy_(residual)
        else:
            torch.addmm(residual, left(offset), doubled, out=gradient)

    adam_steps(offset, fill_gradient, iterations, learning_rate)
    return anchor.add_(offset)


def adam_steps(
    parameter: torch.Tensor,
    fill_gradient: Callable[[int, torch.Tensor], None],
    iterations: int,
    learning_rate: float,
) -> torch.Tensor:
    """Adam with PyTorch's defaults, in place on ``parameter``, which it returns.

    ``fill_gradient(step, out)`` writes the gradient at ``parameter`` for step
    1, 2, ... into ``out``. The update is PyTorch's fused Adam kernel through its
    functional form, so the result is bit-identical to ``torch.optim.Adam(...,
    fused=True)`` (tests/test_solvers_adam.py checks the bits) and equal to its default
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
