import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

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
