"""The parts of the one-shot GPU check (project issue 23), run by ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_check.py --out DIR [--dry-run] [--parts tests,merge]
    python benchmarks/gpu_check.py --part tf32 [--dry-run]   # one part, to stdout

Each part runs in a process of its own under its own timeout (``PARTS``: 7 min in
all), its output in ``DIR/gpu_<part>.txt``; a part that fails or runs out of time
does not stop the next, and ``DIR/gpu_summary.txt`` says which passed. A part
passes when its process ends with status 0: every test passed, every check held,
every table was printed. On CUDA (the first GPU); ``--dry-run``: on the CPU at
tiny sizes, every part the same code, in well under 2 minutes (CI runs it:
``tests/test_gpu_check.py``).

- ``tests``: ``tests/test_gpu.py``, and the solver tests with their tensors on the
  device (``tests.on_device``), both ``precision`` paths among them.
- ``solvers``: at ViT-B/32 and Llama-3-8B shapes, N = 3, ``benchmarks.solver_speed``'s
  tables: one Adam step against a plain ``torch.matmul`` of the same operands and
  against the authors' formulation, and the whole solve of Adam (300 steps),
  closed form and spectral.
- ``tf32``: the Adam solve (300 steps, both precision paths) with TF32 and with
  bfloat16 matmuls against float32: relative difference and time; TF32 stays
  opt-in unless within 1e-3 of float32 on every shape.
- ``merge``: ``mergekit-yaml --cuda`` of a model with Llama-3.2-1B's shapes and
  random weights (base and 3 experts built on the device), task arithmetic and
  each solver, wall times side by side.
- ``device_fit``: a solve too large for the free memory of the real allocator
  (the GPU filled with a held tensor) goes to the CPU with a warning and the
  CPU's result; one that fits stays and allocates no more than estimated.
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks import solver_speed  # noqa: E402
from benchmarks.llm_scale import MODELS  # noqa: E402
from tests.oracle import relative_error, structured_task_vectors  # noqa: E402

EXPERTS = 3
TF32_BAR = 1e-3
# Seconds each part may take on the GPU machine: 7 min in all, with the install.
PARTS = {"tests": 100, "solvers": 100, "tf32": 70, "merge": 100, "device_fit": 45}
DRY_RUN_TIMEOUT = 300  # a part of the dry run: a guard against a hang on a busy CI machine
SOLVER_TEST_FILES = ["tests/test_solvers_adam.py", "tests/test_solvers_closed_form.py",
                     "tests/test_solvers_products.py", "tests/test_solvers_spectral.py",
                     "tests/test_solvers_statistics.py"]
# Llama-3.2-1B: hidden 2048, MLP 8192, 32 query and 8 key-value heads, vocabulary
# 128256, embeddings tied; 16 layers, of which the merge builds MERGE_LAYERS.
LLAMA_1B_LAYERS = 16
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
MERGE_LAYERS = 4
MERGES = [("task_arithmetic", None), ("wudi", "adam"), ("wudi", "closed_form"),
          ("wudi", "spectral")]
DRY_SCALE = 32  # --dry-run divides every dimension by this


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the parts run: the GPU check's sizes, or the dry run's."""

    device: torch.device
    vit_shapes: list
    llama_shapes: list
    vit_steps: int  # Adam steps timed per weight (1 + steps solved)
    llama_steps: int  # fewer: the 300-step time is projected from them
    repeats: int  # rounds of the ViT-shape timings, fastest kept
    reference_budget: float  # seconds the authors' formulation may take per weight
    gram_path_budget: float
    tf32_iterations: int
    model: dict  # the merged model's sizes
    merge_layers: int
    merges: list
    merge_parameters: dict
    fit_shape: tuple
    fit_iterations: int
    solver_tests: list  # pytest's paths or node ids

    @classmethod
    def of(cls, dry_run: bool) -> "Sizes":
        vit = solver_speed.VIT_SHAPES
        llama = [shape for _, shape, _ in MODELS["Llama-3-8B"][1]]
        if not dry_run:
            return cls(torch.device("cuda"), vit, llama, vit_steps=299, llama_steps=49,
                       repeats=3, reference_budget=10.0, gram_path_budget=5.0,
                       tf32_iterations=solver_speed.ADAM_STEPS, model=LLAMA_1B,
                       merge_layers=MERGE_LAYERS, merges=MERGES, merge_parameters={},
                       fit_shape=(1024, 4096), fit_iterations=20, solver_tests=SOLVER_TEST_FILES)

        def scaled(shape):
            return tuple(size // DRY_SCALE for size in shape)

        # One shape of each family, a few steps, two merges: every code path, in seconds.
        return cls(torch.device("cpu"), [scaled(vit[0])], [scaled(llama[0])], vit_steps=2,
                   llama_steps=2, repeats=1, reference_budget=5.0, gram_path_budget=5.0,
                   tf32_iterations=5,
                   model={**{k: v // DRY_SCALE for k, v in LLAMA_1B.items()},
                          "num_attention_heads": 2, "num_key_value_heads": 1},
                   merge_layers=1, merges=MERGES[:2], merge_parameters={"iterations": 5},
                   fit_shape=(32, 128), fit_iterations=5,
                   solver_tests=[f"{SOLVER_TEST_FILES[0]}::test_adam_equals_authors_formulation"
                                 f"[32x64-3-{path}]" for path in ("float64-matmuls", "split-float32")])

    def timeout(self, part: str) -> int:
        return PARTS[part] if self.device.type == "cuda" else DRY_RUN_TIMEOUT


def device_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"{name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads;"
            f" float64 matmuls fast: {solver_speed.solvers.float64_matmuls_are_fast(device)}")


# --- tests -----------------------------------------------------------------------

def tests_part(sizes: Sizes) -> int:
    runs = [
        ["tests/test_gpu.py"],
        ["-p", "tests.on_device", "--tensor-device", sizes.device.type, *sizes.solver_tests],
    ]
    # Side by side: test_gpu.py waits mostly on mergekit-yaml processes starting.
    with tempfile.TemporaryDirectory() as directory:
        logs = [Path(directory) / f"run{index}.txt" for index in range(len(runs))]
        processes = []
        for arguments, log in zip(runs, logs):
            command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                       *arguments]
            with open(log, "w") as output:
                processes.append((command, subprocess.Popen(
                    command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)))
        status = 0
        for (command, process), log in zip(processes, logs):
            status |= process.wait()
            print(f"$ {' '.join(command[1:])}\n{log.read_text()}", flush=True)
    return status


# --- solvers -----------------------------------------------------------------------

def solvers_part(sizes: Sizes) -> int:
    print(f"# WUDI solvers on {device_line(sizes.device)}\n")
    for family, shapes, steps, repeats in (
            ("ViT-B/32", sizes.vit_shapes, sizes.vit_steps, sizes.repeats),
            ("Llama-3-8B", sizes.llama_shapes, sizes.llama_steps, 1)):
        rows = [solver_speed.compare(shape, EXPERTS, steps, sizes.device, repeats,
                                     True, sizes.reference_budget) for shape in shapes]
        print(f"## {family} shapes, N={EXPERTS}: one Adam step\n")
        solver_speed.print_speed_table(rows)
        print()
        solver_speed.print_throughput_table(rows)
        whole = [solver_speed.whole_solves(shape, EXPERTS, steps, sizes.device, repeats,
                                           sizes.gram_path_budget) for shape in shapes]
        print(f"\n## {family} shapes, N={EXPERTS}: whole solve per weight\n")
        solver_speed.print_whole_solve_table(whole, projected=steps + 1 < solver_speed.ADAM_STEPS)
        print(flush=True)
    return 0


# --- tf32 --------------------------------------------------------------------------

class Bfloat16Matmuls(TorchDispatchMode):
    """float32 matrix products on operands rounded to bfloat16 (products exact,
    sums in float32), as bfloat16 tensor cores compute them; float64 ones untouched."""

    OPERANDS = {
        torch.ops.aten.mm.default: (0, 1), torch.ops.aten.mm.out: (0, 1),
        torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.addmm.out: (1, 2),
        torch.ops.aten.bmm.default: (0, 1), torch.ops.aten.bmm.out: (0, 1),
        torch.ops.aten.baddbmm.default: (1, 2), torch.ops.aten.baddbmm.out: (1, 2),
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        args = list(args)
        for index in self.OPERANDS.get(func, ()):
            if args[index].dtype == torch.float32:
                args[index] = args[index].bfloat16().float()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def matmuls_in(precision: str):
    """float32 matmuls as ``precision`` says: float32, tf32 or bfloat16."""
    default = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        with Bfloat16Matmuls() if precision == "bfloat16" else contextlib.nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(default)


def step_matmul_ms(shape, device, precision) -> float:
    """A plain ``[out,in] @ [in,in]`` (one Adam step's product) in ``precision``."""
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    left = torch.randn(shape, device=device, dtype=dtype)
    right = torch.randn(shape[1], shape[1], device=device, dtype=dtype)
    with matmuls_in("tf32" if precision == "tf32" else "float32"):
        left @ right
        elapsed, _ = solver_speed.seconds(lambda: left @ right, device, calls=10)
    return elapsed * 1e3


def tf32_part(sizes: Sizes) -> int:
    print(f"# TF32 and bfloat16 matmuls in the Adam solve on {device_line(sizes.device)}\n")
    print(f"wudi_adam, {sizes.tf32_iterations} steps, N={EXPERTS}, against the same solve with"
          " float32 matmuls (precision 'highest'): Frobenius-relative difference of the result"
          " and of the update (result - sum of the task vectors). TF32 through"
          " torch.set_float32_matmul_precision('high'); bfloat16 as its tensor cores compute"
          " (operands rounded to bfloat16, sums in float32: emulated, so its solve time is not"
          " bfloat16's; its step matmul time is a real bfloat16 matmul). Precision: the Adam"
          " solver's accurate products (float64 matmuls, or split float32 ones at ViT shapes)."
          " Closed form and spectral compute in float64: neither setting touches them.\n")
    header = ["weight [out,in]", "precision", "float32 solve s", "TF32 solve s",
              "TF32 diff result", "TF32 diff update", "bfloat16 diff update",
              "step matmul ms float32", "TF32", "bfloat16"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    worst = {"tf32": 0.0, "bfloat16": 0.0}
    for shape in sizes.vit_shapes + sizes.llama_shapes:
        task_vectors = [t.to(sizes.device) for t in structured_task_vectors(EXPERTS, *shape)]
        initial = sum(task_vectors)
        for float64_matmuls in (True, False):  # warm-up: the first solve's one-off costs
            solver_speed.solvers.wudi_adam(task_vectors, iterations=1,
                                           float64_matmuls=float64_matmuls)
        timings = {precision: step_matmul_ms(shape, sizes.device, precision)
                   for precision in ("float32", "tf32", "bfloat16")}
        # The split float32 products at ViT shapes only: 300-step solves at 8B's are long.
        for float64_matmuls in (True, False) if shape in sizes.vit_shapes else (True,):
            solved = {}
            for precision in ("float32", "tf32", "bfloat16"):
                with matmuls_in(precision):
                    solved[precision] = solver_speed.seconds(lambda: solver_speed.solvers.wudi_adam(
                        task_vectors, iterations=sizes.tf32_iterations,
                        float64_matmuls=float64_matmuls), sizes.device)
            exact = solved["float32"][1]
            update = {precision: relative_error(solved[precision][1] - initial, exact - initial)
                      for precision in worst}
            for precision in worst:
                worst[precision] = max(worst[precision], update[precision])
            print(f"| {solver_speed.weight(shape)} | {'float64' if float64_matmuls else 'float32'}"
                  f" | {solved['float32'][0]:.2f} | {solved['tf32'][0]:.2f}"
                  f" | {relative_error(solved['tf32'][1], exact):.1e} | {update['tf32']:.1e}"
                  f" | {update['bfloat16']:.1e} | {timings['float32']:.2f} | {timings['tf32']:.2f}"
                  f" | {timings['bfloat16']:.2f} |", flush=True)
    print()
    for precision, difference in worst.items():
        verdict = ("within 1e-3 of float32 on every shape: could be the default" if difference
                   <= TF32_BAR else "beyond 1e-3 of float32: stays opt-in")
        print(f"- {precision}: worst update difference {difference:.1e}, {verdict}")
    return 0


# --- merge -------------------------------------------------------------------------

def merge_part(sizes: Sizes) -> int:
    import transformers

    from benchmarks.whole_model import timed_merge
    from mergekit_wudi.demo import write_family

    transformers.utils.logging.disable_progress_bar()
    config = transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=500000.0,
                                      max_position_embeddings=256,
                                      num_hidden_layers=sizes.merge_layers, **sizes.model)
    print(f"# Whole-model mergekit-yaml on {device_line(sizes.device)}\n")
    print(f"Llama-3.2-1B's shapes ({sizes.model}), {sizes.merge_layers} of its"
          f" {LLAMA_1B_LAYERS} layers,"
          f" random weights, bfloat16, base + {EXPERTS} experts (demo.perturb), built on"
          f" {sizes.device}.\n", flush=True)
    flags = ["--cuda"] if sizes.device.type == "cuda" else []
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        started = time.perf_counter()
        paths = write_family(work / "models", "llama", experts=EXPERTS, dtype=torch.bfloat16,
                             config=config, device=sizes.device)
        if sizes.device.type == "cuda":
            torch.cuda.empty_cache()  # the builder's memory, back for mergekit-yaml
        print(f"models built and saved in {time.perf_counter() - started:.0f} s\n")
        print(f"| merge_method | solver | wall s ({' '.join(['mergekit-yaml', *flags])}) |"
              " vs task_arithmetic |\n|---|---|---|---|", flush=True)
        arithmetic = None
        for method, solver in sizes.merges:
            label = solver or method
            parameters = {"solver": solver, **sizes.merge_parameters} if solver else None
            wall, _ = timed_merge(method, paths, work, parameters,
                                  flags=flags, dtype="bfloat16", label=label)
            shutil.rmtree(work / f"merged-{label}")
            arithmetic = arithmetic or wall
            print(f"| {method} | {solver or '-'} | {wall:.1f} | {wall / arithmetic:.2f}x |",
                  flush=True)
    print(f"\nEach time includes mergekit-yaml's start and the reading and writing of the"
          f" weights; WUDI's solves grow with the layers ({sizes.merge_layers} here,"
          f" {LLAMA_1B_LAYERS} in the model).")
    return 0


# --- device fit --------------------------------------------------------------------

class Warnings(logging.Handler):
    """The messages of the warnings logged, to check."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def solve_peaks(device: torch.device, peaks: list):
    """Appends to ``peaks`` the bytes each solve of the kernel allocates on
    ``device`` beyond what was allocated before it (its result included)."""
    from mergekit_wudi import method

    real = method.solve

    def measured(*args, **kwargs):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = real(*args, **kwargs)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
        return result

    method.solve = measured
    try:
        yield
    finally:
        method.solve = real


@contextlib.contextmanager
def free_memory_left(device: torch.device, free: int):
    """The device's free memory brought down to about ``free`` bytes: on CUDA by
    holding tensors of the rest (the real allocator reports it), on the CPU,
    which has no such limit, by injecting it into ``problems.free_memory``."""
    from mergekit_wudi import problems

    if device.type == "cuda":
        held = []  # in chunks: one allocation of nearly all the free memory may fail
        try:
            while (excess := problems.free_memory(device) - free) > 0:
                held.append(torch.empty(min(excess, 2**30), dtype=torch.uint8, device=device))
        except torch.cuda.OutOfMemoryError:
            pass  # as full as it gets; the check reports the free memory it saw
        try:
            yield problems.free_memory(device)
        finally:
            del held
            torch.cuda.empty_cache()
        return
    real = problems.free_memory
    problems.free_memory = lambda _: free
    try:
        yield free
    finally:
        problems.free_memory = real


def device_fit_part(sizes: Sizes) -> int:
    from mergekit.merge_methods.api import merge_tensors

    from mergekit_wudi import problems
    from mergekit_wudi.parameters import Solver

    device, shape = sizes.device, sizes.fit_shape
    name = "model.layers.0.mlp.down_proj.weight"
    print(f"# Device fit on {device_line(device)}\n")
    print(f"One [out,in] = {list(shape)} weight, N={EXPERTS}, merged by merge_tensors on"
          f" {device}: first with the memory as it is, then with the free memory brought"
          f" below half of what the solve needs ({'a held tensor' if device.type == 'cuda' else 'injected: no GPU'}).\n")
    base = torch.zeros(shape, device=device)
    tensors = [base] + [base + tau.to(device) for tau in structured_task_vectors(EXPERTS, *shape)]
    handler = Warnings()
    logging.getLogger("mergekit_wudi.problems").addHandler(handler)
    failures = []
    header = ["solver", "estimated GiB", "solve's peak allocated GiB (fits)", "free GiB (filled)",
              "warned", "result on", "diff to CPU merge"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    for solver in Solver:
        parameters = {"solver": solver.value, "iterations": sizes.fit_iterations}
        needed = problems.working_bytes(solver, shape, EXPERTS, torch.float32)
        cpu = merge_tensors([t.cpu() for t in tensors], "wudi", base_index=0, name=name,
                            parameters=parameters)
        handler.messages.clear()
        peaks = []
        with solve_peaks(device, peaks) if device.type == "cuda" else contextlib.nullcontext():
            fitted = merge_tensors(tensors, "wudi", base_index=0, name=name, parameters=parameters)
        peak = peaks[0] if peaks else None
        if handler.messages:
            failures.append(f"{solver.value}: warned although it fits: {handler.messages}")
        if peak is not None and peak > needed:
            failures.append(f"{solver.value}: allocated {peak} bytes, estimated {needed}")
        with free_memory_left(device, needed // 2) as free:
            moved = merge_tensors(tensors, "wudi", base_index=0, name=name, parameters=parameters)
        warned = any(f"tensor {name!r} needs about" in m and "solving it on the CPU" in m
                     for m in handler.messages)
        difference = relative_error(moved.cpu(), cpu)
        if not warned:
            failures.append(f"{solver.value}: no warning with {free} bytes free, {needed} needed")
        if moved.device != fitted.device or difference > 1e-6:
            failures.append(f"{solver.value}: moved result on {moved.device}, diff {difference:.1e}")
        print(f"| {solver.value} | {needed / 2**30:.3f} |"
              f" {'n/a (CPU)' if peak is None else f'{peak / 2**30:.3f}'} | {free / 2**30:.3f} |"
              f" {'yes' if warned else 'NO'} | {moved.device} | {difference:.1e} |", flush=True)
    print()
    for failure in failures:
        print(f"FAILED: {failure}")
    print("device fit: " + ("every check held" if not failures else f"{len(failures)} checks failed"))
    return 1 if failures else 0


RUNNERS = {"tests": tests_part, "solvers": solvers_part, "tf32": tf32_part,
           "merge": merge_part, "device_fit": device_fit_part}


# --- the runner ----------------------------------------------------------------------

def run_part(part: str, dry_run: bool, out: Path, timeout: int) -> tuple:
    """(status, seconds) of one part in its own process, its output in gpu_<part>.txt."""
    command = [sys.executable, __file__, "--part", part] + (["--dry-run"] if dry_run else [])
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if dry_run:  # tiny tensors: threads would only spin, on a CI machine shared with others
        environment.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    with open(out / f"gpu_{part}.txt", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT, env=environment, start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the part and what it started
            process.wait()
            status = "timeout"
        elapsed = time.perf_counter() - started
        if status == "timeout":
            output.write(f"\nTIMED OUT after {timeout} s\n")
    return status, elapsed


def summary_line(part: str, status, seconds: float, timeout: int) -> str:
    verdict = "passed" if status == 0 else (
        f"TIMED OUT (limit {timeout} s)" if status == "timeout" else f"FAILED (status {status})")
    return f"{part}: {verdict} in {seconds:.0f} s, output gpu_{part}.txt"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    parser.add_argument("--out", type=Path, help="folder of the gpu_*.txt files")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--part", choices=PARTS, help="run this part here, output to stdout")
    parser.add_argument("--install-status", type=int, help="gpu_check.sh's install step status")
    args = parser.parse_args(argv)
    if args.part:
        sizes = Sizes.of(args.dry_run)
        if sizes.device.type == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a CPU")
            return 2
        return RUNNERS[args.part](sizes)
    if args.out is None:
        parser.error("--out is needed to run the parts")
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines = []
    if args.install_status is not None:
        install = "skipped (--dry-run)" if args.dry_run else (
            "passed" if args.install_status == 0 else f"FAILED (status {args.install_status})")
        lines.append(f"install: {install}, output gpu_install.txt")
    results = {}
    sizes = Sizes.of(args.dry_run)
    for part in parts:
        results[part] = run_part(part, args.dry_run, args.out, sizes.timeout(part))
        lines.append(summary_line(part, *results[part], sizes.timeout(part)))
        print(lines[-1], flush=True)
    passed = sum(status == 0 for status, _ in results.values())
    mode = "dry run on the CPU" if args.dry_run else f"on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}"
    lines.insert(0, f"GPU check ({mode}): {passed} of {len(parts)} parts passed in"
                    f" {time.perf_counter() - started:.0f} s")
    (args.out / "gpu_summary.txt").write_text("\n".join(lines) + "\n")
    print(lines[0])
    return 0 if passed == len(parts) and not args.install_status else 1


if __name__ == "__main__":
    sys.exit(main())
