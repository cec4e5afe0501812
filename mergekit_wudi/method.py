"""The mergekit binding: WUDI's spec, its parameters, and the per-tensor kernel.

Linear-layer weights (see ``tensor_rules``) get the WUDI solve; every other
tensor gets task arithmetic with the same weights and ``lambda``:
``W_base + lambda * tau_m``, ``tau_m`` solved from ``weight_i * (W_i - W_base)``.
"""

from typing import Any, List, Sequence

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    TensorEntry,
    TensorGroup,
)
from mergekit_wudi import solvers
from mergekit_wudi.parameters import PARAMETERS, Solver
from mergekit_wudi.tensor_rules import Layout, wudi_layout

METHOD_NAME = "wudi"


class TaskVectors(Sequence[torch.Tensor]):
    """``weight_i * (W_i - W_base)`` in float32, in the solve's ``[out, in]`` view.

    Each is made when read, so peak memory does not grow with the number of experts.
    """

    def __init__(self, base: torch.Tensor, experts: List[torch.Tensor], weights: List[float], transpose: bool, dtype: torch.dtype):
        self.base = base.to(dtype)
        self.experts = experts
        self.weights = weights
        self.transpose = transpose
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, index: int) -> torch.Tensor:
        tau = (self.experts[index].to(self.dtype) - self.base).mul_(self.weights[index])
        return tau.T if self.transpose else tau


def check_finite(group: TensorGroup) -> None:
    for entry in group.entries:
        if entry.tensor.is_floating_point() and not torch.isfinite(entry.tensor).all():
            role = "base model" if entry.is_base else "model"
            raise ValueError(
                f"wudi: tensor {group.metadata.name!r} of {role} {entry.id}"
                " contains NaN or Inf; refusing to merge it"
            )


def wudi_kernel(group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
    check_finite(group)
    base = group.base.tensor
    lam = parameters["lambda"]
    # Experts that leave this tensor untouched (or weigh 0) contribute nothing.
    contributing: List[TensorEntry] = [
        entry
        for entry in group.non_base
        if parameters["weight"][entry.id] != 0 and not torch.equal(entry.tensor, base)
    ]
    if not contributing:
        return base
    weights = [parameters["weight"][entry.id] for entry in contributing]
    if len(contributing) == 1 and lam * weights[0] == 1:
        # The solve's exact answer is that expert; return it bit for bit.
        return contributing[0].tensor

    layout = wudi_layout(
        group.metadata.name,
        base.shape,
        group.metadata.vocabulary_axis,
        parameters["apply_wudi"],
        parameters["layout"],
    )
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    task_vectors = TaskVectors(
        base, [entry.tensor for entry in contributing], weights,
        transpose=layout == Layout.IN_OUT, dtype=dtype,
    )
    if layout is None:
        merged = sum(task_vectors)
    elif parameters["solver"] == Solver.CLOSED_FORM:
        merged = solvers.wudi_closed_form(
            task_vectors, omega=parameters["omega"], name=group.metadata.name
        )
    else:
        merged = solvers.wudi_adam(
            task_vectors,
            iterations=parameters["iterations"],
            learning_rate=parameters["learning_rate"],
            name=group.metadata.name,
        )
    if layout == Layout.IN_OUT:
        merged = merged.T
    result = (base.to(merged.dtype) + lam * merged).to(base.dtype)
    if not torch.isfinite(result).all():
        raise ValueError(
            f"wudi: merged tensor {group.metadata.name!r} does not fit in {base.dtype}"
            " (overflow to Inf); lower lambda or merge in a wider dtype"
        )
    return result


wudi_merge = FunctionalGroupMergeMethod(
    MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="WUDI-Merging",
        reference_url="https://arxiv.org/abs/2503.08099",
        parameters=PARAMETERS,
        # A merge with no expert is a configuration mistake, not a copy of the
        # base; an optional weight only the base has is still passed through.
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
    ),
    wudi_kernel,
)
