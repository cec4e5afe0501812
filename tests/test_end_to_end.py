"""Real console-script merges of tiny LLaMA, GPT-2 and BERT families, checked tensor by tensor.

Which tensors must get WUDI is written out here per architecture, independently
of mergekit_wudi.tensor_rules; WUDI tensors are compared to the authors'
formulation, the others to mergekit's own task_arithmetic.
"""

import re
import shutil

import pytest
import torch
import transformers
import yaml
from mergekit.merge_methods.api import merge_tensors

from tests.conftest import load_weights, run_console_script
from tests.oracle import authors_wudi, relative_error

WUDI_TENSORS = {
    "llama": (re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"), False),
    "gpt2": (re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"), True),
    "bert": (
        re.compile(
            r"(encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
            r"|intermediate\.dense|output\.dense)|pooler\.dense)\.weight$"
        ),
        False,
    ),
}
LOADERS = {
    "llama": transformers.LlamaForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "bert": transformers.BertModel,
}
LAMBDA = 0.5
ITERATIONS = 60


def write_config(path, paths, **extra):
    base, *experts = paths
    config = {
        "merge_method": "wudi",
        "base_model": str(base),
        "models": [{"model": str(expert)} for expert in experts],
        "parameters": {"lambda": LAMBDA, "iterations": ITERATIONS},
        "dtype": "float32",
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def merge(architecture, paths, out, config):
    if architecture == "bert":
        # mergekit-yaml 0.1.5 crashes on BertModel (see README); merge the raw
        # weights with mergekit-pytorch and take the config from the base.
        raw = [p / "model.safetensors" for p in paths]
        write_config(config, raw)
        result = run_console_script("mergekit-pytorch", config, out)
        shutil.copy(paths[0] / "config.json", out / "config.json")
    else:
        write_config(config, paths)
        result = run_console_script("mergekit-yaml", config, out)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def merged_family(families, tmp_path_factory):
    """The merge output directory for an architecture, made once per module."""
    outputs = {}

    def get(architecture):
        if architecture not in outputs:
            work = tmp_path_factory.mktemp(f"{architecture}-merge")
            merge(architecture, families(architecture), work / "merged", work / "config.yml")
            outputs[architecture] = work / "merged"
        return outputs[architecture]

    return get


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert"])
def test_console_script_merge(architecture, families, merged_family):
    paths = families(architecture)
    out = merged_family(architecture)

    base, *experts = [load_weights(p) for p in paths]
    merged = load_weights(out)
    assert set(merged) == set(base), "every tensor written, nothing extra"

    pattern, transposed = WUDI_TENSORS[architecture]
    solved = 0
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
        if pattern.search(name):
            taus = [expert[name] - base[name] for expert in experts]
            if transposed:
                expected = authors_wudi([tau.T for tau in taus], iterations=ITERATIONS).T
            else:
                expected = authors_wudi(taus, iterations=ITERATIONS)
            assert relative_error(tensor - base[name], LAMBDA * expected) < 2e-5, name
            solved += 1
        elif tensor.is_floating_point():
            expected = merge_tensors(
                [base[name], *(expert[name] for expert in experts)], "task_arithmetic",
                base_index=0, name=name, parameters={"weight": 1.0, "lambda": LAMBDA},
            )
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(tensor, base[name]), name
    assert solved >= 2 * 4, "the architecture's linear layers were found"

    model, info = LOADERS[architecture].from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, parameter in model.state_dict().items():
        if name in merged:
            assert torch.equal(parameter, merged[name]), name


def test_model_card_names_the_method(merged_family):
    card = (merged_family("llama") / "README.md").read_text()
    assert "[WUDI-Merging](https://arxiv.org/abs/2503.08099)" in card
