"""Data-free interference figures of WUDI problems (pure tensor math: torch only, no mergekit).

For the task vectors ``tau_1..tau_N`` of one linear weight (``[out, in]`` view),
WUDI's loss (paper Eq. 21) is a sum of one term per expert,

    L_i(x) = ||(x - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 = <e, e G_i>,  e = x - tau_i,

``G_i = tau_i^T tau_i / ||tau_i||^2``: the energy of the merged update's error on
expert i's own input subspace (each direction weighted by how much tau_i uses it).
``L_i`` is evaluated at these points:

- ``zero``: no update at all (the base model); ``L(0) = sum_i ||tau_i tau_i^T||^2 / ||tau_i||^2``,
  the scale every other point is measured against (``relative``);
- ``sum``: task arithmetic at lambda 1, WUDI's starting point;
- ``average``: the sum divided by the number of experts (that are not all zero);
- ``solution``: the configured solver's ``tau_m``;
- ``merged``: ``lambda * tau_m``, the update the merge writes.

Each term is evaluated on its residual ``e`` directly, one ``[out, in] x [in, in]``
(or stacked ``[out, in] x [in, out]``) product per expert and point, never as a
difference of large terms: a loss near zero (identical experts, an exact
minimiser) comes out near zero, not as float64 noise of ``L(0)``.

The effective rank of ``C = sum_i G_i`` is the participation ratio of its
eigenvalues, ``(sum lam)^2 / sum lam^2 = tr(C)^2 / ||C||_F^2``: 1 when every
expert's update uses the same single input direction, ``N r`` for N experts on
disjoint rank-r subspaces with flat spectra. For one expert (``C = G_i``, trace 1)
it is ``1 / ||G_i||_F^2``, the participation ratio of ``tau_i``'s squared
singular values.

Every raw figure is a sum over the problems of a tensor, so a stacked tensor
(one problem per slice) adds its slices' figures (``Figures.__add__``).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from mergekit_wudi.solvers.statistics import (
    InterferenceStatistics,
    interference_statistics,
    prefers_stacked_form,
    times_gram,
)

POINTS = ("zero", "sum", "average", "solution", "merged")
SOLVED_POINTS = ("solution", "merged")


@dataclass
class Figures:
    """Raw, additive figures of N experts (indexed as the recipe lists them).

    An expert that does not contribute to a problem has a zero row in ``inner``,
    zero loss terms and zero Gram figures there.
    """

    inner: List[List[float]]  # <tau_i, tau_j>
    expert_loss: Dict[str, List[float]]  # point -> L_i
    gram_trace: float  # tr C
    gram_norm_sq: float  # ||C||_F^2
    expert_gram_trace: List[float]  # tr G_i: the problems expert i contributes to
    expert_gram_norm_sq: List[float]  # ||G_i||_F^2
    problems: int = 1

    def __add__(self, other: "Figures") -> "Figures":
        def add(a, b):
            return [add(x, y) for x, y in zip(a, b)] if isinstance(a, list) else a + b

        return Figures(
            inner=add(self.inner, other.inner),
            expert_loss={point: add(self.expert_loss[point], other.expert_loss[point])
                         for point in self.expert_loss},
            gram_trace=self.gram_trace + other.gram_trace,
            gram_norm_sq=self.gram_norm_sq + other.gram_norm_sq,
            expert_gram_trace=add(self.expert_gram_trace, other.expert_gram_trace),
            expert_gram_norm_sq=add(self.expert_gram_norm_sq, other.expert_gram_norm_sq),
            problems=self.problems + other.problems,
        )

    def placed(self, positions: Sequence[int], experts: int) -> "Figures":
        """These figures (of the experts at ``positions``) among ``experts`` in all."""
        def spread(values, empty=0.0):
            row = [empty] * experts
            for position, value in zip(positions, values):
                row[position] = value
            return row

        inner = [[0.0] * experts for _ in range(experts)]
        for a, row in zip(positions, self.inner):
            for b, value in zip(positions, row):
                inner[a][b] = value
        return Figures(
            inner=inner,
            expert_loss={point: spread(values) for point, values in self.expert_loss.items()},
            gram_trace=self.gram_trace,
            gram_norm_sq=self.gram_norm_sq,
            expert_gram_trace=spread(self.expert_gram_trace),
            expert_gram_norm_sq=spread(self.expert_gram_norm_sq),
            problems=self.problems,
        )


def gram_trace_and_norm_sq(stats: InterferenceStatistics) -> tuple:
    """tr C and ||C||_F^2, from C or, in the stacked form, from rows rows^T."""
    if stats.gram is not None:
        return float(stats.gram.diagonal().sum()), float((stats.gram * stats.gram).sum())
    outer = stats.rows @ stats.rows.T  # same nonzero eigenvalues as C = rows^T rows
    return float(outer.diagonal().sum()), float((outer * outer).sum())


def own_subspace_energy(stats: InterferenceStatistics, error: torch.Tensor) -> float:
    """<e, e G> for the one-expert statistics ``stats`` (G = its C)."""
    return float((error * times_gram(stats, error)).sum())


def _statistics(task_vectors: Sequence[torch.Tensor]) -> InterferenceStatistics:
    out_features, in_features = task_vectors[0].shape
    return interference_statistics(
        task_vectors,
        stacked=prefers_stacked_form(out_features, in_features, len(task_vectors)),
        dtype=torch.float64,
    )


def interference_figures(
    task_vectors: Sequence[torch.Tensor],
    solution: Optional[torch.Tensor] = None,
    lam: float = 1.0,
) -> Figures:
    """Figures of one WUDI problem; ``task_vectors`` are read in float64.

    ``task_vectors`` may be a lazy sequence (each read makes one): it is read
    about N + 2 times per expert, so memory does not grow with N. Without a
    ``solution`` only the points ``zero``, ``sum`` and ``average`` are evaluated.
    """
    if not task_vectors:
        raise ValueError("interference figures need at least one task vector")
    experts = len(task_vectors)
    stats = _statistics(task_vectors)
    trace, norm_sq = gram_trace_and_norm_sq(stats)
    total = stats.initial  # sum_i tau_i, float64
    # The average over the experts that carry a direction, as in the solve.
    points = {"zero": None, "sum": total, "average": total / max(stats.active, 1)}
    if solution is not None:
        points["solution"] = solution.to(torch.float64)
        points["merged"] = points["solution"] * lam
    inner = [[0.0] * experts for _ in range(experts)]
    expert_loss = {point: [0.0] * experts for point in points}
    expert_trace, expert_norm_sq = [0.0] * experts, [0.0] * experts
    for i in range(experts):
        tau = task_vectors[i].to(torch.float64)
        for j in range(i + 1):
            other = tau if j == i else task_vectors[j].to(torch.float64)
            inner[i][j] = inner[j][i] = float((tau * other).sum())
        if inner[i][i] == 0.0:
            continue  # no direction: contributes nothing, as in the solve
        own = _statistics([tau])
        expert_trace[i], expert_norm_sq[i] = gram_trace_and_norm_sq(own)
        for point, merged in points.items():
            error = -tau if merged is None else merged - tau
            expert_loss[point][i] = own_subspace_energy(own, error)
    return Figures(inner, expert_loss, trace, norm_sq, expert_trace, expert_norm_sq)


def figures_working_bytes(out_features: int, in_features: int, experts: int) -> int:
    """Peak bytes ``interference_figures`` allocates beyond its inputs (an upper bound).

    Float64: the statistics of all experts and of one (sum, D and C, or stacked
    rows), the points (average, solution, merged), two task vectors and a
    residual with its products; measured (tests/test_report_figures.py) at about
    ``10 out in + 3 in^2`` entries, ``(12 + N) out in`` stacked; plus 1 MiB.
    """
    if prefers_stacked_form(out_features, in_features, experts):
        entries = (13 + experts) * out_features * in_features + (experts + 2) * out_features**2
    else:
        entries = 11 * out_features * in_features + 3 * in_features**2
    return 8 * entries + 2**20


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator else None


@dataclass
class Summary:
    """What a tensor's figures say, in the report's terms."""

    norms: List[float]
    cosine: List[List[Optional[float]]]
    loss: Dict[str, float]
    relative: Dict[str, Optional[float]]  # loss / loss at zero
    expert_loss: Dict[str, List[float]]
    expert_share: Dict[str, List[Optional[float]]]  # L_i / L
    removed: Optional[float]  # 1 - L(solution) / L(sum)
    effective_rank: Optional[float]
    expert_effective_rank: List[Optional[float]]
    contributing: List[bool] = field(default_factory=list)


def summarise(figures: Figures) -> Summary:
    norms = [math.sqrt(max(figures.inner[i][i], 0.0)) for i in range(len(figures.inner))]
    cosine = [
        [figures.inner[i][j] / (norms[i] * norms[j]) if norms[i] and norms[j] else None
         for j in range(len(norms))]
        for i in range(len(norms))
    ]
    loss = {point: sum(values) for point, values in figures.expert_loss.items()}
    contributing = [trace > 0 for trace in figures.expert_gram_trace]
    return Summary(
        norms=norms,
        cosine=cosine,
        loss=loss,
        relative={point: _ratio(value, loss["zero"]) for point, value in loss.items()},
        expert_loss=figures.expert_loss,
        expert_share={
            point: [_ratio(value, loss[point]) if used else None
                    for value, used in zip(values, contributing)]
            for point, values in figures.expert_loss.items()
        },
        removed=(1.0 - loss["solution"] / loss["sum"]
                 if "solution" in loss and loss["sum"] else None),
        effective_rank=_ratio(figures.gram_trace**2, figures.gram_norm_sq),
        expert_effective_rank=[
            _ratio(trace**2, norm_sq) if trace else None
            for trace, norm_sq in zip(figures.expert_gram_trace, figures.expert_gram_norm_sq)
        ],
        contributing=contributing,
    )


def mean_matrix(matrices: Sequence[Sequence[Sequence[Optional[float]]]]) -> List[List[Optional[float]]]:
    """Entry-wise mean over the matrices where an entry is defined (not None)."""
    if not matrices:
        return []
    size = len(matrices[0])
    mean = [[None] * size for _ in range(size)]
    for i in range(size):
        for j in range(size):
            values = [matrix[i][j] for matrix in matrices if matrix[i][j] is not None]
            if values:
                mean[i][j] = sum(values) / len(values)
    return mean


def overall(summaries: Sequence[Summary]) -> Dict[str, Any]:
    """The figures of several tensors together: losses add, cosines average.

    ``loss``, ``relative`` and ``removed`` are the sums' figures (large tensors
    weigh more); ``expert_share`` is each expert's part of the summed loss;
    ``cosine`` is the mean over tensors where both experts contribute.
    """
    if not summaries:
        return {"loss": {}, "relative": {}, "removed": None, "expert_share": {}, "cosine": []}
    points = [point for point in POINTS if all(point in summary.loss for summary in summaries)]
    loss = {point: sum(summary.loss[point] for summary in summaries) for point in points}
    experts = len(summaries[0].norms)
    return {
        "loss": loss,
        "relative": {point: _ratio(value, loss["zero"]) for point, value in loss.items()},
        "removed": (1.0 - loss["solution"] / loss["sum"]
                    if "solution" in loss and loss["sum"] else None),
        "expert_share": {
            point: [_ratio(sum(summary.expert_loss[point][i] for summary in summaries), loss[point])
                    for i in range(experts)]
            for point in points
        },
        "cosine": mean_matrix([summary.cosine for summary in summaries]),
    }
