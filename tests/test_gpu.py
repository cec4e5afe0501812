"""GPU checks: run where CUDA exists (the README records the device they ran on)."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from mergekit_wudi import solvers
from tests.conftest import load_weights, run_console_script
from tests.oracle import authors_wudi, relative_error, structured_task_vectors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_solver_runs_on_the_tensors_device_and_matches_cpu():
    taus = structured_task_vectors(4, 256, 192, seed=2)
    on_gpu = solvers.wudi_adam([tau.cuda() for tau in taus])
    assert on_gpu.device.type == "cuda"
    assert relative_error(on_gpu.cpu(), solvers.wudi_adam(taus)) < 1e-4


@pytest.mark.parametrize("float64_matmuls", [True, False])
def test_both_precisions_on_the_gpu_follow_the_authors_loop(float64_matmuls):
    taus = structured_task_vectors(3, 192, 128, seed=5)
    on_gpu = solvers.wudi_adam([tau.cuda() for tau in taus], float64_matmuls=float64_matmuls)
    assert relative_error(on_gpu.cpu(), authors_wudi(taus)) < 1e-5


def test_merge_tensors_on_cuda_keeps_dtype_and_device():
    taus = structured_task_vectors(3, 64, 48, seed=4)
    base = torch.zeros(64, 48, device="cuda", dtype=torch.bfloat16)
    merged = merge_tensors(
        [base, *(tau.cuda().bfloat16() for tau in taus)], "wudi", base_index=0,
        name="model.layers.0.mlp.up_proj.weight",
    )
    assert merged.device.type == "cuda" and merged.dtype == torch.bfloat16


@pytest.mark.parametrize("flags", [["--cuda"], ["--device", "cuda:0"], ["--cuda", "--multi-gpu"]])
def test_mergekit_yaml_device_flags(flags, families, tmp_path):
    import yaml

    base, *experts = families("llama")
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base),
        "models": [{"model": str(e)} for e in experts], "dtype": "float32",
    }))
    cpu_out, gpu_out = tmp_path / "cpu", tmp_path / "gpu"
    assert run_console_script("mergekit-yaml", config, cpu_out).returncode == 0
    result = run_console_script("mergekit-yaml", config, gpu_out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    cpu, gpu = load_weights(cpu_out), load_weights(gpu_out)
    for name in cpu:
        assert relative_error(gpu[name], cpu[name]) < 1e-4, name


def test_interference_report_on_cuda_matches_cpu(families, tmp_path):
    import json

    import yaml

    base, *experts = families("llama")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base),
        "models": [{"model": str(e)} for e in experts], "dtype": "float32",
    }))
    reports = {}
    for name, flags in (("cpu", []), ("cuda", ["--cuda"])):
        result = run_console_script("mergekit-wudi-report", recipe, tmp_path / name, "--quiet", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())["tensors"]
    for cpu, gpu in zip(reports["cpu"], reports["cuda"]):
        assert cpu["name"] == gpu["name"] and cpu["fate"] == gpu["fate"]
        if cpu["fate"] == "wudi":
            for point, loss in cpu["loss"].items():
                assert gpu["loss"][point] == pytest.approx(loss, rel=1e-4), (cpu["name"], point)
