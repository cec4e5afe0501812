"""The mergekit binding: WUDI's spec, its parameters, and the per-tensor kernel.

Linear-layer weights (see ``tensor_rules``) get the WUDI solve; every other
tensor gets task arithmetic with the same weights and ``lambda``:
``W_base + lambda * tau_m``, ``tau_m`` solved from ``weight_i * (W_i - W_base)``.
"""

import logging
import math
from enum import Enum
from typing import Any, Callable, List, Optional, Sequence, Type

import torch
from pydantic import BeforeValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    TensorEntry,
    TensorGroup,
)
from mergekit_wudi import solvers
from mergekit_wudi.tensor_rules import ApplyWudi, Layout, wudi_layout

LOG = logging.getLogger(__name__)

METHOD_NAME = "wudi"


class Solver(str, Enum):
    ADAM = "adam"  # the paper's method (Algorithm 1)
    CLOSED_FORM = "closed_form"  # WUDI-CFS, Eq. 20


class Precision(str, Enum):
    """How the Adam solver's few accurate products are computed (solvers.products)."""

    AUTO = "auto"  # float64 matmuls where the device runs them fast
    FLOAT64 = "float64"  # float64 matmuls
    FLOAT32 = "float32"  # float32 matmuls on error-free splits, none in float64


FLOAT64_MATMULS = {Precision.AUTO: None, Precision.FLOAT64: True, Precision.FLOAT32: False}


# mergekit validates parameters while planning, before any tensor is read; these
# validators make that error name the parameter and the value at fault.
def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"wudi parameter {name!r} must be a number, got {value!r}")
    try:
        number = float(value)  # YAML reads 1e-5 as the string "1e-5"
    except ValueError:
        raise ValueError(
            f"wudi parameter {name!r} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"wudi parameter {name!r} must be finite, got {value!r}")
    return number


def _finite(name: str) -> Callable[[Any], float]:
    return lambda value: _number(name, value)


def _positive(name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _number(name, value)
        if number <= 0:
            raise ValueError(f"wudi parameter {name!r} must be > 0, got {value!r}")
        return number

    return check


def _count(name: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = _number(name, value)
        if number < 0 or number != int(number):
            raise ValueError(
                f"wudi parameter {name!r} must be a non-negative integer, got {value!r}"
            )
        return int(number)

    return check


def _choice(name: str, choices: Type[Enum]) -> Callable[[Any], Enum]:
    def check(value: Any) -> Enum:
        try:
            return choices(value)
        except ValueError:
            allowed = ", ".join(choice.value for choice in choices)
            raise ValueError(
                f"wudi parameter {name!r} must be one of {allowed}; got {value!r}"
            ) from None

    return check


def _parameter(name: str, check: Callable[[Any], Any], default: Any, scope=ParameterScope.SHARED):
    return ParameterSpec(
        name=name,
        value_type=Annotated[Any, BeforeValidator(check)],
        scope=scope,
        default=default,
    )


PARAMETERS = (
    _parameter("weight", _finite("weight"), 1.0, ParameterScope.NON_BASE),
    _parameter("lambda", _finite("lambda"), 1.0),
    _parameter("iterations", _count("iterations"), solvers.DEFAULT_ITERATIONS),
    _parameter("learning_rate", _positive("learning_rate"), solvers.DEFAULT_LEARNING_RATE),
    _parameter("solver", _choice("solver", Solver), Solver.ADAM),
    _parameter("omega", _positive("omega"), solvers.DEFAULT_OMEGA),
    _parameter("precision", _choice("precision", Precision), Precision.AUTO),
    _parameter("apply_wudi", _choice("apply_wudi", ApplyWudi), ApplyWudi.AUTO),
    _parameter("layout", _choice("layout", Layout), Layout.AUTO),
)


class TaskVectors(Sequence[torch.Tensor]):
    """``weight_i * (W_i - W_base)`` in float32, in the solve's ``[out, in]`` view.

    Each is made when read, so peak memory does not grow with the number of experts.
    """

    def __init__(self, base: torch.Tensor, experts: List[torch.Tensor], weights: List[float], transpose: bool, dtype: torch.dtype, device: torch.device):
        self.base = base.to(device=device, dtype=dtype)
        self.experts = experts
        self.weights = weights
        self.transpose = transpose
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, index: int) -> torch.Tensor:
        expert = self.experts[index].to(device=self.base.device, dtype=self.dtype)
        tau = (expert - self.base).mul_(self.weights[index])
        return tau.T if self.transpose else tau


# Device fit: a solve that would not fit in the memory left on its accelerator
# runs on the CPU instead (with a warning), rather than stopping the merge.
def working_bytes(solver: Solver, shape, experts: int, dtype: torch.dtype) -> int:
    """Peak bytes of one solve of an ``[out, in]`` weight, beyond mergekit's inputs."""
    out_features, in_features = shape
    if solver == Solver.CLOSED_FORM:
        needed = solvers.closed_form_working_bytes(out_features, in_features, experts)
    else:
        needed = solvers.adam_working_bytes(out_features, in_features, experts, dtype)
    # TaskVectors' copy of the base in dtype, and one task vector made on demand.
    return needed + 2 * out_features * in_features * (torch.finfo(dtype).bits // 8)


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes still free for a solve on ``device``; None where there is no limit to check (CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    # Blocks torch's caching allocator holds but no tensor uses are free to it too.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def solve_device(name: str, device: torch.device, needed: int, free: Optional[int]) -> torch.device:
    """``device`` if a solve needing ``needed`` bytes fits in ``free``, else the CPU."""
    if free is None or needed <= free:
        return device
    LOG.warning(
        "wudi: tensor %r needs about %.2f GiB to solve and %s has %.2f GiB free;"
        " solving it on the CPU", name, needed / 2**30, device, free / 2**30,
    )
    return torch.device("cpu")


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
    device = base.device
    if layout is not None:
        shape = base.shape[::-1] if layout == Layout.IN_OUT else base.shape
        needed = working_bytes(parameters["solver"], shape, len(contributing), dtype)
        device = solve_device(group.metadata.name, base.device, needed, free_memory(base.device))
    task_vectors = TaskVectors(
        base, [entry.tensor for entry in contributing], weights,
        transpose=layout == Layout.IN_OUT, dtype=dtype, device=device,
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
            float64_matmuls=FLOAT64_MATMULS[parameters["precision"]],
            name=group.metadata.name,
        )
    merged = merged.to(base.device)
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
