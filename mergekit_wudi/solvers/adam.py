"""WUDI's own solver, paper Algorithm 1: Adam on Eq. 21 from the sum of the task vectors.

Each step costs one matmul whatever the number of experts (the gradient is
``2 (tau_m C - D)``, see ``statistics``); the authors' loop forms N
``[out, out]`` products and back-propagates through them. The trajectory is the
authors' step for step (Adam is not rotation-invariant, so reaching the same
minimum would not be enough): tests/oracle.py is the reference.

Near the minimum the gradient is a small difference of two large terms, so it is
evaluated as ``2 R + 2 (tau_m - a) C``: ``R = a C - D`` held accurately at an
anchor ``a`` and the correction, relative to the small offset ``tau_m - a``, in
float32. ``R`` is computed once, from the task vectors, as
``sum_i w_i (a - tau_i) tau_i^T tau_i`` (the cancelling terms subtracted before
any product), and every ``RESIDUAL_REFRESH_STEPS`` steps the offset is folded into
the anchor and ``R`` moved by ``offset C``. Those few products are accurate far
below float32 rounding (``products.exact_matmul``: float64 matmuls, or float32
matmuls on error-free splits where float64 is slow); the 300 steps are plain
float32 (full float32: ``matmul_precision``). Neither D nor a float64 copy of anything ``[out, in]`` is kept: the
working memory is the four Adam tensors (offset, gradient, two moments), the
anchor and R, six float32 copies, beside C (three float32 ``[in, in]``: as much
as one float64 and one float32 copy of it).
"""

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch.optim.adam import adam as torch_adam_functional

from mergekit_wudi.solvers.matmul_precision import full_float32_matmuls
from mergekit_wudi.solvers.products import (
    AccurateMatrix,
    block_length,
    blocks,
    exact_matmul,
    float64_matmuls_are_fast,
)
from mergekit_wudi.solvers.progress import DONE, Progress
from mergekit_wudi.solvers.statistics import (
    TaskVectorScan,
    prefers_stacked_form,
    scan_task_vectors,
    sum_task_vectors,
)

LOG = logging.getLogger(__name__)

# Paper defaults (Section 4.1): Adam, lr 1e-5, 300 steps; betas/eps are PyTorch's.
DEFAULT_ITERATIONS = 300
DEFAULT_LEARNING_RATE = 1e-5
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# Every this many Adam steps the offset is folded into the anchor and the
# residual moved with it by an accurate product.
RESIDUAL_REFRESH_STEPS = 50


def wudi_adam(
    task_vectors: Sequence[torch.Tensor],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    float64_matmuls: Optional[bool] = None,
    name: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Merged task vector tau_m after ``iterations`` Adam steps on Eq. 21.

    ``task_vectors`` is read twice (a scan, then the residual and C), so it may be
    a lazy sequence that computes each one on demand: peak memory then does not
    grow with N. Returns float32 (float64 for extreme magnitudes, see
    ``statistics.FLOAT32_SAFE_RANGE``) on the task vectors' device.

    ``float64_matmuls`` chooses how the few accurate products are computed:
    float64 matmuls (True) or float32 ones on error-free splits (False); None
    asks ``products.float64_matmuls_are_fast`` about the device. Both meet the
    same precision tests (tests/test_solvers_adam.py).

    Adam moves each entry by about ``learning_rate`` per step whatever the task
    vectors' size, so on task vectors much smaller than that it overshoots. If
    the loss ends above its value at the start, the start (the sum, read a third
    time) is returned and a warning naming ``name`` is logged.

    ``progress`` (``solvers.progress``) hears of the setup (C and the residual)
    as one unit, then of each step.
    """
    if not task_vectors:
        raise ValueError("WUDI needs at least one task vector")
    scan = scan_task_vectors(task_vectors)
    descent = descent_start(task_vectors, scan, iterations, float64_matmuls, progress)
    if descent is None:
        return scan.initial
    gram, residual = descent
    steps_done = None
    if progress is not None:
        def steps_done(steps: int) -> None:
            phase = "Adam steps" if steps < iterations else DONE
            progress(phase, steps + 1, iterations + 1)
    merged = scan.initial  # becomes tau_m in place
    change = adam_descent(gram, residual, merged, iterations, learning_rate, steps_done)
    if change > 0:
        start = sum_task_vectors(task_vectors, scan.dtype)
        LOG.warning(
            "wudi: Adam raised the interference loss of tensor %r (learning_rate %g is"
            " too large for task vectors this small: their sum's largest entry is %.3g);"
            " keeping the sum of the task vectors. Lower learning_rate to solve it.",
            name, learning_rate, float(start.abs().max()),
        )
        return start
    return merged


def descent_start(
    task_vectors: Sequence[torch.Tensor],
    scan: TaskVectorScan,
    iterations: int,
    float64_matmuls: Optional[bool],
    progress: Optional[Progress] = None,
) -> Optional[Tuple["Gram", torch.Tensor]]:
    """``wudi_adam``'s setup after its scan: C and R at the sum (``gram_and_residual``),
    or None where the sum is the answer. ``float64_matmuls`` and ``progress`` as
    ``wudi_adam`` takes them."""
    if scan.active <= 1 or iterations == 0:
        # One expert: tau_m = tau_1 is an exact zero of the gradient, so Adam
        # would never move; skip the rounding noise of evaluating it.
        return None
    if float64_matmuls is None:
        float64_matmuls = float64_matmuls_are_fast(scan.initial.device)
    # Beyond float32's range (extreme magnitudes) everything is float64 anyway.
    float64_matmuls = float64_matmuls or scan.dtype == torch.float64
    if progress is not None:
        progress("C and residual", 0, iterations + 1)
    return gram_and_residual(task_vectors, scan, float64_matmuls)


def adam_working_bytes(
    out_features: int, in_features: int, experts: int, dtype: torch.dtype = torch.float32
) -> int:
    """Peak bytes ``wudi_adam`` allocates beyond its inputs (an upper bound).

    Six ``[out, in]`` tensors in the working dtype (offset, gradient, two Adam
    moments, anchor, residual; the setup holds fewer), temporaries of at most
    five row blocks (``products.blocks``) and 1 MiB of small ones; plus C: three
    float32 ``[in, in]`` (one float64 in a float64 working dtype), or in the
    stacked form the stacked task vectors. tests/test_solvers_adam.py and
    ``benchmarks/llm_scale.py`` compare it with measurements.
    """
    entry = torch.finfo(dtype).bits // 8
    if prefers_stacked_form(out_features, in_features, experts):
        gram = experts * out_features * in_features * entry
    else:
        gram = (8 if dtype == torch.float64 else 12) * in_features**2
    block = block_length(out_features, in_features) * in_features * entry
    return (6 * out_features * in_features * entry + gram + 5 * block + 2**20)


@dataclass
class ExplicitGram:
    """C as an ``[in, in]`` matrix, summed accurately (``products.AccurateMatrix``)."""

    matrix: AccurateMatrix

    def step(self, offset: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
        """out = 2 (residual + offset C) in the working dtype: one fused matmul (doubling is exact)."""
        torch.addmm(residual, offset, self.matrix.high, beta=2, alpha=2, out=out)

    def exact_times(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ C, accurately, in float64."""
        return self.matrix.times(rows)


@dataclass
class FactoredGram:
    """C = factors^T diag(weights) factors: the stacked task vectors (``[k, in]``,
    working dtype) and a weight per row, cheaper than ``[in, in]`` where
    ``in > 2 N out`` (``statistics.prefers_stacked_form``)."""

    factors: torch.Tensor
    weights: torch.Tensor  # float64, [k]
    float64_matmuls: bool

    def step(self, offset: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
        weights = self.weights.to(self.factors.dtype)
        # (offset factors^T) is [rows, k]: made a block of rows at a time.
        for rows in blocks(offset.shape[0], self.factors.shape[0]):
            inner = (offset[rows] @ self.factors.T).mul_(weights)
            torch.addmm(residual[rows], inner, self.factors, beta=2, alpha=2, out=out[rows])

    def exact_times(self, rows: torch.Tensor) -> torch.Tensor:
        inner = exact_matmul(rows, self.factors.T, float64_matmuls=self.float64_matmuls)
        inner.mul_(self.weights)
        return exact_matmul(inner, self.factors, float64_matmuls=self.float64_matmuls)


Gram = Union[ExplicitGram, FactoredGram]


def residual_through_own_gram(out_features: int, in_features: int, float64_matmuls: bool) -> bool:
    """Whether each expert's residual term goes through its own [in, in] Gram.

    Where that Gram takes at most two float32 [out, in] tensors' worth (beside C,
    the sum, R and R's low part); else the term goes through (a - tau_i) tau_i^T,
    ``[rows, out]``: 2 out^2 in FLOPs more for a square weight, fewer where
    out < in / 2.
    """
    return AccurateMatrix.bytes_per_entry(float64_matmuls) * in_features <= 8 * out_features


@full_float32_matmuls()
def gram_and_residual(
    task_vectors: Iterable[torch.Tensor], scan: TaskVectorScan, float64_matmuls: bool
):
    """C and R = a C - D at the anchor a = the sum, from a second read of the task vectors.

    ``R = sum_i w_i (a - tau_i) tau_i^T tau_i``: each expert's term is formed from
    the exact difference ``a - tau_i`` (float64, a block of rows at a time),
    through tau_i's own Gram, ``[in, in]``, or, where that is the larger, through
    ``(a - tau_i) tau_i^T`` (``[rows, out]``).
    """
    anchor = scan.initial
    out_features, in_features = anchor.shape
    dtype, device = anchor.dtype, anchor.device
    stacked = prefers_stacked_form(out_features, in_features, scan.active)
    if stacked:
        weights = [weight for weight in scan.weights if weight]
        factors = anchor.new_empty((scan.active * out_features, in_features))
        row_weights = torch.tensor(weights, dtype=torch.float64, device=device)
        gram = FactoredGram(
            factors, row_weights.repeat_interleave(out_features), float64_matmuls
        )
    else:
        gram_matrix = AccurateMatrix(in_features, in_features, dtype, device, float64_matmuls)
    own_matrix = residual_through_own_gram(out_features, in_features, float64_matmuls)
    # The experts' terms are larger than their sum: it is accumulated with its
    # float32 rounding error beside it, and rounded once.
    residual = AccurateMatrix(
        out_features, in_features, dtype, device, float64_matmuls=dtype == torch.float64
    )
    index = 0
    for tau, weight in zip(task_vectors, scan.weights):
        if not weight:
            continue  # all zero
        tau = tau.to(dtype)
        if stacked:
            factors[index * out_features:(index + 1) * out_features] = tau
            index += 1
        if own_matrix:
            matrix = AccurateMatrix(in_features, in_features, dtype, device, float64_matmuls)
            matrix.add_gram(tau, weight)
            for rows in matrix.row_blocks():
                gram_matrix.add_rows(rows, matrix.rows_float64(rows))
            own = ExplicitGram(matrix.finish(steps=False))
        else:
            # Read once per block of rows: held in float64 if that is how it is multiplied.
            own = FactoredGram(
                tau.to(torch.float64) if float64_matmuls else tau,
                anchor.new_full((out_features,), weight, dtype=torch.float64),
                float64_matmuls,
            )
            if not stacked:
                gram_matrix.add_gram(tau, weight)
        for rows in blocks(out_features, in_features):
            difference = anchor[rows].to(torch.float64) - tau[rows]
            residual.add_rows(rows, own.exact_times(difference))
        del own
    if not stacked:
        gram = ExplicitGram(gram_matrix.finish())
    return gram, residual.high


@full_float32_matmuls()
def adam_descent(
    gram: Gram,
    residual: torch.Tensor,
    anchor: torch.Tensor,
    iterations: int,
    learning_rate: float,
    steps_done: Optional[Callable[[int], None]] = None,
) -> float:
    """``iterations`` Adam steps on Eq. 21 from ``anchor``, which becomes tau_m in place.

    ``residual`` (R = anchor C - D, updated in place) and ``gram`` (C) are
    ``gram_and_residual``'s. Returns the change of the loss, L(tau_m) - L(start).
    ``steps_done(k)``, if given, is told before each step and at the end how many
    steps are done.

    Adam's parameter is the offset tau_m - a itself (Adam's update does not depend
    on its parameter's value), so no step spends a pass forming tau_m. A fold
    adds the offset to the anchor, and R the product ``(a_new - a_old) C``: the
    anchor's actual change, so R stays that of the rounded anchor, while what
    the rounding left out stays in the offset. The loss changes by
    ``<a_new - a_old, R_old + R_new>`` at each fold (exactly, the loss being
    quadratic), so its total is known without D.

    Its float32 matmuls run in full float32 whatever the caller set (TF32 would
    round each step's product to 10 bits: ``matmul_precision``).
    """
    offset = torch.zeros_like(anchor)
    gradient: Optional[torch.Tensor] = None
    change = 0.0

    def fold() -> None:
        nonlocal change
        for rows in blocks(*anchor.shape):
            start, rest, rows_residual = anchor[rows], offset[rows], residual[rows]
            moved = start + rest
            shift = start.sub_(moved).neg_()  # moved - start, exactly (in place of start)
            rest.sub_(shift)
            product = gram.exact_times(shift)
            change += float(
                (shift.to(torch.float64) * (product + 2 * rows_residual.to(torch.float64))).sum()
            )
            rows_residual += product
            start.copy_(moved)

    def gradient_at(step: int) -> torch.Tensor:
        nonlocal gradient
        if steps_done is not None:
            steps_done(step - 1)
        if step > 1 and (step - 1) % RESIDUAL_REFRESH_STEPS == 0:
            gradient = None  # its memory is the fold's working space
            fold()
        if gradient is None:
            gradient = torch.empty_like(anchor)
        gram.step(offset, residual, out=gradient)
        return gradient

    adam_steps(offset, gradient_at, iterations, learning_rate)
    gradient = None
    fold()
    anchor.add_(offset)
    if steps_done is not None:
        steps_done(iterations)
    return change


def adam_steps(
    parameter: torch.Tensor,
    gradient_at: Callable[[int], torch.Tensor],
    iterations: int,
    learning_rate: float,
) -> torch.Tensor:
    """Adam with PyTorch's defaults, in place on ``parameter``, which it returns.

    ``gradient_at(step)`` returns the gradient at ``parameter`` for step 1, 2, ...
    The update is PyTorch's fused Adam kernel through its functional form, so
    the result is bit-identical to ``torch.optim.Adam(..., fused=True)``
    (tests/test_solvers_adam.py checks the bits) and equal to its default paths
    up to float rounding. Fused, the update is one pass over the four tensors
    instead of seven: on CPU, for a [3072, 768] weight, 3 ms a step instead of
    8, next to the step's 46 ms matmul.
    """
    beta1, beta2 = ADAM_BETAS
    first_moment = torch.zeros_like(parameter)
    second_moment = torch.zeros_like(parameter)
    step_count = torch.zeros((), dtype=torch.float32, device=parameter.device)
    for step in range(1, iterations + 1):
        # Increments step_count itself.
        torch_adam_functional(
            [parameter], [gradient_at(step)], [first_moment], [second_moment], [], [step_count],
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=learning_rate,
            weight_decay=0.0, eps=ADAM_EPS, maximize=False,
        )
    return parameter
