"""Spectral WUDI: the gradient flow of Eq. 21 in closed form, with an optional rank cut.

The authors' follow-up (OptMerge, arXiv 2505.19892) replaces Adam's early-stopped
steps by one eigendecomposition per weight, ``C = V diag(lam) V^T``:

    tau_m = theta0 - theta0 V diag(f) V^T + D V diag(f / lam) V^T,   theta0 = sum_i tau_i

(C, D as in ``statistics``; eigenvalues clamped below at ``MIN_EIGENVALUE`` before
any filter or rule, as the authors do).

- ``f = 1 - exp(-lam t)``: exactly the gradient flow ``d theta/dt = -(theta C - D)``
  of half of Eq. 21 from the sum, at time t (``flow_time``; the authors' "iwudi").
  t = 0 is the sum (task arithmetic), t = inf the minimiser ``D C^-1`` (minimum-norm,
  ``D C^+``, where C is singular; its eigenvalues below the clamp aside).
- SWUDI: also f = 0 outside the ``K = ceil(r in)`` largest eigenvalues (``rank_ratio`` r).
- ASWUDI: K chosen per weight from the spectrum (``rank_ratio="auto"``, ``RankRule``).

Row space. theta0 and D are combinations of the rows of the stacked unit task
vectors ``S = [u_1; ...; u_N]`` (``C = S^T S``): ``theta0 = A S``, ``D = B S`` with
blocks ``A_i = ||tau_i|| I`` and ``B_i = ||tau_i|| u_i u_i^T``. So C's null space
contributes nothing, and where ``N out < in`` the nonzero spectrum is that of the
smaller Gram ``S S^T = U diag(lam) U^T`` (C's eigenvectors are ``S^T U diag(lam)^-1/2``):

    tau_m = theta0 - (A U diag(f) - B U diag(f / lam)) U^T S,

with no division by unclamped eigenvalues. C's other ``in - N out`` eigenvalues are
0, clamped to ``MIN_EIGENVALUE``; they enter only the rank rules' sums and median.
"""

import math
from enum import Enum
from typing import Optional, Sequence, Tuple, Union

import torch

from mergekit_wudi.solvers.progress import DONE, Progress, silent
from mergekit_wudi.solvers.statistics import InterferenceStatistics, interference_statistics

DEFAULT_FLOW_TIME = 300.0  # the authors' t for CLIP ViT-B/32 and Llama
DEFAULT_RANK_RATIO = 1.0  # keep every direction: the plain gradient-flow filter
AUTOMATIC_RANK = "auto"
MIN_EIGENVALUE = 1e-8

# The working precision of the eigendecomposition and of the products with its
# eigenvectors: the one place to choose it. float64 agrees with the float64
# references (matrix exponential, D C^-1) to about 1e-12 relative on the update
# tau_m - sum_i tau_i. float32 was measured (benchmarks/solver_speed.py, ViT
# shapes) 5e-5 to 2.3e-4 off at t = 300, and up to 2 (wrong) at t = inf with no cut,
# where f / lam divides its rounding by eigenvalues down to 1e-8.
EIGEN_DTYPE = torch.float64


class RankRule(str, Enum):
    """How ``rank_ratio="auto"`` picks K from C's clamped eigenvalues lam."""

    # K = ceil((sum sqrt(lam))^2 / sum lam): the participation ratio of sqrt(lam)
    # (the authors' choice for CLIP and LoRA experts).
    PARTICIPATION_SQRT = "participation_sqrt"
    # Keep sqrt(lam) > omega(beta) median(sqrt(lam)), at least one: the optimal
    # hard threshold for singular values at unknown noise level (the authors'
    # choice for full LLM fine-tunes). See ``gavish_donoho_omega``.
    GAVISH_DONOHO = "gavish_donoho"


def wudi_spectral(
    task_vectors: Sequence[torch.Tensor],
    *,
    flow_time: float = DEFAULT_FLOW_TIME,
    rank_ratio: Union[float, str] = DEFAULT_RANK_RATIO,
    rank_rule: Union[RankRule, str] = RankRule.PARTICIPATION_SQRT,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Merged task vector of spectral WUDI (module docstring), in ``EIGEN_DTYPE``.

    ``flow_time`` t >= 0 (``math.inf`` allowed); ``rank_ratio`` in (0, 1] or
    ``"auto"``, with ``rank_rule`` then picking K. All-zero task vectors are left
    out; with one task vector left, or t = 0, the result is the sum exactly.
    ``progress`` (``solvers.progress``) hears of three phases: C and D, the
    eigendecomposition, the filter.
    """
    if not task_vectors:
        raise ValueError("WUDI needs at least one task vector")
    report = progress or silent
    report("C and D", 0, 3)
    out_features, in_features = task_vectors[0].shape
    stats = interference_statistics(
        task_vectors,
        stacked=prefers_row_space(out_features, in_features, len(task_vectors)),
        dtype=EIGEN_DTYPE,
    )
    merged = spectral_solve(stats, flow_time, rank_ratio, rank_rule, EIGEN_DTYPE, report)
    report(DONE, 3, 3)
    return merged


def spectral_solve(
    stats: InterferenceStatistics,
    flow_time: float,
    rank_ratio: Union[float, str],
    rank_rule: Union[RankRule, str],
    dtype: torch.dtype,
    progress: Progress = silent,
) -> torch.Tensor:
    """``wudi_spectral`` from the statistics (Gram or stacked form), working in ``dtype``;
    ``progress`` hears of the eigendecomposition and the filter (units 1 and 2 of 3)."""
    start = stats.initial.to(dtype)
    if stats.active <= 1 or flow_time == 0:
        # One expert: the sum is the minimum and every filter leaves it there.
        return start
    out_features, in_features = start.shape
    progress("eigendecomposition", 1, 3)
    if stats.rows is None:
        eigenvalues, vectors = torch.linalg.eigh(stats.gram.to(dtype))
        null_count = 0
    else:
        rows = stats.rows.to(dtype)
        eigenvalues, vectors = torch.linalg.eigh(rows @ rows.T)
        null_count = in_features - rows.shape[0]
    eigenvalues = eigenvalues.clamp_min(MIN_EIGENVALUE)  # ascending
    kept = min(
        kept_directions(eigenvalues, null_count, rank_ratio, rank_rule, out_features),
        eigenvalues.numel(),  # the rest are null directions, which contribute nothing
    )
    eigenvalues, vectors = eigenvalues[-kept:], vectors[:, -kept:]
    progress("filter", 2, 3)
    # 1 - exp(-lam t), exactly 1 at t = inf (lam >= MIN_EIGENVALUE > 0).
    flow = -torch.expm1(-eigenvalues * flow_time)
    if stats.rows is None:
        coefficients = (stats.target.to(dtype) @ vectors) * (flow / eigenvalues)
        coefficients -= (start @ vectors) * flow
        return start + coefficients @ vectors.T
    start_part, target_part = row_space_coefficients(rows, stats.norms, vectors)
    coefficients = target_part * (flow / eigenvalues) - start_part * flow
    return start + coefficients @ (vectors.T @ rows)


def spectral_working_bytes(out_features: int, in_features: int, experts: int) -> int:
    """Peak bytes ``wudi_spectral`` allocates beyond its inputs (an upper bound).

    Float64 throughout: the sum, D, one task vector, the coefficients and the
    result, ``[out, in]`` each; C and its eigenvectors, ``[in, in]``, or in the row
    space the stacked task vectors and the ``[N out, N out]`` Gram and its
    eigenvectors (tests/test_solvers_spectral.py measures the tensors); plus
    LAPACK's workspace for eigenvectors (``syevd``: 2 n^2 + 6 n floats) and
    1 MiB of small ones.
    """
    if prefers_row_space(out_features, in_features, experts):
        size = experts * out_features
        tensors = 6 * out_features * in_features + size * in_features + 2 * size**2
    else:
        size = in_features
        tensors = 5 * out_features * in_features + 2 * size**2
    return 8 * (tensors + 2 * size**2 + 6 * size) + 2**20


def prefers_row_space(out_features: int, in_features: int, experts: int) -> bool:
    """Decompose the ``[N out, N out]`` S S^T rather than the ``[in, in]`` C."""
    return experts * out_features < in_features


def row_space_coefficients(
    rows: torch.Tensor, norms: Sequence[float], vectors: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``A U`` and ``B U`` (module docstring) for eigenvectors U of S S^T = rows rows^T."""
    out_features = rows.shape[0] // len(norms)
    start = vectors.new_zeros((out_features, vectors.shape[1]))
    target = torch.zeros_like(start)
    for index, norm in enumerate(norms):
        block = slice(index * out_features, (index + 1) * out_features)
        unit = rows[block]
        start.add_(vectors[block], alpha=norm)
        target.add_(unit @ (unit.T @ vectors[block]), alpha=norm)
    return start, target


def kept_directions(
    eigenvalues: torch.Tensor,
    null_count: int,
    rank_ratio: Union[float, str],
    rank_rule: Union[RankRule, str],
    out_features: int,
) -> int:
    """K, from C's clamped eigenvalues: ``eigenvalues`` and ``null_count`` more at the clamp."""
    in_features = eigenvalues.numel() + null_count
    if rank_ratio != AUTOMATIC_RANK:
        # ceil, not moved up by the rounding of r * in (0.7 * 10 = 7.000000000000001).
        return max(1, min(in_features, math.ceil(rank_ratio * in_features - 1e-6)))
    spectrum = torch.cat([eigenvalues, eigenvalues.new_full((null_count,), MIN_EIGENVALUE)])
    return automatic_rank(spectrum, RankRule(rank_rule), (out_features, in_features))


def automatic_rank(eigenvalues: torch.Tensor, rule: RankRule, shape) -> int:
    """K in [1, len(eigenvalues)] by ``rule`` from the clamped eigenvalues of C."""
    roots = eigenvalues.sqrt()
    if rule == RankRule.PARTICIPATION_SQRT:
        kept = math.ceil(float(roots.sum()) ** 2 / float(eigenvalues.sum()))
    else:
        # torch's median: the lower of the two middle values for an even count.
        threshold = gavish_donoho_omega(min(shape) / max(shape)) * float(roots.median())
        kept = int((roots > threshold).sum())
    return max(1, min(kept, eigenvalues.numel()))


def gavish_donoho_omega(beta: float) -> float:
    """omega(beta) of Gavish and Donoho's optimal hard threshold, noise level unknown.

    M. Gavish and D. L. Donoho, "The Optimal Hard Threshold for Singular Values
    is 4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 2014: keep the singular values
    above omega(beta) * their median, beta the aspect ratio (<= 1) of the matrix;
    their Eq. (5) polynomial approximation (omega(1) = 2.86). Here the singular
    values are sqrt(lam), beta that of the weight ``[out, in]``, as the authors use.
    """
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
