"""mergekit-wudi-estimate's prediction against the measured mergekit-yaml time (issue 20).

    python benchmarks/estimate_accuracy.py | tee benchmarks/results/estimate_accuracy.txt
    python benchmarks/estimate_accuracy.py --iterations 30   # Adam in minutes instead of ~10 min

One Llama layer 2048 wide (intermediate 7168, vocabulary 1024), base and 3
experts (``llm_scale.wide_layer_family``), float32; for each solver the recipe is
estimated (``mergekit_wudi.estimate.predict``: planner, headers, calibration) and
then merged by ``mergekit-yaml`` in a subprocess, timed from start to exit.
Printed: predicted and measured seconds and their ratio (target: within 2x).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from benchmarks.llm_scale import wide_layer_family  # noqa: E402
from benchmarks.solver_speed import print_total  # noqa: E402
from mergekit_wudi.estimate import predict  # noqa: E402
from mergekit_wudi.parameters import Solver  # noqa: E402


def write_recipe(path: Path, paths, solver: str, iterations: int) -> Path:
    base, *experts = paths
    path.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(expert)} for expert in experts],
        "parameters": {"solver": solver, "iterations": iterations},
    }))
    return path


def measured_seconds(recipe: Path, out: Path) -> float:
    """Wall time of ``mergekit-yaml recipe out`` as a user runs it."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(recipe), str(out)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def compare(paths, solver: str, iterations: int, directory: Path):
    """(predicted s, measured s) of one solver's merge."""
    recipe = write_recipe(directory / f"{solver}.yml", paths, solver, iterations)
    predicted = predict(recipe, MergeOptions()).solvers[Solver(solver)].seconds
    return predicted, measured_seconds(recipe, directory / f"out-{solver}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="Adam's steps (default 300)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--solvers", nargs="+", default=[solver.value for solver in Solver],
                        choices=[solver.value for solver in Solver])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = wide_layer_family(args.hidden, args.intermediate, 3)
    print(f"# mergekit-wudi-estimate against mergekit-yaml: one Llama layer, hidden {args.hidden},"
          f" intermediate {args.intermediate}, 3 experts, float32, Adam {args.iterations} steps\n")
    print(f"CPU, {torch.get_num_threads()} threads on {os.cpu_count()} cores; torch"
          f" {torch.__version__}; load average at start {os.getloadavg()[0]:.2f}\n", flush=True)
    print("| solver | predicted s | measured s | predicted / measured |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        for solver in args.solvers:
            predicted, measured = compare(paths, solver, args.iterations, Path(directory))
            print(f"| {solver} | {predicted:.1f} | {measured:.1f} | {predicted / measured:.2f} |",
                  flush=True)
    print_total(started)


if __name__ == "__main__":
    main()
