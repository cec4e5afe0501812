import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ["HF_HUB_OFFLINE"] = "1"


def run_console_script(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run one of mergekit's console scripts as a user would, offline; fail loudly."""
    return subprocess.run(
        [str(Path(sys.executable).parent / args[0]), *map(str, args[1:])],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def load_weights(directory: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in ``directory``."""
    shards = sorted(Path(directory).glob("*.safetensors"))
    assert shards, f"no safetensors written to {directory}"
    tensors = {}
    for shard in shards:
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny base + 3 experts per architecture, built once per session."""
    from mergekit_wudi.demo import write_family

    built = {}

    def get(architecture: str):
        if architecture not in built:
            root = tmp_path_factory.mktemp(architecture)
            built[architecture] = write_family(root, architecture, experts=3)
        return built[architecture]

    return get


# MoE merges through mergekit-yaml (tests/test_moe.py, tests/test_account.py), of the
# demo's MoE families: 2 layers of 4 experts.
LAYERS, EXPERTS = 2, 4
MOE_LAMBDA = 0.5
MOE_ITERATIONS = 30
# lambda * 2.0 == 1: an expert slice only expert_1 changed must be expert_1's slice.
MOE_WEIGHTS = (2.0, 1.0, 1.0)
# In layer 0, no model changes expert 0 and only expert_1 changes expert 1.
_UNTOUCHED_BY = {0: {1, 2, 3}, 1: {2, 3}}
_PER_EXPERT_KEY = re.compile(r"layers\.0\..*experts\.(\d+)\.")
_FUSED_KEY = re.compile(r"layers\.0\..*experts\.(gate_up_proj|down_proj)$")


def _leave_experts_untouched(base: Path, expert: Path, index: int) -> None:
    """Give ``expert`` the base's weights of the MoE experts in ``_UNTOUCHED_BY``,
    in the file's own layout (one tensor per expert, or fused stacks)."""
    base_weights, weights = load_file(base / "model.safetensors"), load_file(expert / "model.safetensors")
    for name, tensor in weights.items():
        if (match := _PER_EXPERT_KEY.search(name)) and index in _UNTOUCHED_BY.get(int(match[1]), ()):
            weights[name] = base_weights[name].clone()
        elif _FUSED_KEY.search(name):
            for slice_index, untouched_by in _UNTOUCHED_BY.items():
                if index in untouched_by:
                    tensor[slice_index] = base_weights[name][slice_index]
    save_file(weights, expert / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def moe_merge(families, tmp_path_factory):
    """``mergekit-yaml`` of a tiny MoE family (base + 3 experts, see ``_UNTOUCHED_BY``),
    once per session and verbosity (``-v``): returns (paths, output directory,
    completed process)."""
    import yaml

    runs = {}

    def get(architecture: str, verbose: bool = True):
        if (architecture, verbose) not in runs:
            work = tmp_path_factory.mktemp(f"{architecture}-moe")
            paths = [shutil.copytree(p, work / p.name) for p in families(architecture)]
            for index, expert in enumerate(paths[1:], start=1):
                _leave_experts_untouched(paths[0], expert, index)
            config = work / "config.yml"
            config.write_text(yaml.safe_dump({
                "merge_method": "wudi",
                "base_model": str(paths[0]),
                "models": [
                    {"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths[1:], MOE_WEIGHTS)
                ],
                "parameters": {"lambda": MOE_LAMBDA, "iterations": MOE_ITERATIONS},
                "dtype": "float32",
            }))
            out = work / "merged"
            result = run_console_script("mergekit-yaml", config, out, *(["-v"] if verbose else []))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[architecture, verbose] = (paths, out, result)
        return runs[architecture, verbose]

    return get


PER_EXPERT_FILES = {  # how transformers 5 saves them: module, gate, up, down
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def fused_stacks(weights, architecture):
    """A checkpoint's expert stacks under the names mergekit reads and writes,
    assembled from the files here (gate_up = [gate; up] per expert)."""
    if architecture == "llama4":
        return {k: v for k, v in weights.items() if re.search(r"feed_forward\.experts\.\w+$", k)}
    module, gate, up, down = PER_EXPERT_FILES[architecture]
    stacks = {}
    for layer in range(LAYERS):
        def part(expert, name):
            return weights[f"model.layers.{layer}.{module}.experts.{expert}.{name}.weight"]

        prefix = f"model.layers.{layer}.mlp.experts"
        stacks[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([part(e, gate), part(e, up)]) for e in range(EXPERTS)]
        )
        stacks[f"{prefix}.down_proj"] = torch.stack([part(e, down) for e in range(EXPERTS)])
    return stacks
