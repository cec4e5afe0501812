"""From one tensor to its WUDI problems and back.

A tensor the rule solves (``tensor_rules.tensor_fate``) is a matrix, or a stack of
matrices (one per MoE expert). Each matrix, across the merged models, is one WUDI
problem: the models' task vectors ``weight_i * (W_i - W_base)`` in the ``[out, in]``
view the solvers take (``wudi_problems``). ``solve`` runs the configured solver
on one problem (where ``placed`` put it); ``TaskVectors.merged_weight`` maps its
answer back to the stored matrix, and ``stack_matrices`` reassembles the tensor.

The kernel (``method``) is a loop over these; a tool that must agree with the
merge (the report) uses the same functions. ``placed`` moves a problem to the
CPU where its solve would not fit on its accelerator.
"""

import logging
from typing import Any, Callable, Hashable, Iterator, Mapping, Optional, Sequence

import torch

from mergekit_wudi import solvers
from mergekit_wudi.parameters import FLOAT64_MATMULS, Solver
from mergekit_wudi.progress import solve_progress
from mergekit_wudi.tensor_rules import Layout, TensorFate

LOG = logging.getLogger(__name__)


class TaskVectors(Sequence[torch.Tensor]):
    """``weight_i * (W_i - W_base)`` of one tensor, or one matrix of a stack.

    Models whose weight is 0 or whose tensor equals the base's contribute
    nothing, exactly as if absent: they are left out (``ids`` lists the models
    kept, ``weights`` their weights). Each task vector is made when read, in
    ``dtype`` (by default float32, float64 for float64 storage) and transposed to
    ``[out, in]`` if ``transpose``, on ``device`` (by default the tensors' own), so
    peak memory does not grow with the number of models, and nothing is held
    between reads.
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
        device: Optional[torch.device] = None,
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
        self.device = torch.device(device) if device is not None else base.device

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, index: int) -> torch.Tensor:
        # The base's working copy too is made per read, not kept: between reads
        # (and once moved to another device) these hold no memory of their own.
        working = {"device": self.device, "dtype": self.dtype}
        tau = (self.experts[index].to(**working) - self.base.to(**working)).mul_(self.weights[index])
        return tau.T if self.transpose else tau

    @property
    def shape(self) -> torch.Size:
        """The ``[out, in]`` shape the solvers see."""
        return self.base.T.shape if self.transpose else self.base.shape

    def converted(
        self, *, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
    ) -> "TaskVectors":
        """The same task vectors, made in ``dtype`` on ``device`` (by default as these are)."""
        return TaskVectors(
            self.base, self.experts, self.weights, self.ids, transpose=self.transpose,
            name=self.name, dtype=dtype or self.dtype, device=device or self.device,
        )

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
        merged = merged.to(self.base.device)
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


def solve(task_vectors: TaskVectors, parameters: Mapping[str, Any], name: Optional[str] = None) -> torch.Tensor:
    """The merged task vector ``tau_m`` (``[out, in]``) of one problem, by the
    configured solver, on the task vectors' device; ``parameters`` as the kernel
    receives them. ``placed`` first chooses that device. A long solve shows its
    progress (``progress``)."""
    solver = parameters["solver"]
    with solve_progress(name) as progress:
        if solver == Solver.SPECTRAL:
            return solvers.wudi_spectral(
                task_vectors,
                flow_time=parameters["flow_time"],
                rank_ratio=parameters["rank_ratio"],
                rank_rule=parameters["rank_rule"],
                progress=progress,
            )
        if solver == Solver.CLOSED_FORM:
            return solvers.wudi_closed_form(
                task_vectors, omega=parameters["omega"], name=name, progress=progress
            )
        return solvers.wudi_adam(
            task_vectors,
            iterations=parameters["iterations"],
            learning_rate=parameters["learning_rate"],
            float64_matmuls=FLOAT64_MATMULS[parameters["precision"]],
            name=name,
            progress=progress,
        )


# Device fit: a problem whose solve (and whatever else is computed from it, such
# as the -v losses) would not fit in the memory left on its accelerator is solved
# on the CPU instead (with a warning), rather than stopping the merge. Everything
# computed from the solve then reads the moved task vectors, on one device.
FALLBACK_DEVICE = torch.device("cpu")


def placed(
    task_vectors: TaskVectors, name: Optional[str], needed: Callable[[TaskVectors], int]
) -> TaskVectors:
    """``task_vectors`` where ``needed(task_vectors)`` bytes fit (``solve_device``):
    themselves, or made on the CPU. ``needed`` is asked only where there is a limit."""
    free = free_memory(task_vectors.device)
    if free is None:
        return task_vectors
    device = solve_device(name, task_vectors.device, needed(task_vectors), free)
    return task_vectors if device == task_vectors.device else task_vectors.converted(device=device)


def solve_bytes(task_vectors: TaskVectors, parameters: Mapping[str, Any]) -> int:
    """Peak bytes of ``solve`` on these task vectors, beyond mergekit's inputs. For
    Adam, in the working dtype its scan will choose (a read of their magnitudes)."""
    solver = parameters["solver"]
    working = solvers.working_dtype(task_vectors) if solver == Solver.ADAM else torch.float32
    return working_bytes(solver, task_vectors.shape, len(task_vectors), working, task_vectors.dtype)


def working_bytes(
    solver: Solver,
    shape: Sequence[int],
    experts: int,
    dtype: torch.dtype = torch.float32,
    vectors_dtype: Optional[torch.dtype] = None,
) -> int:
    """Peak bytes of one solve of an ``[out, in]`` weight, beyond mergekit's inputs:
    the solver's (Adam's in its working ``dtype``; the others are float64
    throughout) and a read of one task vector made in ``vectors_dtype`` (by
    default ``dtype``)."""
    out_features, in_features = shape
    if solver == Solver.CLOSED_FORM:
        needed = solvers.closed_form_working_bytes(out_features, in_features, experts)
    elif solver == Solver.SPECTRAL:
        needed = solvers.spectral_working_bytes(out_features, in_features, experts)
    else:
        needed = solvers.adam_working_bytes(out_features, in_features, experts, dtype)
    return needed + reading_bytes(shape, vectors_dtype or dtype)


def losses_bytes(task_vectors: TaskVectors) -> int:
    """Peak bytes of ``solvers.interference_losses`` on a solve's result (float64
    statistics, the result alive beside them), beyond mergekit's inputs."""
    out_features, in_features = task_vectors.shape
    statistics = solvers.interference_losses_working_bytes(
        out_features, in_features, len(task_vectors)
    )
    return (statistics + 8 * out_features * in_features
            + reading_bytes(task_vectors.shape, task_vectors.dtype))


def reading_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """A read of one ``[out, in]`` task vector made in ``dtype``: the base's and the
    expert's working copies, and the result."""
    out_features, in_features = shape
    return 3 * out_features * in_features * (torch.finfo(dtype).bits // 8)


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes still free for a solve on ``device``; None where there is no limit to check (CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    # Blocks torch's caching allocator holds but no tensor uses are free to it too.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def solve_device(
    name: Optional[str], device: torch.device, needed: int, free: Optional[int]
) -> torch.device:
    """``device`` if a solve needing ``needed`` bytes fits in ``free``, else ``FALLBACK_DEVICE``."""
    if free is None or needed <= free:
        return device
    LOG.warning(
        "wudi: tensor %r needs about %.2f GiB to solve and %s has %.2f GiB free;"
        " solving it on the CPU", name, needed / 2**30, device, free / 2**30,
    )
    return FALLBACK_DEVICE
