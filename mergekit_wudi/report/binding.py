"""The report's mergekit binding: a recipe's tensors, as the merge would see them.

The recipe is read as ``mergekit-yaml`` reads it (``MergeConfiguration``), planned
by mergekit's own ``MergePlanner`` (so per-tensor filters and layer gradients
resolve as in the merge) and run through mergekit's ``Executor``, which loads the
inputs of one tensor at a time, lazily, through ``LoaderCache`` (local paths, Hub
names, ``base+adapter`` LoRA references merged into ``--lora-merge-cache``).

Each planned tensor's task is mergekit's own ``ExecuteMergeMethodTask`` with the
method swapped for a probe that carries WUDI's spec: mergekit's adapter code runs
unchanged (optional-tensor policy, buffer copies, shape checks, parameter binding,
dtype alignment) and, where it would call the WUDI kernel, hands the group and its
bound parameters to the report instead.

What WUDI does with a group (which experts contribute, which tensors are solved
and in which view, the solver) is the kernel's own rule, called, in
``tensor_plan``: the one place that talks to the kernel's rules (``tensor_rules``,
``problems``).
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml

import mergekit_wudi  # noqa: F401  registers merge_method: wudi
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.merge import _model_out_config
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import FunctionalGroupMergeMethod, TensorGroup
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit_wudi.method import METHOD_NAME, check_finite, wudi_merge
from mergekit_wudi.problems import (
    TaskVectors,
    placed,
    reading_bytes,
    solve,
    solve_bytes,
    wudi_problems,
)
from mergekit_wudi.report.figures import (
    Summary,
    figures_working_bytes,
    interference_figures,
    summarise,
)
from mergekit_wudi.tensor_rules import tensor_fate

PROBE_NAME = "wudi (interference report)"


# ---------------------------------------------------------------- the kernel's rules


@dataclass
class WudiProblem:
    """One 2-D problem: the task vectors the solver reads. They are made when read,
    so a plan of every slice of a stack holds no working copy of any."""

    task_vectors: TaskVectors  # the kernel's working dtype: what the solver reads
    positions: List[int]  # each task vector's expert, as an index into the recipe's experts


@dataclass
class TensorPlan:
    fate: str  # "wudi", "task_arithmetic" or "unchanged"
    reason: str
    view: Optional[str]  # the stored layout solved ("out_in", "in_out")
    problems: List[WudiProblem]


def tensor_plan(group: TensorGroup, parameters: Mapping[str, Any], experts: Sequence[Any]) -> TensorPlan:
    """What the WUDI kernel does with ``group``, and the problems it solves."""
    name, base = group.metadata.name, group.base.tensor
    fate = tensor_fate(name, base.shape, group.metadata.vocabulary_axis,
                       parameters["apply_wudi"], parameters["layout"])
    check_finite(group, fate)
    ids = [entry.id for entry in group.non_base]
    tensors = [entry.tensor for entry in group.non_base]
    weights = [parameters["weight"][model] for model in ids]
    if not TaskVectors(base, tensors, weights, ids).ids:
        return TensorPlan("unchanged", "no expert changed it (or every weight is 0)", None, [])
    if not fate.solved:
        return TensorPlan("task_arithmetic", fate.describe(), None, [])
    problems = [
        WudiProblem(
            problem,
            [list(experts).index(model) for model in problem.ids],
        )
        # An expert slice no model changed adds nothing to any figure.
        for problem in wudi_problems(name, base, tensors, weights, fate, ids) if problem.ids
    ]
    reason = f"solved by WUDI: {fate.describe()}"
    return TensorPlan("wudi", reason, fate.layout.value, problems)


# ---------------------------------------------------------------- per-tensor records


@dataclass
class TensorReport:
    name: str
    shape: List[int]
    dtype: str
    fate: str
    reason: str
    view: Optional[str] = None
    parameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
    summary: Optional[Summary] = None


def _plain(value: Any) -> Any:
    """A bound parameter as JSON: enums by value, per-expert values by expert."""
    if hasattr(value, "value") and not isinstance(value, (int, float)):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def tensor_report(group: TensorGroup, parameters: Mapping[str, Any], experts: Sequence[Any],
                  run_solver: bool) -> TensorReport:
    """Every figure of one tensor; ``run_solver`` runs the configured solver too."""
    base = group.base.tensor
    plan = tensor_plan(group, parameters, experts)
    report = TensorReport(
        name=group.metadata.name, shape=list(base.shape), dtype=str(base.dtype).replace("torch.", ""),
        fate=plan.fate, reason=plan.reason, view=plan.view,
        parameters={key: _plain(value) for key, value in parameters.items()},
    )
    if plan.problems:
        figures = None
        for problem in plan.problems:
            # Solve and figures on one device: where both fit, as in the merge.
            task_vectors = placed(problem.task_vectors, problem.task_vectors.name, lambda vectors: max(
                solve_bytes(vectors, parameters) if run_solver else 0, figures_bytes(vectors)
            ))
            solution = solve(task_vectors, parameters, task_vectors.name) if run_solver else None
            # Read in float64: the figures are exact for the stored values.
            exact = task_vectors.converted(dtype=torch.float64)
            found = interference_figures(exact, solution, parameters["lambda"]).placed(
                problem.positions, len(experts))
            figures = found if figures is None else figures + found
        report.summary = summarise(figures)
    return report


def figures_bytes(task_vectors: TaskVectors) -> int:
    """Peak bytes of ``interference_figures`` (float64, beside a solve's result)."""
    out_features, in_features = task_vectors.shape
    return (figures_working_bytes(out_features, in_features, len(task_vectors))
            + 8 * out_features * in_features + reading_bytes(task_vectors.shape, torch.float64))


# ---------------------------------------------------------------- running mergekit's plan

# Set by the probe while mergekit's adapter executes one tensor's task.
_captured: List[Tuple[TensorGroup, Dict[str, Any]]] = []


def _capture(group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
    _captured.append((group, parameters))
    return group.base.tensor  # the shape mergekit's adapter checks for


def _probe_method() -> FunctionalGroupMergeMethod:
    registered = {method.spec.name: method for method in registry.registered_methods()}
    if PROBE_NAME not in registered:
        registry.register(FunctionalGroupMergeMethod(
            dataclasses.replace(wudi_merge.spec, name=PROBE_NAME), _capture))
    return registry.get(PROBE_NAME)


class TensorReportTask(Task[TensorReport]):
    """One planned tensor: mergekit's merge task, its kernel replaced by the report."""

    merge: ExecuteMergeMethodTask
    experts: Tuple[ModelReference, ...]
    run_solver: bool

    def arguments(self) -> Dict[str, Task]:
        return self.merge.arguments()

    def group_label(self) -> Optional[str]:
        return self.merge.group_label()

    def uses_accelerator(self) -> bool:
        return True

    def execute(self, tensors: Dict[ModelReference, torch.Tensor], **_kwargs) -> TensorReport:
        _captured.clear()
        self.merge.execute(tensors=tensors)
        if not _captured:
            reference = next(iter(tensors.values()))
            return TensorReport(
                name=self.merge.output_weight.name, shape=list(reference.shape),
                dtype=str(reference.dtype).replace("torch.", ""), fate="unchanged",
                reason="passed through by mergekit (a non-floating buffer, or an optional"
                       " tensor only the base has)",
            )
        group, parameters = _captured.pop()
        return tensor_report(group, parameters, self.experts, self.run_solver)


def read_recipe(path: Path, tool: str = "the interference report") -> Tuple[MergeConfiguration, str]:
    """The recipe as ``mergekit-yaml`` reads it, and its text; it must be a WUDI merge
    (``tool`` names the command in the error)."""
    source = Path(path).read_text(encoding="utf-8")
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    if config.merge_method != METHOD_NAME:
        raise ValueError(
            f"{path}: merge_method is {config.merge_method!r}; {tool} reads"
            f" recipes with merge_method: {METHOD_NAME}"
        )
    return config, source


def expert_models(config: MergeConfiguration) -> List[ModelReference]:
    """The recipe's experts (every referenced model but the base), in recipe order.

    ``MergeConfiguration.referenced_models`` returns a set's order, which changes
    from one process to the next; the report's tables and plots keep the recipe's.
    """
    listed: List[ModelReference] = [model.model for model in config.models or ()]
    for output_slice in config.slices or ():
        listed += [source.model for source in output_slice.sources]
    for module in (config.modules or {}).values():
        listed += [model.model for model in module.models or ()]
        for output_slice in module.slices or ():
            listed += [source.model for source in output_slice.sources]
    return [model for model in dict.fromkeys(listed) if model != config.base_model]


def plan_report(
    config: MergeConfiguration, options: MergeOptions, run_solver: bool
) -> List[TensorReportTask]:
    """One task per tensor the merge would write, in mergekit's plan order.

    Like ``mergekit-yaml``, this first loads every referenced model's index,
    applying LoRA adapters into ``options.lora_merge_cache``.
    """
    config = config.model_copy(deep=True)  # the planner rewrites it
    arch_info = get_architecture_info(config, options)
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    for model in config.referenced_models():
        loader_cache.get(model)
    experts = tuple(expert_models(config))
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    # plan_in_memory fails in mergekit 0.1.5 (pydantic rejects its abstract
    # Task annotation); the plan for disk holds the same per-tensor tasks, and
    # nothing is written while only those run.
    planned = MergePlanner(config, arch_info, options=options, out_model_config=out_config
                           ).plan_to_disk(out_path="unused: the report writes no model")
    probe = _probe_method().spec.name
    return [
        TensorReportTask(
            merge=task.tensor_task.model_copy(update={"method_name": probe}),
            experts=experts, run_solver=run_solver,
        )
        for task in planned if isinstance(task, SaveTensor)
    ]


def run_report(
    tasks: Sequence[TensorReportTask], options: MergeOptions, progress=None
) -> Iterator[TensorReport]:
    """Each tensor's report, one tensor's inputs in memory at a time (mergekit's scheduler).

    ``progress`` wraps the iterator of finished tensors (e.g. ``tqdm``, with ``total``).
    """
    executor = Executor(targets=list(tasks), math_device=options.device, storage_device="cpu")
    results = (report for _task, report in executor.run(quiet=True))
    yield from (progress(results, total=len(tasks)) if progress else results)
