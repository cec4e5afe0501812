"""What a WUDI merge of an 8B or 70B Llama costs, measured per weight at real shapes (issue 14).

    python benchmarks/llm_scale.py | tee benchmarks/results/llm_scale.txt   # CPU: ~20 min, 2 idle cores
    python benchmarks/llm_scale.py --quick         # every code path at 1/8 size: ~2 min
    python benchmarks/llm_scale.py --device cuda   # GPU: full 300-step solves

For every distinct linear-weight shape of Llama-3-8B and Llama-3-70B, with N = 3
structured task vectors (``tests.oracle.structured_task_vectors``), each solver
(``adam``: 300 steps; ``closed_form``; ``spectral`` at its defaults, t = 300, no
cut) is timed on one solve of that weight, its matrix-product FLOPs counted by
dtype (``tests.measure.MatmulFlops``; an eigendecomposition counts LAPACK's
9 n^3) and its
peak extra memory measured (``tests.measure.LiveTensorBytes``: bytes of tensor
storage made during the solve and alive at once, whatever the allocator does;
``torch.cuda.max_memory_allocated`` on CUDA). The working-memory multiple is
that peak over one float32 ``[out, in]`` tensor.

Adam on CPU: one solve of 300 steps at 8B's shapes would take hours, so its
parts are timed apart and summed: the setup (``solvers.gram_and_residual``),
one fold (``solvers.adam_descent`` with 0 steps: the final fold alone), and a
few ordinary steps (``solvers.adam_descent`` with 1 + k steps less with 1:
k at least 2, and at least 2 s of them), for
``setup + 300 steps + 6 folds`` (one every ``RESIDUAL_REFRESH_STEPS``, one at the
end). The FLOPs are counted in the same runs and summed alike, and the peak
memory is that of the setup or of a last 1-step loop on the setup's own state,
whichever is higher. Rows marked
"projected" were not run at all: their FLOPs come from ``solve_flops`` (checked
against the counted FLOPs of every run here, and of both precisions at 1/8
size), their time from those FLOPs at this run's plain matmul rates (float32,
float64) times the measured/ideal ratio of the 8B weight of the same role, and
their memory from the solvers' estimates (``adam_working_bytes``,
``closed_form_working_bytes``, ``spectral_working_bytes``, checked against the
measurements). On CPU every
70B row is projected (a 70B ``down_proj`` solve would need about 18 GB here and
hours); on CUDA a row is run when its estimate fits in the free memory.

Task arithmetic, the yardstick: the same tensors read from safetensors files on
disk (bfloat16, as Llama checkpoints are), summed in float32 as mergekit does
(``base + sum_i (expert_i - base)``), written back in bfloat16. A WUDI merge
does the same reading and writing, so its whole-model time is task
arithmetic's plus the solves. Only the linear weights are counted; embeddings,
``lm_head`` and norms cost both methods the same.

Memory through mergekit: one Llama layer 2048 wide (intermediate 7168), N = 2
and 6 experts, ``iterations: 2``, merged by ``mergekit-yaml`` in a subprocess
whose peak resident set is read back (``RUSAGE_CHILDREN`` of a wrapper process
per merge), against ``merge_method: task_arithmetic``. mergekit holds the N + 1
inputs; WUDI's working memory on top of them must not grow with N.

Results: ``benchmarks/results/llm_scale.txt`` (the full run's output; progress goes to stderr).
"""

import argparse
import functools
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.solver_speed import (  # noqa: E402
    prepare_descent,
    print_table,
    print_total,
    synchronize,
)
from mergekit_wudi import solvers  # noqa: E402
from mergekit_wudi.solvers.costs import (  # noqa: E402
    folds,
    ideal_seconds,
    matmul_rates,
    solve_flops,
)
from tests.measure import LiveTensorBytes, MatmulFlops  # noqa: E402
from tests.oracle import structured_task_vectors  # noqa: E402

EXPERTS = 3
ITERATIONS = solvers.DEFAULT_ITERATIONS
CPU_STEPS = 2  # ordinary steps timed per weight on CPU, at least
MIB, GIB = 2**20, 2**30

# (role, [out, in], weights of that shape per layer)
MODELS = {
    "Llama-3-8B": (32, [
        ("q_proj, o_proj", (4096, 4096), 2),
        ("k_proj, v_proj", (1024, 4096), 2),
        ("gate_proj, up_proj", (14336, 4096), 2),
        ("down_proj", (4096, 14336), 1),
    ]),
    "Llama-3-70B": (80, [
        ("q_proj, o_proj", (8192, 8192), 2),
        ("k_proj, v_proj", (1024, 8192), 2),
        ("gate_proj, up_proj", (28672, 8192), 2),
        ("down_proj", (8192, 28672), 1),
    ]),
}
QUICK_SCALE = 8  # --quick divides every dimension by this
SOLVERS = ("adam", "closed_form", "spectral")
SLOW_FLOAT64 = 64  # float32 / float64 matmul rate of consumer and inference GPUs


class Measured:
    """Time, matmul FLOPs by dtype and peak extra bytes of one call."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        with MatmulFlops() as flops, LiveTensorBytes() as memory:
            start = time.perf_counter()
            result = fn()
            synchronize(self.device)
            elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(self.device) - before
                if self.device.type == "cuda" else memory.peak)
        return elapsed, dict(flops.flops), peak, result


def add_flops(*terms):
    total = {}
    for scale, flops in terms:
        for dtype, count in flops.items():
            total[dtype] = total.get(dtype, 0) + scale * count
    return total


def storage_bytes(*objects) -> int:
    """Bytes of the distinct tensor storages reachable from ``objects`` (one level of attributes)."""
    seen, total = set(), 0
    tensors = []
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        else:
            tensors.extend(v for v in vars(obj).values() if isinstance(v, torch.Tensor))
            tensors.extend(t for v in vars(obj).values() if hasattr(v, "__dict__")
                           for t in vars(v).values() if isinstance(t, torch.Tensor))
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def same_flops(counted, model) -> bool:
    keys = {k for k, v in {**counted, **model}.items() if v}
    return all(abs(counted.get(k, 0) - model.get(k, 0)) <= 1e-9 * model.get(k, 1) for k in keys)


def adam_parts(task_vectors, device, float64_matmuls, steps):
    """Setup, fold and step measured apart (CPU); the whole solve (steps=None, CUDA)."""
    measure = Measured(device)
    if steps is None:
        elapsed, flops, peak, _ = measure(lambda: solvers.wudi_adam(
            task_vectors, iterations=ITERATIONS, float64_matmuls=float64_matmuls))
        return {"seconds": elapsed, "flops": flops, "peak": peak, "timed": "300 steps"}
    setup_time, setup_flops, setup_peak, (anchor, gram, residual) = measure(
        lambda: prepare_descent(task_vectors, float64_matmuls))

    def descend(iterations, consume=False):
        merged, rest = (anchor, residual) if consume else (anchor.clone(), residual.clone())
        solvers.adam_descent(gram, rest, merged, iterations, solvers.DEFAULT_LEARNING_RATE)

    # A fold: the loop with no step is its final fold alone (and two copies).
    fold_time, fold_flops, _, _ = measure(lambda: descend(0))
    # Ordinary steps: the loop itself with 1 + steps steps less the loop with 1
    # (both one fold, steps < RESIDUAL_REFRESH_STEPS, and the same copies).
    one_time, one_flops, _, _ = measure(lambda: descend(1))
    more_time, more_flops, _, _ = measure(lambda: descend(1 + steps))
    steps_time = more_time - one_time
    steps_flops = add_flops((1, more_flops), (-1, one_flops))
    # Last, on the prepared state itself, as wudi_adam runs it: its peak plus
    # what the setup left (anchor, residual, C) is the descent's peak.
    _, _, descent_peak, _ = measure(lambda: descend(1, consume=True))
    descent_peak += storage_bytes(anchor, residual, gram)
    step_time = steps_time / steps
    step_flops = add_flops((1 / steps, steps_flops))
    return {
        "seconds": setup_time + ITERATIONS * step_time + folds(ITERATIONS) * fold_time,
        "flops": add_flops((1, setup_flops), (ITERATIONS, step_flops),
                           (folds(ITERATIONS), fold_flops)),
        "peak": max(setup_peak, descent_peak),
        "timed": f"setup + {steps} steps + fold, projected to 300",
        "parts": (setup_time, step_time, fold_time),
    }


def cpu_steps(shape, rates) -> int:
    """Ordinary steps to time: CPU_STEPS, or more where steps are short (2 s at least), within a fold period."""
    step = sum(solve_flops("adam", shape, EXPERTS, 1, True).values()) / rates[torch.float32]
    return min(max(CPU_STEPS, math.ceil(2.0 / step)), solvers.RESIDUAL_REFRESH_STEPS - 2)


def solve_row(solver, shape, device, float64_matmuls, rates):
    task_vectors = [t.to(device) for t in structured_task_vectors(EXPERTS, *shape)]
    if solver == "adam":
        row = adam_parts(task_vectors, device, float64_matmuls,
                         None if device.type == "cuda" else cpu_steps(shape, rates))
    else:
        solve = (solvers.wudi_spectral if solver == "spectral" else functools.partial(
            solvers.wudi_closed_form, omega=solvers.DEFAULT_OMEGA))
        elapsed, flops, peak, _ = Measured(device)(lambda: solve(task_vectors))
        row = {"seconds": elapsed, "flops": flops, "peak": peak, "timed": "one solve"}
    model = solve_flops(solver, shape, EXPERTS, ITERATIONS, float64_matmuls)
    row["model_ok"] = same_flops(row["flops"], model)
    row["estimate"] = estimate_bytes(solver, shape)
    return row


def c_bytes(solver, shape) -> int:
    """C's storage: three float32 [in, in] (the stacked task vectors where Adam stacks
    them) for Adam; C and its Cholesky factor in float64 for the closed form; for
    the spectral solve the float64 matrix it decomposes and its eigenvectors (C, or
    S S^T in the row space, with S)."""
    m, n = shape
    if solver == "closed_form":
        return 16 * n * n
    if solver == "spectral":
        if solvers.prefers_row_space(m, n, EXPERTS):
            return 8 * (2 * (EXPERTS * m) ** 2 + EXPERTS * m * n)
        return 16 * n * n
    return EXPERTS * 4 * m * n if solvers.prefers_stacked_form(m, n, EXPERTS) else 12 * n * n


def estimate_bytes(solver, shape):
    if solver == "adam":
        return solvers.adam_working_bytes(*shape, EXPERTS)
    if solver == "spectral":
        return solvers.spectral_working_bytes(*shape, EXPERTS)
    return solvers.closed_form_working_bytes(*shape, EXPERTS)


def task_arithmetic_seconds(shape, directory: Path):
    """Read base + experts (bfloat16 safetensors), sum in float32, write: one tensor."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator).bfloat16()
    paths = [directory / f"model_{index}.safetensors" for index in range(EXPERTS + 1)]
    for index, path in enumerate(paths):
        tensor = base if index == 0 else (base.float() + 1e-3 * torch.randn(
            shape, generator=generator)).bfloat16()
        save_file({"weight": tensor}, str(path))
    del base
    start = time.perf_counter()
    base = load_file(str(paths[0]))["weight"].float()
    merged = base.clone()
    for path in paths[1:]:
        merged += load_file(str(path))["weight"].float() - base
    save_file({"weight": merged.bfloat16()}, str(directory / "merged.safetensors"))
    elapsed = time.perf_counter() - start
    for path in [*paths, directory / "merged.safetensors"]:
        path.unlink()
    return elapsed


def fits(solver, shape, device) -> bool:
    needed = estimate_bytes(solver, shape) + (EXPERTS + 2) * 4 * shape[0] * shape[1]
    if device.type == "cuda":
        return needed < 0.9 * torch.cuda.mem_get_info(device)[0]
    return False  # on CPU, 70B rows are projected (memory and hours)


def scaled(shape, quick):
    return tuple(size // QUICK_SCALE for size in shape) if quick else shape


def gflop(flops, dtype):
    return f"{flops.get(dtype, 0) / 1e9:,.0f}"


def check_solve_flops_both_precisions(device):
    """Both precisions, every structure (own Gram, through tau^T, stacked), counted."""
    mismatches = []
    for shape in [(1792, 512), (512, 512), (512, 1792), (128, 1024)]:
        task_vectors = [t.to(device) for t in structured_task_vectors(EXPERTS, *shape)]
        for float64_matmuls in (True, False):
            with MatmulFlops() as flops:
                solvers.wudi_adam(task_vectors, iterations=7, float64_matmuls=float64_matmuls)
            if not same_flops(dict(flops.flops), solve_flops("adam", shape, EXPERTS, 7, float64_matmuls)):
                mismatches.append((shape, float64_matmuls))
    return mismatches


def wide_layer_family(hidden: int, intermediate: int, experts: int) -> List[Path]:
    """A one-layer Llama base and ``experts`` perturbed copies, built once under benchmarks/.cache."""
    import transformers

    from mergekit_wudi.demo import write_family

    transformers.utils.logging.disable_progress_bar()
    root = REPO_ROOT / "benchmarks" / ".cache" / f"llm_scale_layer_{hidden}_{intermediate}"
    paths = [root / "base"] + [root / f"expert_{i}" for i in range(1, experts + 1)]
    if all((path / "model.safetensors").exists() for path in paths):
        return paths
    return write_family(root, "llama", experts, config=wide_layer_config(hidden, intermediate))


def wide_layer_config(hidden: int, intermediate: int):
    """One Llama layer ``hidden`` wide, a vocabulary of 1024."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=1, num_attention_heads=hidden // 128 or 2,
        num_key_value_heads=max(1, hidden // 512), tie_word_embeddings=False,
    )


def mergekit_memory(quick: bool):
    """Peak RSS (MiB) of mergekit-yaml merges of one wide Llama layer: {(method, N): MiB}."""
    import yaml

    hidden, intermediate = (256, 896) if quick else (2048, 7168)
    counts = (2, 6)
    paths = wide_layer_family(hidden, intermediate, max(counts))
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:],"
               " capture_output=True).returncode; print(rc,"
               " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peaks = {}
    with tempfile.TemporaryDirectory() as work:
        for method in ("wudi", "task_arithmetic"):
            for count in counts:
                recipe = {
                    "merge_method": method, "base_model": str(paths[0]), "dtype": "float32",
                    "models": [{"model": str(p), "parameters": {"weight": 1.0}}
                               for p in paths[1:count + 1]],
                }
                if method == "wudi":
                    recipe["parameters"] = {"iterations": 2}
                config_path = Path(work) / f"{method}-{count}.yml"
                config_path.write_text(yaml.safe_dump(recipe))
                command = [sys.executable, "-c", wrapper,
                           str(Path(sys.executable).parent / "mergekit-yaml"),
                           str(config_path), str(Path(work) / f"out-{method}-{count}")]
                output = subprocess.run(command, capture_output=True, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
                code, kib = map(int, output.stdout.split())
                if code != 0:
                    raise RuntimeError(f"mergekit-yaml {method} N={count} failed")
                peaks[method, count] = kib / 1024
    return hidden, intermediate, counts, peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--quick", action="store_true",
                        help=f"every dimension / {QUICK_SCALE}: checks the script in minutes")
    parser.add_argument("--precision", choices=("auto", "float64", "float32"), default="auto",
                        help="the Adam solver's accurate products (default: as the device decides)")
    parser.add_argument("--skip-mergekit", action="store_true", help="no mergekit-yaml memory runs")
    args = parser.parse_args(argv)
    device = args.device
    float64_matmuls = {"auto": solvers.float64_matmuls_are_fast(device),
                       "float64": True, "float32": False}[args.precision]
    started = time.perf_counter()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads on {os.cpu_count()} cores")
    print(f"# WUDI at LLM scale: {EXPERTS} experts{' (--quick: shapes / 8)' if args.quick else ''}\n")
    print(f"{name}; torch {torch.__version__}; load average at start {os.getloadavg()[0]:.2f};"
          f" Adam's accurate products: {'float64 matmuls' if float64_matmuls else 'split float32 matmuls'}"
          f" (precision {args.precision})\n")
    rates = matmul_rates(device, 512 if args.quick else 4096)
    print(f"Plain matmul rates: float32 {rates[torch.float32] / 1e9:.0f} GFLOP/s,"
          f" float64 {rates[torch.float64] / 1e9:.0f} GFLOP/s\n")

    rows = {}  # (model, role, solver) -> row
    cache = REPO_ROOT / "benchmarks" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    measured_roles = {}
    for model_name, (layers, weights) in MODELS.items():
        for role, full_shape, _ in weights:
            shape = scaled(full_shape, args.quick)
            with tempfile.TemporaryDirectory(dir=cache) as directory:
                arithmetic = task_arithmetic_seconds(shape, Path(directory))
            for solver in SOLVERS:
                run = model_name == "Llama-3-8B" or fits(solver, shape, device)
                if run:
                    row = solve_row(solver, shape, device, float64_matmuls, rates)
                    row["ratio"] = row["seconds"] / ideal_seconds(row["flops"], rates)
                    measured_roles[role.split(",")[0].split()[0], solver] = row["ratio"]
                else:
                    flops = solve_flops(solver, shape, EXPERTS, ITERATIONS, float64_matmuls)
                    ratio = measured_roles[role.split(",")[0].split()[0], solver]
                    row = {"seconds": ideal_seconds(flops, rates) * ratio, "flops": flops,
                           "peak": estimate_bytes(solver, shape), "estimate": None,
                           "timed": "projected", "model_ok": None, "ratio": ratio}
                row["arithmetic"] = arithmetic
                rows[model_name, role, solver] = row
                print(f"  {model_name} {role} {solver}: {row['seconds']:.1f} s ({row['timed']})"
                      f" [{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)

    print("## Per weight: one solve\n")
    header = ["model", "weight", "[out, in]", "solver", "s per solve", "how", "float32 GFLOP",
              "float64 GFLOP", "float64 share", "peak extra GiB", "x float32 [out,in]",
              "beyond C", "measured / estimate", "FLOP model"]
    table = []
    for (model_name, role, solver), row in rows.items():
        shape = scaled(dict((r, s) for r, s, _ in MODELS[model_name][1])[role], args.quick)
        copy = 4 * shape[0] * shape[1]
        total = sum(row["flops"].values())
        table.append([
            model_name, role, f"[{shape[0]},{shape[1]}]", solver, f"{row['seconds']:.1f}",
            row["timed"], gflop(row["flops"], torch.float32), gflop(row["flops"], torch.float64),
            f"{row['flops'].get(torch.float64, 0) / total:.1%}", f"{row['peak'] / GIB:.2f}",
            f"{row['peak'] / copy:.1f}", f"{(row['peak'] - c_bytes(solver, shape)) / copy:.1f}",
            "estimate" if row["estimate"] is None else f"{row['peak'] / row['estimate']:.2f}",
            "n/a" if row["model_ok"] is None else ("agrees" if row["model_ok"] else "DIFFERS"),
        ])
    print_table(header, table)
    adam_parts_rows = [(k, r) for k, r in rows.items() if "parts" in r]
    if adam_parts_rows:
        print("\nAdam's parts (s): setup, one ordinary step, one fold")
        for (model_name, role, _), row in adam_parts_rows:
            print(f"- {model_name} {role}: " + ", ".join(f"{p:.2f}" for p in row["parts"]))

    print("\n## Whole model: the linear weights of every layer\n")
    header = (["model", "layers", "task arithmetic min"] + [f"wudi {s} min" for s in SOLVERS]
              + [f"{s} / task arithmetic" for s in SOLVERS] + ["rows projected"])
    table = []
    for model_name, (layers, weights) in MODELS.items():
        arithmetic = sum(layers * count * rows[model_name, role, SOLVERS[0]]["arithmetic"]
                         for role, _, count in weights)
        minutes = {solver: (arithmetic + sum(layers * count * rows[model_name, role, solver]["seconds"]
                                             for role, _, count in weights)) / 60
                   for solver in SOLVERS}
        projected = sum(rows[model_name, role, solver]["timed"] == "projected"
                        for role, _, _ in weights for solver in SOLVERS)
        table.append([model_name, str(layers), f"{arithmetic / 60:.1f}"]
                     + [f"{minutes[s]:,.0f}" for s in SOLVERS]
                     + [f"{minutes[s] * 60 / arithmetic:,.0f}x" for s in SOLVERS]
                     + [f"{projected} of {len(weights) * len(SOLVERS)}"])
    print_table(header, table)

    print("\n## Adam's FLOPs per weight by precision (solve_flops, 300 steps)\n")
    print("`precision: float64` computes the residual and its folds with float64 matmuls;"
          " `float32` with three float32 matmuls each on error-free splits. The last columns"
          f" weigh each float64 FLOP {SLOW_FLOAT64}x a float32 one, as on GPUs whose float64"
          f" runs at 1/{SLOW_FLOAT64} of float32 (T4, L4, RTX).\n")
    table = []
    for model_name, (_, weights) in MODELS.items():
        for role, full_shape, _ in weights:
            shape = scaled(full_shape, args.quick)
            by_precision = {f64: solve_flops("adam", shape, EXPERTS, ITERATIONS, f64)
                            for f64 in (True, False)}
            steps_only = ITERATIONS * solve_flops("adam", shape, EXPERTS, 1, True)[torch.float32]
            cells = [model_name, role]
            for f64 in (True, False):
                flops = by_precision[f64]
                cells += [gflop(flops, torch.float32), gflop(flops, torch.float64)]
            for f64 in (True, False):
                flops = by_precision[f64]
                slow = flops.get(torch.float32, 0) + SLOW_FLOAT64 * flops.get(torch.float64, 0)
                cells.append(f"{slow / steps_only:.2f}")
            table.append(cells)
    print_table(["model", "weight", "float64: f32 GFLOP", "float64: f64 GFLOP",
                 "float32: f32 GFLOP", "float32: f64 GFLOP",
                 f"float64 on 1/{SLOW_FLOAT64} GPU, x the steps", f"float32 on 1/{SLOW_FLOAT64} GPU, x the steps"],
                table)

    mismatches = check_solve_flops_both_precisions(device)
    print(f"\nFLOP model against counted FLOPs, both precisions, at 1/8 of 8B's shapes and a"
          f" stacked one: {'agrees' if not mismatches else f'DIFFERS at {mismatches}'}")

    if not args.skip_mergekit:
        hidden, intermediate, counts, peaks = mergekit_memory(args.quick)
        print(f"\n## Peak resident memory of mergekit-yaml: one Llama layer, hidden {hidden},"
              f" intermediate {intermediate}, float32, iterations 2\n")
        print_table(["merge_method"] + [f"N={n} MiB" for n in counts] + [f"N={counts[1]} - N={counts[0]}"],
                    [[method] + [f"{peaks[method, n]:.0f}" for n in counts]
                     + [f"{peaks[method, counts[1]] - peaks[method, counts[0]]:+.0f}"]
                     for method in ("wudi", "task_arithmetic")])
    print_total(started)


if __name__ == "__main__":
    main()
