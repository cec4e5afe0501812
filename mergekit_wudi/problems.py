"""From one tensor to its WUDI problems and back.

A tensor the rule solves (``tensor_rules.tensor_fate``) is a matrix, or a stack of
matrices (one per MoE expert). Each matrix, across the merged models, is one WUDI
problem: the models' task vectors ``weight_i * (W_i - W_base)`` in the ``[out, in]``
view the solvers take (``wudi_problems``). ``solve`` runs the configured solver
on one problem; ``TaskVectors.merged_weight`` maps its answer back to the stored
matrix, and ``stack_matrices`` reassembles the tensor.

The kernel (``method``) is a loop over these; a tool that must agree with the
merge (the report) uses the same functions.
"""

from typing import Any, Hashable, Iterator, Mapping, Optional, Sequence

import torch

from mergekit_wudi import solvers
from mergekit_wudi.parameters import Solver
from mergekit_wudi.tensor_rules import Layout, TensorFate


class TaskVectors(Sequence[torch.Tensor]):
    """``weight_i * (W_i - W_base)`` of one tensor, or one matrix of a stack.

    Models whose weight is 0 or whose tensor equals the base's contribute
    nothing, exactly as if absent: they are left out (``ids`` lists the models
    kept, ``weights`` their weights). Each task vector is made when read, in
    ``dtype`` (by default float32, float64 for float64 storage) and transposed to
    ``[out, in]`` if ``transpose``, so peak memory does not grow with the number of models.
    ``name`` labels messages: the tensor's name, ``name[e]`` for expert slice e.
    """

    def __init__(
        self,
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        weights: Sequence[float],
        ids: Optional[Sequence[Hashable]] = None,
        *,
        transpose: bool = False,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        ids = list(range(len(experts))) if ids is None else list(ids)
        kept = [
            index for index, (expert, weight) in enumerate(zip(experts, weights))
            if weight != 0 and not torch.equal(expert, base)
        ]
        self.base = base
        self.experts = [experts[index] for index in kept]
        self.weights = [weights[index] for index in kept]
        self.ids = [ids[index] for index in kept]
        self.transpose = transpose
        self.name = name
        if dtype is None:
            dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        self.dtype = dtype
        self._working_base = base.to(self.dtype)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, index: int) -> torch.Tensor:
        tau = (self.experts[index].to(self.dtype) - self._working_base).mul_(self.weights[index])
        return tau.T if self.transpose else tau

    def exact_result(self, lam: float) -> Optional[torch.Tensor]:
        """The stored tensor itself where the merge needs no arithmetic: the base's
        if no model changed it; that model's, bit for bit, if exactly one did and
        ``lam * weight == 1`` (the solve's exact answer); else None."""
        if not self.experts:
            return self.base
        if len(self.experts) == 1 and lam * self.weights[0] == 1:
            return self.experts[0]
        return None

    def merged_weight(self, merged: torch.Tensor, lam: float) -> torch.Tensor:
        """``W_base + lam * merged`` as stored: ``merged`` (a merged task vector in
        the ``[out, in]`` view) back in the stored orientation, rounded once to the
        stored dtype. An overflow there is an error naming the tensor."""
        if self.transpose:
            merged = merged.T
        result = (self.base.to(merged.dtype) + lam * merged).to(self.base.dtype)
        if not torch.isfinite(result).all():
            raise ValueError(
                f"wudi: merged tensor {self.name!r} does not fit in {self.base.dtype}"
                " (overflow to Inf); lower lambda or merge in a wider dtype"
            )
        return result


def wudi_problems(
    name: Optional[str],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    fate: TensorFate,
    ids: Optional[Sequence[Hashable]] = None,
) -> Iterator[TaskVectors]:
    """The WUDI problems of a tensor ``fate`` solves, one per matrix, in order.

    A 2-D weight is one problem; a stack ``[E, ...]`` is E, the e-th made of every
    model's slice e (``name[e]``). Each problem's task vectors are in the
    ``[out, in]`` view, and leave out the models that did not change that matrix.
    Problems are made as they are consumed, so a stack's working copies are held
    one slice at a time.
    """
    if not fate.solved:
        raise ValueError(f"tensor {name!r} gets task arithmetic ({fate.reason.value}), not WUDI")
    transpose = fate.layout == Layout.IN_OUT
    if not fate.stacked:
        return iter([TaskVectors(base, experts, weights, ids, transpose=transpose, name=name)])
    return (
        TaskVectors(
            base[index], [expert[index] for expert in experts], weights, ids,
            transpose=transpose, name=f"{name}[{index}]",
        )
        for index in range(base.shape[0])
    )


def stack_matrices(fate: TensorFate, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor whose matrices (``wudi_problems`` order) are ``matrices``."""
    return torch.stack(list(matrices)) if fate.stacked else matrices[0]


def solve(
    task_vectors: Sequence[torch.Tensor], parameters: Mapping[str, Any], name: Optional[str] = None
) -> torch.Tensor:
    """The merged task vector ``tau_m`` (``[out, in]``) of one problem, by the
    configured solver; ``parameters`` as the kernel receives them."""
    if parameters["solver"] == Solver.SPECTRAL:
        return solvers.wudi_spectral(
            task_vectors,
            flow_time=parameters["flow_time"],
            rank_ratio=parameters["rank_ratio"],
            rank_rule=parameters["rank_rule"],
        )
    if parameters["solver"] == Solver.CLOSED_FORM:
        return solvers.wudi_closed_form(task_vectors, omega=parameters["omega"], name=name)
    return solvers.wudi_adam(
        task_vectors,
        iterations=parameters["iterations"],
        learning_rate=parameters["learning_rate"],
        name=name,
    )
