"""Real console-script merges of tiny LLaMA, GPT-2 and BERT families, checked tensor by tensor.

Which tensors must get WUDI is written out here per architecture, independently
of mergekit_wudi.tensor_rules; WUDI tensors are compared to the authors'
formulation, the others to mergekit's own task_arithmetic.
"""

import math
import re
import shutil

import pytest
import torch
import transformers
import yaml
from mergekit.merge_methods.api import merge_tensors

from tests.conftest import load_weights, run_console_script
from tests.oracle import (
    authors_wudi,
    clamped_spectrum,
    participation_sqrt_rank,
    relative_error,
    spectral_reference,
)

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


def check_merged_tensors(architecture, paths, out, solve, lam=LAMBDA):
    """WUDI tensors equal ``base + lam * solve(task vectors)`` on the [out, in] view,
    the others mergekit's task arithmetic; returns how many were solved."""
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
                expected = solve([tau.T for tau in taus]).T
            else:
                expected = solve(taus)
            assert relative_error(tensor - base[name], lam * expected) < 2e-5, name
            solved += 1
        elif tensor.is_floating_point():
            expected = merge_tensors(
                [base[name], *(expert[name] for expert in experts)], "task_arithmetic",
                base_index=0, name=name, parameters={"weight": 1.0, "lambda": lam},
            )
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(tensor, base[name]), name
    assert solved >= 2 * 4, "the architecture's linear layers were found"
    return merged


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert"])
def test_console_script_merge(architecture, families, merged_family):
    paths = families(architecture)
    out = merged_family(architecture)
    merged = check_merged_tensors(
        architecture, paths, out, lambda taus: authors_wudi(taus, iterations=ITERATIONS)
    )

    model, info = LOADERS[architecture].from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, parameter in model.state_dict().items():
        if name in merged:
            assert torch.equal(parameter, merged[name]), name


def test_spectral_solver_through_mergekit_yaml(families, tmp_path):
    # The authors' ASWUDI, written as a user would: YAML's .inf and auto.
    base, *experts = families("llama")
    config = tmp_path / "config.yml"
    config.write_text(
        f"merge_method: wudi\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {expert}\n" for expert in experts)
        + f"parameters:\n  lambda: {LAMBDA}\n  solver: spectral\n  flow_time: .inf\n"
        "  rank_ratio: auto\ndtype: float32\n"
    )
    result = run_console_script("mergekit-yaml", config, tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]

    def aswudi(taus):
        kept = participation_sqrt_rank(clamped_spectrum(taus))
        return spectral_reference(taus, math.inf, kept)

    check_merged_tensors("llama", [base, *experts], tmp_path / "merged", aswudi)


def test_model_card_names_the_method(merged_family):
    card = (merged_family("llama") / "README.md").read_text()
    assert "[WUDI-Merging](https://arxiv.org/abs/2503.08099)" in card
