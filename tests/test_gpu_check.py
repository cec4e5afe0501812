"""The GPU check's CPU dry run (``benchmarks/gpu_check.sh --dry-run``), so that the
script cannot rot between the rare runs on a GPU machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import PARTS

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_says_so(tmp_path):
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
        text=True, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "gpu_summary.txt").read_text()
    assert summary.startswith(f"GPU check (dry run on the CPU): {len(PARTS)} of {len(PARTS)} parts passed")
    assert "install: skipped (--dry-run)" in summary
    for part in PARTS:
        assert f"{part}: passed in" in summary, summary
    # Each part wrote what it is for, not merely a file.
    output = {part: (tmp_path / f"gpu_{part}.txt").read_text() for part in PARTS}
    assert "8 skipped" in output["tests"] and "2 passed" in output["tests"]
    assert "--tensor-device cpu" in output["tests"]
    for table in ("ViT-B/32 shapes, N=3: one Adam step", "Llama-3-8B shapes, N=3: whole solve"):
        assert table in output["solvers"]
    assert "- tf32: worst update difference" in output["tf32"]
    assert "- bfloat16: worst update difference" in output["tf32"]
    assert "| task_arithmetic | - |" in output["merge"] and "| wudi | adam |" in output["merge"]
    assert output["device_fit"].count("| yes | cpu |") == 3
    assert "device fit: every check held" in output["device_fit"]
    assert "python" in (tmp_path / "gpu_install.txt").read_text()


def test_the_gpu_check_without_a_gpu_says_to_dry_run():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--part", "tf32"], cwd=REPO_ROOT,
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2 and "no CUDA device: run with --dry-run" in result.stdout


def test_an_unknown_part_is_refused_by_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--parts", "tests,gpus"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "unknown parts ['gpus']" in result.stderr
