"""The statistics every WUDI solver reads, and the loss they minimise.

For one linear weight with task vectors ``tau_i`` (``[out, in]``, ``y = W x``),
WUDI minimises (paper Eq. 21)

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2.

Writing ``u_i = tau_i / ||tau_i||_F``,

    grad L = 2 (tau_m C - D),  C = sum_i u_i^T u_i  [in, in],  D = sum_i tau_i u_i^T u_i,

so the loss, its gradient and its minimisers need only C and D, accumulated one
task vector at a time: memory does not grow with the number of experts N. Where
``in > 2 N out`` the factored product ``(tau_m S^T) S`` with ``S`` the stacked
``u_i`` is cheaper than ``C`` and smaller too.

``interference_statistics`` accumulates C and D in float64 (the closed form
reads them): near the minimum ``tau_m C`` and ``D`` cancel, and float32 copies of
them would move the minimum itself. The Adam solver needs neither D nor a
float64 C (``adam``), only the scan of the task vectors here.
"""

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from mergekit_wudi.solvers.products import blocks

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
    precision of the solver that reads it.
    """

    initial: torch.Tensor  # sum_i tau_i in dtype: where the flow starts
    target: torch.Tensor  # D
    gram: Optional[torch.Tensor]
    rows: Optional[torch.Tensor]
    # sum_i tau_i / ||tau_i||^2, the closed form's ridge term; None unless asked for.
    weighted_sum: Optional[torch.Tensor]
    weight_total: float  # sum_i 1 / ||tau_i||^2 (closed form only)
    # ||tau_i||_F of the task vectors that are not all zero, in the order of rows' blocks.
    norms: Tuple[float, ...]
    dtype: torch.dtype
    # Eq. 21's tau_m-free term sum_i ||tau_i tau_i^T||^2 / ||tau_i||^2; None unless asked for.
    loss_constant: Optional[float] = None

    @property
    def active(self) -> int:
        """Task vectors that are not all zero."""
        return len(self.norms)


def prefers_stacked_form(out_features: int, in_features: int, experts: int) -> bool:
    """Stacked ``(tau_m S^T) S`` costs 2 N out^2 in per step, Gram ``tau_m C`` out in^2."""
    return 2 * experts * out_features < in_features


def interference_statistics(
    task_vectors: Iterable[torch.Tensor],
    *,
    stacked: bool = False,
    dtype: torch.dtype = torch.float32,
    ridge_term: bool = False,
    loss_constant: bool = False,
) -> InterferenceStatistics:
    """Accumulate C, D and the sums over task vectors, each read once.

    ``ridge_term`` also accumulates ``weighted_sum``, which only the closed form
    reads: an ``[out, in]`` float64 the other solvers need not hold.
    ``loss_constant`` also accumulates Eq. 21's constant term, for the loss itself
    (``interference_losses``); no solver needs it.

    All-zero task vectors carry no direction (the paper's weight 1/||tau||^2 would
    be infinite); they add nothing, which is also their exact share of the sum.
    Besides the results, one task vector in float64 and one ``[in, in]`` Gram
    (``[out, out]`` stacked) are alive at a time.
    """
    initial = target = gram = weighted_sum = None
    rows = []
    weight_total = 0.0
    constant = 0.0
    norms = []
    for tau in task_vectors:
        if initial is None:
            initial = torch.zeros_like(tau, dtype=dtype)
            target = torch.zeros_like(tau, dtype=torch.float64)
            if ridge_term:
                weighted_sum = torch.zeros_like(target)
            if not stacked:
                gram = target.new_zeros((tau.shape[1], tau.shape[1]))
        norm_sq = squared_norm(tau)
        if norm_sq == 0.0:
            continue
        norms.append(norm_sq**0.5)
        initial += tau.to(dtype)
        weight = 1.0 / norm_sq
        weight_total += weight
        tau = tau.to(torch.float64)
        if ridge_term:
            weighted_sum.add_(tau, alpha=weight)
        # ||tau tau^T||^2 = ||tau^T tau||^2: Eq. 21's constant from either Gram.
        if stacked:
            rows.append(tau * weight**0.5)
            own_gram = tau @ tau.T
            target.addmm_(own_gram, tau, alpha=weight)
        else:
            own_gram = tau.T @ tau
            gram.add_(own_gram, alpha=weight)
            target.addmm_(tau, own_gram, alpha=weight)
        if loss_constant:
            constant += weight * float(own_gram.square().sum())
        del own_gram
    if initial is None:
        raise ValueError("WUDI needs at least one task vector")
    return InterferenceStatistics(
        initial=initial,
        target=target,
        gram=gram,
        rows=torch.cat(rows) if stacked and rows else None,
        weighted_sum=weighted_sum,
        weight_total=weight_total,
        norms=tuple(norms),
        dtype=dtype,
        loss_constant=constant if loss_constant else None,
    )


@dataclass(frozen=True)
class TaskVectorScan:
    """One read of the task vectors: their sum, weights, and the working dtype."""

    initial: torch.Tensor  # sum_i tau_i in dtype
    weights: List[float]  # 1 / ||tau_i||^2, 0.0 for an all-zero tau_i
    dtype: torch.dtype

    @property
    def active(self) -> int:
        return sum(1 for weight in self.weights if weight)


def scan_task_vectors(task_vectors: Sequence[torch.Tensor]) -> TaskVectorScan:
    """Sum, weights and working dtype (``FLOAT32_SAFE_RANGE``) in one read; a second read
    only for extreme magnitudes, whose sum is then taken in float64."""
    initial = None
    weights = []
    largest = 0.0
    for tau in task_vectors:
        if initial is None:
            initial = torch.zeros_like(tau, dtype=torch.float32)
        norm_sq = squared_norm(tau)
        weights.append(1.0 / norm_sq if norm_sq else 0.0)
        if norm_sq:
            largest = max(largest, float(tau.abs().max()))
            initial += tau.to(torch.float32)
    if initial is None:
        raise ValueError("WUDI needs at least one task vector")
    dtype = _dtype_for_magnitude(largest)
    if dtype != torch.float32:
        initial = sum_task_vectors(task_vectors, dtype)
    return TaskVectorScan(initial=initial, weights=weights, dtype=dtype)


def working_dtype(task_vectors: Iterable[torch.Tensor]) -> torch.dtype:
    """The working dtype ``scan_task_vectors`` chooses, from the magnitudes alone
    (one read, nothing kept): for sizing a solve before running it."""
    return _dtype_for_magnitude(max((float(tau.abs().max()) for tau in task_vectors), default=0.0))


def sum_task_vectors(task_vectors: Iterable[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_i tau_i in ``dtype``, in order: the sum the scan returns."""
    total = None
    for tau in task_vectors:
        total = tau.to(dtype, copy=True) if total is None else total.add_(tau.to(dtype))
    return total


def squared_norm(tau: torch.Tensor) -> float:
    """||tau||_F^2 in float64, a block of rows at a time (no float64 copy of tau)."""
    return sum(
        float(torch.square(tau[rows].to(torch.float64)).sum())
        for rows in blocks(tau.shape[0], tau.shape[1])
    )


def _dtype_for_magnitude(largest: float) -> torch.dtype:
    low, high = FLOAT32_SAFE_RANGE
    return torch.float32 if largest == 0.0 or low <= largest <= high else torch.float64


def times_gram(stats: InterferenceStatistics, merged: torch.Tensor) -> torch.Tensor:
    """tau_m C in float64."""
    merged = merged.to(torch.float64)
    if stats.gram is not None:
        return merged @ stats.gram
    return (merged @ stats.rows.T) @ stats.rows


def loss_less_constant(stats: InterferenceStatistics, merged: torch.Tensor) -> float:
    """Eq. 21 less its tau_m-free term: <tau_m, tau_m C - 2 D>, in float64."""
    return float((merged.to(torch.float64) * (times_gram(stats, merged) - 2 * stats.target)).sum())


def interference_losses(
    task_vectors: Sequence[torch.Tensor], merged: torch.Tensor
) -> Tuple[float, float]:
    """Eq. 21 at the sum of the task vectors and at ``merged``, in float64.

    One pass over the task vectors, as a solve's statistics take: the cost of
    about one Adam step per task vector, not the ``[out, out]`` products of
    evaluating Eq. 21 as written (tests/oracle.py's ``eq21``).
    """
    out_features, in_features = task_vectors[0].shape
    stats = interference_statistics(
        task_vectors,
        stacked=prefers_stacked_form(out_features, in_features, len(task_vectors)),
        dtype=torch.float64,
        loss_constant=True,
    )
    return tuple(
        max(loss_less_constant(stats, point) + stats.loss_constant, 0.0)
        for point in (stats.initial, merged)
    )


def interference_losses_working_bytes(out_features: int, in_features: int, experts: int) -> int:
    """Peak bytes ``interference_losses`` allocates beyond its inputs (an upper bound).

    Float64 throughout: the sum, D, one task vector and its scaled copy, and the
    loss's temporaries (the point, its product with C, ``2 D`` and their
    difference, the elementwise product), ``[out, in]`` each; C and one Gram
    ``[in, in]``, or stacked the rows twice (built, then concatenated) and the
    ``[out, out]`` and ``[out, N out]`` products; plus 1 MiB of small ones.
    tests/test_solvers_statistics.py measures it.
    """
    if prefers_stacked_form(out_features, in_features, experts):
        rest = 2 * experts * out_features * in_features + (1 + experts) * out_features**2
    else:
        rest = 2 * in_features**2
    return 8 * (9 * out_features * in_features + rest) + 2**20
