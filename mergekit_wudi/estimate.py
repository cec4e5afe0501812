"""``mergekit-wudi-estimate RECIPE``: how long a WUDI merge will take, before running it.

The recipe is read as ``mergekit-yaml`` reads it and planned by mergekit's own
``MergePlanner`` (per-tensor filters and layer gradients resolve as in the merge);
of the checkpoints only the safetensors headers are read (shapes and dtypes, no
tensor data). The device's float32 and float64 matmul rates, its memory bandwidth
and its reading and writing rate are measured in a few seconds. Each tensor WUDI
would solve (the kernel's rule, ``tensor_rules.tensor_fate``) costs its solver's
FLOPs (``solvers.costs.solve_flops``) at those rates, and its elementwise passes
(``solvers.costs.streamed_bytes``) at that bandwidth; every tensor costs what task
arithmetic costs (read the inputs, write the output), and the merge costs
mergekit's start. Printed per solver: the whole merge, its slowest tensor, and
the largest solve's working memory (``problems.working_bytes``, beyond mergekit's
inputs), alone and with that tensor's inputs as stored.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit.architecture import get_architecture_info
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit_wudi import solvers
from mergekit_wudi.parameters import FLOAT64_MATMULS, PARAMETERS, Solver
from mergekit_wudi.problems import working_bytes
from mergekit_wudi.report.binding import read_recipe
from mergekit_wudi.solvers.costs import (
    ideal_seconds,
    matmul_rates,
    memory_rate,
    solve_flops,
    streamed_bytes,
)
from mergekit_wudi.tensor_rules import Layout, tensor_fate

CALIBRATION_SIZE = 2048  # [n, n] matmuls: a fraction of a second each on a CPU
IO_CALIBRATION_BYTES = 64 * 2**20
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class PlannedTensor:
    """One tensor the merge writes: its name, shape, input bytes and WUDI problems."""

    name: str
    shape: Sequence[int]
    read_bytes: int  # every input model's tensor, as stored
    written_bytes: int
    problems: List[Sequence[int]]  # [out, in] of each matrix WUDI solves; [] for task arithmetic
    experts: int
    parameters: Dict[str, object]


def header(path: Path, name: str):
    """(shape, stored bytes) of tensor ``name`` in a safetensors file, from its header only."""
    with safe_open(str(path), framework="pt") as handle:
        view = handle.get_slice(name)
        shape = view.get_shape()
        entry = DTYPE_BYTES.get(view.get_dtype(), 4)
    return shape, entry * int(torch.Size(shape).numel())


def tensor_header(loader, names: Sequence[str]):
    """The header of the first of ``names`` (a tensor's name and aliases) in a model."""
    index = loader.index
    if not index.is_safetensors:
        raise ValueError(f"{index.base_path}: the estimate reads safetensors headers only")
    for name in names:
        if name in index.tensor_paths:
            return header(Path(index.base_path) / index.tensor_paths[name], name)
    return None


def resolved(parameters) -> Dict[str, object]:
    """A tensor's WUDI parameters as the kernel receives them."""
    values = dict(parameters.items())
    return {spec.name: spec.validate(values.get(spec.name, spec.default))
            for spec in PARAMETERS if spec.name != "weight"}


def plan(config, options: MergeOptions) -> Tuple[List[PlannedTensor], List[str]]:
    """Every tensor of the planned merge, and the names whose shapes no header gave."""
    config = config.model_copy(deep=True)  # the planner rewrites it
    arch_info = get_architecture_info(config, options)
    loader_cache = LoaderCache()
    loader_cache.setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planned = MergePlanner(config, arch_info, options=options, out_model_config=out_config
                           ).plan_to_disk(out_path="unused: the estimate writes nothing")
    tensors, unknown = [], []
    for task in planned:
        if not isinstance(task, SaveTensor):
            continue
        merge = task.tensor_task
        weight = merge.output_weight
        found = {}
        for model, info in merge.gather_tensors.weight_info.items():
            names = [info.name, *(info.aliases or ()), *(info.tied_names or ())]
            entry = tensor_header(loader_cache.get(model), names)
            if entry is not None:
                found[model] = entry
        base = found.get(merge.base_model)
        if base is None:
            unknown.append(weight.name)
            continue
        shape, stored = base
        parameters = resolved(merge.parameters)
        experts = len(found) - 1
        fate = tensor_fate(weight.name, torch.Size(shape), weight.vocabulary_axis,
                           parameters["apply_wudi"], parameters["layout"])
        problems = []
        if fate.solved and experts >= 1:
            matrix = shape[1:] if fate.stacked else shape
            view = tuple(reversed(matrix)) if fate.layout == Layout.IN_OUT else tuple(matrix)
            problems = [view] * (shape[0] if fate.stacked else 1)
        tensors.append(PlannedTensor(
            weight.name, shape, sum(size for _, size in found.values()), stored, problems,
            experts, parameters,
        ))
    return tensors, unknown


def io_rate(directory: Path) -> float:
    """Bytes per second of reading, adding and writing safetensors files here."""
    tensor = torch.zeros(IO_CALIBRATION_BYTES // 4)
    path = directory / "calibration.safetensors"
    save_file({"tensor": tensor}, str(path))
    start = time.perf_counter()
    loaded = load_file(str(path))["tensor"]
    loaded += loaded
    save_file({"tensor": loaded}, str(path))
    elapsed = time.perf_counter() - start
    path.unlink()
    return 2 * IO_CALIBRATION_BYTES / elapsed


def start_seconds() -> float:
    """mergekit's start: a fresh interpreter importing what ``mergekit-yaml`` imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mergekit.scripts.run_yaml, mergekit_wudi"],
                   check=True)
    return time.perf_counter() - start


@dataclass
class Estimate:
    solver: Solver
    seconds: float  # the whole merge
    slowest: Optional[str]
    slowest_seconds: float
    peak_bytes: int  # the largest solve's working memory
    peak_with_inputs: int  # the same, plus that tensor's inputs as stored


def estimate(tensors: Sequence[PlannedTensor], solver: Solver, rates, bandwidth: float,
             float64_fast: bool, arithmetic_seconds: float) -> Estimate:
    """The merge's time with every WUDI tensor solved by ``solver``."""
    total, slowest, slowest_seconds, peak, with_inputs = arithmetic_seconds, None, 0.0, 0, 0
    for tensor in tensors:
        seconds = 0.0
        for shape in tensor.problems:
            precision = FLOAT64_MATMULS[tensor.parameters["precision"]]
            flops = solve_flops(solver.value, shape, tensor.experts, tensor.parameters["iterations"],
                                float64_fast if precision is None else precision)
            seconds += ideal_seconds(flops, rates) + streamed_bytes(
                solver.value, shape, tensor.experts, tensor.parameters["iterations"]) / bandwidth
            needed = working_bytes(solver, shape, tensor.experts, torch.float32)
            peak = max(peak, needed)
            with_inputs = max(with_inputs, needed + tensor.read_bytes)
        total += seconds
        if seconds > slowest_seconds:
            slowest, slowest_seconds = tensor.name, seconds
    return Estimate(solver, total, slowest, slowest_seconds, peak, with_inputs)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Prediction:
    tensors: List[PlannedTensor]
    unknown: List[str]
    rates: Dict[torch.dtype, float]
    bandwidth: float
    io_rate: float
    start_seconds: float
    moved_bytes: int
    arithmetic_seconds: float
    solvers: Dict[Solver, Estimate]


def predict(recipe: Path, options: MergeOptions) -> Prediction:
    """Plan ``recipe``, calibrate ``options.device``, and estimate every solver."""
    config, _ = read_recipe(recipe, tool="mergekit-wudi-estimate")
    device = torch.device(options.device)
    tensors, unknown = plan(config, options)
    rates = matmul_rates(device, CALIBRATION_SIZE)
    bandwidth = memory_rate(device)
    with tempfile.TemporaryDirectory() as directory:
        rate = io_rate(Path(directory))
    started = start_seconds()
    moved = sum(tensor.read_bytes + tensor.written_bytes for tensor in tensors)
    arithmetic = started + moved / rate
    float64_fast = solvers.float64_matmuls_are_fast(device)
    return Prediction(
        tensors, unknown, rates, bandwidth, rate, started, moved, arithmetic,
        {solver: estimate(tensors, solver, rates, bandwidth, float64_fast, arithmetic)
         for solver in Solver},
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="mergekit-wudi-estimate",
        description="Predict a WUDI merge's time and memory from its recipe, without merging.")
    parser.add_argument("recipe", type=Path, help="the recipe you would pass to mergekit-yaml")
    parser.add_argument("--device", default="cpu",
                        help="where the merge would compute (mergekit-yaml's --device; default cpu)")
    parser.add_argument("--transformers-cache", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    options = MergeOptions(device=args.device, transformers_cache=args.transformers_cache,
                           trust_remote_code=args.trust_remote_code)
    result = predict(args.recipe, options)
    solved = [tensor for tensor in result.tensors if tensor.problems]
    print(f"{args.recipe}: {len(result.tensors)} tensors, {len(solved)} solved by WUDI"
          f" ({sum(len(t.problems) for t in solved)} matrices), the rest task arithmetic;"
          f" {result.moved_bytes / 2**30:.2f} GiB read and written")
    print(f"{args.device}: float32 matmul {result.rates[torch.float32] / 1e9:.0f} GFLOP/s,"
          f" float64 {result.rates[torch.float64] / 1e9:.0f} GFLOP/s, memory"
          f" {result.bandwidth / 2**30:.1f} GiB/s, files"
          f" {result.io_rate / 2**20:.0f} MiB/s, mergekit's start {result.start_seconds:.1f} s"
          " (measured now)")
    if result.unknown:
        print(f"not estimated (no tensor of that name in the base's safetensors headers):"
              f" {len(result.unknown)}, e.g. {result.unknown[0]}")
    print(f"\ntask arithmetic (start, reading and writing): {duration(result.arithmetic_seconds)}\n")
    print("| solver | whole merge | slowest tensor | its solve | largest solve's working memory"
          " | with that tensor's inputs |")
    print("|---|---|---|---|---|---|")
    recipe_solvers = {tensor.parameters["solver"] for tensor in solved}
    for solver, guess in result.solvers.items():
        marker = " (the recipe's)" if solver in recipe_solvers else ""
        print(f"| {solver.value}{marker} | {duration(guess.seconds)} | {guess.slowest or '-'}"
              f" | {duration(guess.slowest_seconds)} | {guess.peak_bytes / 2**30:.2f} GiB"
              f" | {guess.peak_with_inputs / 2**30:.2f} GiB |")
    print("\nSolves: their FLOPs at the measured matmul rates and their elementwise passes at"
          " the measured bandwidth (solvers.costs); per-tensor parameters (iterations,"
          " precision) as the recipe resolves them. The machine is assumed as busy as now.")


if __name__ == "__main__":
    main()
