"""Time (wall and CPU) of a whole-model WUDI merge through ``mergekit-yaml``, on CPU.

    python benchmarks/whole_model.py                 # 4 layers: ~5 min on 2 cores
    python benchmarks/whole_model.py --layers 12     # the full GPT-2-small depth
    python benchmarks/whole_model.py --threads 1     # a CPU shared with other jobs

Four experts of a GPT-2-small sized model (n_embd 768, 12 heads, vocabulary 8192
instead of 50257 to save time; the vocabulary tables get task arithmetic anyway) with
random weights built locally by transformers; each expert is the base plus
``mergekit_wudi.demo.perturb``'s low-rank-plus-noise update. The same models are
merged with ``merge_method: task_arithmetic`` in the same run, as the yardstick.

Depth: every layer adds four WUDI solves, 300 Adam steps each, about 22 GFLOP a
step (the ``mlp.c_proj`` weight, ``[out,in] = [768,3072]``, is two thirds of it),
measured at about 72 s a layer on 2 cores
(``benchmarks/results/whole_model.txt``): the default of 4 layers keeps the run
near 5 minutes. The time scales linearly with the number of layers.

Models are cached under ``benchmarks/.cache/`` (git-ignored), one folder per
(layers, vocabulary, experts), and reused by later runs.
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml
from safetensors import safe_open

from mergekit_wudi.demo import perturb

CACHE = Path(__file__).resolve().parent / ".cache"


def build_family(layers: int, vocabulary: int, experts: int) -> list:
    """Base and expert directories (absolute paths), built once and cached."""
    root = CACHE / f"gpt2-768x{layers}-vocab{vocabulary}-{experts}experts"
    paths = [root / "base"] + [root / f"expert_{index}" for index in range(1, experts + 1)]
    if all((path / "model.safetensors").exists() for path in paths):
        return paths
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocabulary, n_embd=768, n_layer=layers, n_head=12, n_positions=1024,
        bos_token_id=vocabulary - 1, eos_token_id=vocabulary - 1,  # GPT-2's 50256 is out of range
    )
    model = transformers.GPT2LMHeadModel(config)
    model.config.architectures = ["GPT2LMHeadModel"]  # mergekit reads it
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.save_pretrained(paths[0])
    for index, path in enumerate(paths[1:], start=1):
        model.load_state_dict(base_state)
        perturb(model, seed=index)
        model.save_pretrained(path)
    return paths


def tensor_count(directory: Path) -> int:
    count = 0
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            count += len(list(handle.keys()))
    return count


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_merge(method: str, paths: list, work: Path, parameters=None, threads=None,
                flags=(), dtype: str = "float32", label=None) -> tuple:
    """(wall, CPU) seconds of one ``mergekit-yaml`` run, process start included.

    ``parameters``: the recipe's method parameters; ``flags``: mergekit-yaml's
    options (e.g. ``--cuda``); ``label`` names the recipe and output (default
    ``method``). CPU time is what other jobs on a shared machine do not inflate.
    Checks that the weights were written.
    """
    base, *experts = paths
    label = label or method
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(expert), "parameters": {"weight": 1.0}} for expert in experts],
        "dtype": dtype,
    }
    if parameters:
        config["parameters"] = dict(parameters)
    config_path = work / f"{label}.yml"
    config_path.write_text(yaml.safe_dump(config))
    out = work / f"merged-{label}"
    command = [str(Path(sys.executable).parent / "mergekit-yaml"), str(config_path), str(out),
               "--quiet", *flags]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)  # torch's CPU thread count
    start, start_cpu = time.perf_counter(), children_cpu_seconds()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    elapsed, cpu = time.perf_counter() - start, children_cpu_seconds() - start_cpu
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    # mergekit can exit 0 having written no weights (see WUDI_NOTES): check.
    written, expected = tensor_count(out), tensor_count(base)
    if written != expected:
        raise RuntimeError(f"{label}: {written} tensors written, base has {expected}")
    return elapsed, cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--vocabulary", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=300, help="WUDI Adam steps (paper: 300)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the merges (default: torch's)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    paths = build_family(args.layers, args.vocabulary, args.experts)
    threads = args.threads or torch.get_num_threads()
    print(f"# Whole-model merge: GPT-2 n_embd 768, {args.layers} layers, vocabulary "
          f"{args.vocabulary}, {args.experts} experts, CPU, {threads} threads on "
          f"{os.cpu_count()} CPUs\n")
    print(f"models ready in {time.perf_counter() - start:.0f} s "
          f"(cache: {paths[0].parent.relative_to(CACHE.parent.parent)}); "
          f"load average {os.getloadavg()[0]:.2f}\n")
    work = paths[0].parent / "runs"
    work.mkdir(exist_ok=True)
    arithmetic_wall, arithmetic = timed_merge("task_arithmetic", paths, work, threads=args.threads)
    wudi_wall, wudi = timed_merge(
        "wudi", paths, work, {"iterations": args.iterations}, threads=args.threads
    )
    solved = 4 * args.layers
    print("| merge_method | wall s | CPU s | CPU vs task_arithmetic |")
    print("|---|---|---|---|")
    print(f"| task_arithmetic | {arithmetic_wall:.1f} | {arithmetic:.1f} | 1.0x |")
    print(f"| wudi ({args.iterations} Adam steps, {solved} weights solved) | {wudi_wall:.1f} "
          f"| {wudi:.1f} | {wudi / arithmetic:.1f}x |")
    print(f"\nWUDI CPU time per solved weight, net of the task-arithmetic run: "
          f"{(wudi - arithmetic) / solved:.1f} s. Load average at end {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
