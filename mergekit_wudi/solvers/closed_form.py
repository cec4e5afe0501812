"""WUDI-CFS, paper Eq. 20: the ridge-regularised minimiser of Eq. 21 in closed form."""

from typing import Optional, Sequence

import torch

from mergekit_wudi.solvers.progress import DONE, Progress, silent
from mergekit_wudi.solvers.statistics import interference_statistics

# Ridge coefficient omega (paper Eq. 20).
DEFAULT_OMEGA = 1e-4

# C is a sum of unit-trace Grams. Where it is rank-deficient, tau_m along the
# directions no task vector spans is decided by the ridge against C's rounding,
# so the system is solved in float64, and one whose smallest Cholesky pivot (an
# upper bound on its smallest eigenvalue) is below 1e-12 of C's trace (the
# number of active experts) is refused: float64 would be out of digits there.
MIN_RELATIVE_PIVOT = 1e-12


def closed_form_working_bytes(out_features: int, in_features: int, experts: int) -> int:
    """Peak bytes ``wudi_closed_form`` allocates beyond its inputs (an upper bound).

    Float64 throughout: C and its Cholesky factor (``[in, in]``), and at most
    five float64 ``[out, in]`` (D with the ridge term, then the right-hand side;
    the sum; one task vector; the solution and a transposed copy), plus 1 MiB
    of small ones. Whatever the number of experts.
    """
    return 8 * (2 * in_features**2 + 5 * out_features * in_features) + 2**20


def wudi_closed_form(
    task_vectors: Sequence[torch.Tensor],
    *,
    omega: float,
    name: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """WUDI-CFS, paper Eq. 20: the ridge-regularised minimiser, ``omega > 0``.

    tau_m (sum_i w_i (tau_i^T tau_i + omega I)) = sum_i w_i tau_i (tau_i^T tau_i + omega I),
    w_i = 1/||tau_i||^2, i.e. tau_m (C + omega sum w I) = D + omega sum_i w_i tau_i.
    ``name`` only labels the error raised when omega is too small to solve.
    ``progress`` (``solvers.progress``) hears of three phases: C and D, the
    Cholesky factorisation, the solve. Returns float64.
    """
    if not task_vectors:
        raise ValueError("WUDI needs at least one task vector")
    report = progress or silent
    report("C and D", 0, 3)
    stats = interference_statistics(task_vectors, dtype=torch.float64, ridge_term=True)
    if stats.active <= 1:
        return stats.initial
    ridge, active = omega * stats.weight_total, stats.active
    # In place: the statistics are this solve's own.
    system = stats.gram
    system.diagonal().add_(ridge)
    rhs = stats.target.add_(stats.weighted_sum, alpha=omega)
    del stats
    # system is symmetric positive definite: X system = rhs  <=>  system X^T = rhs^T.
    report("Cholesky", 1, 3)
    factor, failed = torch.linalg.cholesky_ex(system)
    if failed or float(factor.diagonal().min()) ** 2 < MIN_RELATIVE_PIVOT * active:
        raise ValueError(
            f"wudi: tensor {name!r}: parameter 'omega' = {omega:g} is too small for"
            " these task vectors, which span too few directions to solve Eq. 20"
            f" without it (omega * mean 1/||tau_i||^2 = {ridge / active:.3g});"
            " raise omega"
        )
    report("solve", 2, 3)
    merged = torch.cholesky_solve(rhs.T, factor).T
    report(DONE, 3, 3)
    return merged
