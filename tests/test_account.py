"""What a merge tells about each tensor: a line per tensor under mergekit's -v, one
warning per merge for a linear-looking tensor that fell back; stdout stays clean."""

import logging
import re

import pytest
import torch
import yaml
from mergekit.merge_methods.api import merge_tensors
from safetensors.torch import save_file

from mergekit_wudi import solvers
from tests.conftest import MOE_LAMBDA, MOE_WEIGHTS, fused_stacks, load_weights, run_console_script
from tests.oracle import eq21

LINE = re.compile(r"^INFO:mergekit_wudi:wudi: (\S+) \[([\d, ]*)\]: (.*)$")
STACK = "model.layers.1.mlp.experts.down_proj"


def records(stderr, level):
    """Our log records on stderr; mergekit's progress bar shares it and may precede one."""
    return [
        found[0] for found in (re.search(rf"{level}:mergekit_wudi:.*$", line) for line in stderr.splitlines())
        if found
    ]


def account_lines(stderr):
    return {match[1]: (match[2], match[3]) for match in map(LINE.match, records(stderr, "INFO"))}



@pytest.mark.slow
def test_verbose_gives_every_tensor_one_line(moe_merge):
    paths, out, result = moe_merge("mixtral", True)
    merged = load_weights(out)
    lines = account_lines(result.stderr)
    assert lines.keys() == merged.keys()
    assert len(records(result.stderr, "INFO")) == len(merged)
    assert "wudi" not in result.stdout
    shape, text = lines[STACK]
    assert shape == "4, 32, 12"
    found = re.fullmatch(
        r"adam, expert slices \[out, in\]; 3 of 3 models changed it; "
        r"Eq\. 21 loss (\S+) at the sum, (\S+) solved; (\d+\.\d\d) s",
        text,
    )
    assert found, text
    assert lines["model.embed_tokens.weight"][1].startswith("task arithmetic (vocabulary axis); 3 of 3")
    assert lines["model.norm.weight"][1].startswith("task arithmetic (not a matrix")
    assert lines["model.layers.0.mlp.gate.weight"][1].startswith("adam, [out, in]; 3 of 3 models")

    # The losses, summed over the slices, against Eq. 21 written out.
    base, *experts = [fused_stacks(load_weights(p), "mixtral")[STACK] for p in paths]
    at_sum = at_result = 0.0
    for e in range(len(base)):
        taus = [w * (x[e] - base[e]) for w, x in zip(MOE_WEIGHTS, experts)]
        at_sum += eq21(sum(taus), taus)
        at_result += eq21((merged[STACK][e] - base[e]) / MOE_LAMBDA, taus)
    assert float(found[1]) == pytest.approx(at_sum, rel=1e-3)
    assert float(found[2]) == pytest.approx(at_result, rel=1e-3)
    assert at_result < at_sum


@pytest.mark.slow
def test_a_merge_where_every_linear_layer_is_solved_says_nothing_without_v(moe_merge):
    _, _, result = moe_merge("llama4", False)
    assert "wudi" not in result.stderr and "wudi" not in result.stdout


@pytest.mark.slow
def test_a_linear_looking_tensor_that_falls_back_is_warned_about_once(tmp_path):
    # Raw state dicts (mergekit-pytorch) of a family whose 3-D stacks the rule does not
    # know: two of them, and ordinary tensors.
    generator = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.moe.w_in_proj": torch.randn(4, 8, 6, generator=generator),
        "model.layers.1.moe.w_in_proj": torch.randn(4, 8, 6, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 6, generator=generator),
        "model.layers.0.norm.weight": torch.randn(6, generator=generator),
    }
    paths = []
    for index in range(3):
        path = tmp_path / f"model_{index}.safetensors"
        tensors = base if index == 0 else {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()
        }
        save_file(tensors, path)
        paths.append(path)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(paths[0]),
        "models": [{"model": str(p)} for p in paths[1:]], "parameters": {"iterations": 5},
    }))
    result = run_console_script("mergekit-pytorch", config, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = records(result.stderr, "WARNING")
    assert len(warnings) == 1 and result.stderr.count("mergekit_wudi") == 1, result.stderr
    assert re.fullmatch(
        r"WARNING:mergekit_wudi:wudi: tensor 'model\.layers\.[01]\.moe\.w_in_proj' \[4, 8, 6\]"
        r" looks like a linear layer but gets task arithmetic \(not a matrix or a stack of"
        r" expert matrices\)\. If it is one, set `apply_wudi: always` for it with a filter .*",
        warnings[0],
    ), warnings[0]
    assert "wudi" not in result.stdout


def in_memory(name, shape, ids, **parameters):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=generator)
    models = [base + 0.01 * torch.randn(shape, generator=generator) for _ in ids[1:]]
    return merge_tensors([base, *models], "wudi", base_index=0, ids=ids, name=name, parameters=parameters)


def test_the_warning_is_once_per_set_of_models_and_not_for_what_the_recipe_asked(caplog):
    stacked = "model.layers.0.moe.w_in_proj"
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi"):
        in_memory(stacked, (2, 4, 3), ("account-a", "x", "y"))
        in_memory("model.layers.1.moe.w_in_proj", (2, 4, 3), ("account-a", "x", "y"))
        assert caplog.text.count("looks like a linear layer") == 1
        in_memory(stacked, (2, 4, 3), ("account-b", "x", "y"))
        assert caplog.text.count("looks like a linear layer") == 2
        in_memory(stacked, (2, 4, 3), ("account-c", "x", "y"), apply_wudi="never")
        in_memory("model.layers.0.mlp.up_proj.weight", (4, 3), ("account-c", "x", "y"), apply_wudi="never")
        in_memory("model.layers.0.mamba.conv1d.weight", (4, 1, 3), ("account-c", "x", "y"))
        in_memory(stacked, (2, 4, 3), ("account-c", "x", "y"), apply_wudi="always")
        assert caplog.text.count("looks like a linear layer") == 2


def test_without_v_the_losses_are_not_computed(monkeypatch, caplog):
    def refuse(*args):
        raise AssertionError("interference_losses called")

    monkeypatch.setattr(solvers, "interference_losses", refuse)
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi"):
        in_memory("model.layers.0.mlp.up_proj.weight", (4, 3), ("base", "x", "y"), iterations=3)
    with caplog.at_level(logging.INFO, logger="mergekit_wudi"), pytest.raises(AssertionError, match="called"):
        in_memory("model.layers.0.mlp.up_proj.weight", (4, 3), ("base", "x", "y"), iterations=3)
