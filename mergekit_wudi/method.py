"""The mergekit binding: WUDI's spec and the per-tensor kernel.

Linear-layer weights and MoE expert stacks (see ``tensor_rules``) get the WUDI
solve, matrix by matrix (``problems``); every other tensor gets task arithmetic
with the same weights and ``lambda``: ``W_base + lambda * tau_m``, ``tau_m``
solved from (or, for task arithmetic, the sum of) ``weight_i * (W_i - W_base)``.
"""

import time
from typing import Any, List

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    TensorGroup,
)
from mergekit_wudi import account, solvers
from mergekit_wudi.parameters import PARAMETERS
from mergekit_wudi.problems import (
    TaskVectors,
    losses_bytes,
    placed,
    solve,
    solve_bytes,
    stack_matrices,
    wudi_problems,
)
from mergekit_wudi.tensor_rules import TensorFate, tensor_fate

METHOD_NAME = "wudi"


def check_finite(group: TensorGroup, fate: TensorFate) -> None:
    """NaN or Inf in any input is an error naming the tensor, the model, and for a
    stack the first expert slice that holds it."""
    for entry in group.entries:
        tensor = entry.tensor
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            role = "base model" if entry.is_base else "model"
            where = ""
            if fate.stacked:
                finite = torch.isfinite(tensor).flatten(1).all(dim=1)
                where = f" in expert slice {int((~finite).nonzero()[0])}"
            raise ValueError(
                f"wudi: tensor {group.metadata.name!r} of {role} {entry.id}"
                f" contains NaN or Inf{where}; refusing to merge it"
            )


def wudi_kernel(group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
    started = time.perf_counter()
    name = group.metadata.name
    base = group.base.tensor
    fate = tensor_fate(
        name, base.shape, group.metadata.vocabulary_axis,
        parameters["apply_wudi"], parameters["layout"],
    )
    check_finite(group, fate)
    lam = parameters["lambda"]
    experts = [entry.tensor for entry in group.non_base]
    weights = [parameters["weight"][entry.id] for entry in group.non_base]
    ids = [entry.id for entry in group.non_base]
    accounting = account.accounting()
    losses = [0.0, 0.0] if accounting and fate.solved else None
    changed = set()

    if fate.solved:
        matrices: List[torch.Tensor] = []
        for problem in wudi_problems(name, base, experts, weights, fate, ids):
            changed.update(problem.ids)
            exact = problem.exact_result(lam)
            if exact is not None:
                # Nothing to solve: Eq. 21 is 0 at the sum and at the result.
                matrices.append(exact)
                continue
            # The losses too are computed where the solve ran, from the same task vectors.
            problem = placed(problem, problem.name, lambda vectors: max(
                solve_bytes(vectors, parameters), losses_bytes(vectors) if accounting else 0
            ))
            merged = solve(problem, parameters, problem.name)
            if accounting:
                for index, loss in enumerate(solvers.interference_losses(problem, merged)):
                    losses[index] += loss
            matrices.append(problem.merged_weight(merged, lam))
        result = stack_matrices(fate, matrices)
    else:
        everything = TaskVectors(base, experts, weights, ids, name=name)
        changed.update(everything.ids)
        result = everything.exact_result(lam)
        if result is None:
            result = everything.merged_weight(sum(everything), lam)

    account.warn_fallback(name, base.shape, fate, [entry.id for entry in group.entries])
    if accounting:
        account.log_tensor(
            name, base.shape, fate, parameters["solver"].value, len(changed), len(experts),
            losses, time.perf_counter() - started,
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
