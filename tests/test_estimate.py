"""mergekit-wudi-estimate: the recipe through mergekit's planner, shapes from headers, one line per solver."""

import os
import subprocess
import sys

import pytest
import yaml

from mergekit.options import MergeOptions
from mergekit_wudi.estimate import plan
from mergekit_wudi.parameters import Solver
from mergekit_wudi.report.binding import read_recipe


def write_recipe(path, paths, **parameters):
    base, *experts = paths
    path.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(expert)} for expert in experts], "parameters": parameters,
    }))
    return path


def test_plan_lists_each_tensor_with_its_view_and_resolved_parameters(families, tmp_path):
    # A filter: self_attn weights get 500 steps, the rest 300; lm_head stays task arithmetic.
    recipe = write_recipe(tmp_path / "r.yml", families("llama"),
                          iterations=[{"filter": "self_attn", "value": 500}, {"value": 300}])
    config, _ = read_recipe(recipe)
    tensors, unknown = plan(config, MergeOptions())
    assert unknown == []
    by_name = {tensor.name: tensor for tensor in tensors}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q.problems, q.experts, q.parameters["iterations"]) == ([(64, 64)], 3, 500)
    down = by_name["model.layers.1.mlp.down_proj.weight"]
    assert (down.problems, down.parameters["iterations"]) == ([(64, 96)], 300)
    assert by_name["lm_head.weight"].problems == []
    assert by_name["model.norm.weight"].problems == []
    assert sum(bool(tensor.problems) for tensor in tensors) == 14  # 7 linear weights x 2 layers
    # float32 headers: 4 models read, 1 written.
    assert q.read_bytes == 4 * 64 * 64 * 4 and q.written_bytes == 64 * 64 * 4


def test_gpt2_conv1d_weights_are_estimated_in_their_out_in_view(families, tmp_path):
    config, _ = read_recipe(write_recipe(tmp_path / "r.yml", families("gpt2")))
    tensors, _ = plan(config, MergeOptions())
    c_fc = next(t for t in tensors if t.name.endswith("h.0.mlp.c_fc.weight"))
    assert list(c_fc.shape) == [48, 192] and c_fc.problems == [(192, 48)]


@pytest.mark.slow
def test_console_script_prints_every_solver(families, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", families("llama"), solver="spectral")
    done = subprocess.run([sys.executable, "-m", "mergekit_wudi.estimate", str(recipe)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "14 solved by WUDI" in done.stdout
    for solver in Solver:
        assert f"| {solver.value}" in done.stdout
    assert "| spectral (the recipe's) |" in done.stdout


def test_a_recipe_of_another_method_is_refused(families, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(path), "parameters": {"weight": 1.0}} for path in families("llama")]}))
    with pytest.raises(ValueError, match="mergekit-wudi-estimate reads recipes with merge_method: wudi"):
        read_recipe(recipe, tool="mergekit-wudi-estimate")

