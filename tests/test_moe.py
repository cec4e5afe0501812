"""Mixture-of-experts families: every expert's slice of a fused stack is one WUDI problem.

The orientation of each family's slices is measured here on transformers' own
modules (which coordinate a changed entry touches), not read from names; the
merges run through ``mergekit-yaml`` and are compared slice by slice with the
authors' formulation.
"""

import re

import pytest
import torch
import transformers
from mergekit.architecture import arch_info_for_config
from mergekit.common import ModelReference
from mergekit.io.tasks import LoadTensor
from safetensors.torch import load_file, save_file

from mergekit_wudi.demo import model_class, tiny_config
from mergekit_wudi.tensor_rules import Layout, tensor_fate
from tests.conftest import (
    EXPERTS,
    LAYERS,
    MOE_ITERATIONS,
    MOE_LAMBDA,
    MOE_WEIGHTS,
    fused_stacks,
    load_weights,
)
from tests.oracle import authors_wudi, relative_error

MOE_FAMILIES = ["mixtral", "qwen3_moe", "glm4_moe", "llama4", "qwen3_vl_moe", "granitemoehybrid"]


# 1. Orientation, from the modules' forward ---------------------------------------------


def save_tiny(architecture, directory):
    """A tiny model that routes every token through every expert, saved."""
    config = tiny_config(architecture)
    text = config.get_text_config()
    text.num_experts_per_tok = getattr(text, "num_local_experts", None) or getattr(
        text, "num_experts", None
    ) or text.n_routed_experts
    torch.manual_seed(0)
    model = model_class(architecture)(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory)
    return directory


def stacks_as_mergekit_reads_them(directory):
    """Every 3-D tensor of mergekit's architecture for the checkpoint, read by mergekit."""
    config = transformers.AutoConfig.from_pretrained(directory)
    model = ModelReference.parse(str(directory))
    stacks = {}
    for weight in arch_info_for_config(config).all_weights(config):
        tensor = LoadTensor(
            model=model, tensor=weight.name, optional=weight.optional, aliases=weight.aliases,
            tied_names=weight.tied_names,
        ).execute()
        if tensor is not None and tensor.ndim == 3:
            stacks[weight.name] = tensor
    return stacks


def block_output(block, hidden):
    output = block(hidden)
    return output[0] if isinstance(output, tuple) else output


def measured_layout(model, parameter_name, transposed, expert=1, a=1, b=2):
    """How the file's slices are stored, from what one changed entry (a, b) of the
    file's slice touches in the MoE block's forward: the first projection's input
    is the block's input, the second's output the block's output."""
    module_name, attribute = parameter_name.rsplit(".", 1)
    block = model.get_submodule(module_name.rsplit(".", 1)[0])
    parameter = model.get_parameter(parameter_name)
    size = model.config.get_text_config().hidden_size
    hidden = torch.randn(1, 5, size, generator=torch.Generator().manual_seed(0))
    perturbed = parameter.detach().clone()
    perturbed[(expert, b, a) if transposed else (expert, a, b)] += 0.5

    def effect(x):
        with torch.no_grad():
            before = block_output(block, x)
            original = parameter.data.clone()
            parameter.data.copy_(perturbed)
            after = block_output(block, x)
            parameter.data.copy_(original)
        return after - before

    if attribute == "gate_up_proj":
        # The entry's input coordinate is the one that, zeroed, removes its effect.
        silenced = {k for k in (a, b) if not effect(hidden.index_fill(-1, torch.tensor([k]), 0.0)).any()}
        assert len(silenced) == 1, silenced
        return Layout.OUT_IN if silenced == {b} else Layout.IN_OUT
    assert attribute == "down_proj", parameter_name
    moved = set(effect(hidden).reshape(-1, size).any(dim=0).nonzero().flatten().tolist())
    assert moved in ({a}, {b}), moved
    return Layout.OUT_IN if moved == {a} else Layout.IN_OUT


def transformers_parameter(model, stack):
    """The 3-D parameter the file's stack becomes, and whether transformers transposed it."""
    for name, parameter in model.named_parameters():
        if parameter.shape == stack.shape and torch.equal(parameter, stack):
            return name, False
        if parameter.ndim == 3 and parameter.shape == stack.transpose(1, 2).shape and torch.equal(
            parameter, stack.transpose(1, 2)
        ):
            return name, True
    raise AssertionError("no parameter holds this stack")


def released_qwen3_vl_layout(directory):
    """Qwen's released Qwen3-VL-MoE checkpoints store the stacks transposed, [E, H, 2I]."""
    path = directory / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if re.search(r"mlp\.experts\.(gate_up_proj|down_proj)$", name):
            weights[name] = weights[name].transpose(1, 2).contiguous()
    save_file(weights, path, metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("architecture", MOE_FAMILIES + ["qwen3_vl_moe released"])
def test_slice_orientation_is_the_modules(architecture, tmp_path):
    family = architecture.split()[0]
    directory = save_tiny(family, tmp_path / family)
    if architecture.endswith("released"):
        released_qwen3_vl_layout(directory)
    model = model_class(family).from_pretrained(directory)
    stacks = stacks_as_mergekit_reads_them(directory)
    experts_found = 0
    for name, stack in stacks.items():
        parameter, transposed = transformers_parameter(model, stack)
        owner = type(model.get_submodule(parameter.rsplit(".", 1)[0])).__name__
        fate = tensor_fate(name, stack.shape, None)
        if not owner.endswith("Experts"):  # Granite's mamba conv1d, [C, 1, K]
            assert not fate.solved, name
            continue
        experts_found += 1
        assert fate.stacked and fate.layout == measured_layout(model, parameter, transposed), name
    assert experts_found == 2 * (1 if family == "glm4_moe" else 2)  # GLM-4-MoE: layer 0 dense


# 2. Merges through mergekit-yaml -------------------------------------------------------

# Established by test_slice_orientation_is_the_modules.
SLICES_IN_OUT = {"mixtral": False, "qwen3_moe": False, "llama4": True}
ROUTERS = {  # name in the files -> name mergekit writes
    "mixtral": ("model.layers.{}.block_sparse_moe.gate.weight", "model.layers.{}.mlp.gate.weight"),
    "qwen3_moe": ("model.layers.{}.mlp.gate.weight", "model.layers.{}.mlp.gate.weight"),
    "llama4": ("language_model.model.layers.{}.feed_forward.router.weight",) * 2,
}


MERGED = [("mixtral", True), ("qwen3_moe", True), ("llama4", False)]


@pytest.mark.slow
@pytest.mark.parametrize("architecture,verbose", MERGED)
def test_every_expert_slice_is_the_oracle_on_that_slice_alone(architecture, verbose, moe_merge):
    paths, out, _ = moe_merge(architecture, verbose)
    base, *experts = [fused_stacks(load_weights(path), architecture) for path in paths]
    merged = load_weights(out)
    assert len(base) == 2 * LAYERS
    cases = {"untouched": 0, "one": 0, "solved": 0}
    for name, base_stack in base.items():
        assert merged[name].shape == base_stack.shape == (EXPERTS, *base_stack.shape[1:])
        for e in range(EXPERTS):
            result, base_slice = merged[name][e], base_stack[e]
            changed = [
                (w, x[name][e]) for w, x in zip(MOE_WEIGHTS, experts)
                if not torch.equal(x[name][e], base_slice)
            ]
            if not changed:
                assert torch.equal(result, base_slice), (name, e)
                cases["untouched"] += 1
            elif len(changed) == 1:
                weight, only = changed[0]
                assert MOE_LAMBDA * weight == 1 and torch.equal(result, only), (name, e)
                cases["one"] += 1
            else:
                taus = [w * (x - base_slice) for w, x in changed]
                if SLICES_IN_OUT[architecture]:
                    expected = authors_wudi([tau.T for tau in taus], iterations=MOE_ITERATIONS).T
                else:
                    expected = authors_wudi(taus, iterations=MOE_ITERATIONS)
                assert relative_error(result - base_slice, MOE_LAMBDA * expected) < 2e-5, (name, e)
                cases["solved"] += 1
    # Layer 0's stacks: expert 0 untouched, expert 1 changed by expert_1 alone.
    assert cases == {"untouched": 2, "one": 2, "solved": 4 * EXPERTS - 4}


@pytest.mark.slow
@pytest.mark.parametrize("architecture,verbose", MERGED)
def test_routers_are_linear_layers(architecture, verbose, moe_merge):
    paths, out, _ = moe_merge(architecture, verbose)
    source, target = ROUTERS[architecture]
    base, *experts = [load_weights(path) for path in paths]
    merged = load_weights(out)
    for layer in range(LAYERS):
        taus = [w * (x[source.format(layer)] - base[source.format(layer)]) for w, x in zip(MOE_WEIGHTS, experts)]
        expected = MOE_LAMBDA * authors_wudi(taus, iterations=MOE_ITERATIONS)
        assert relative_error(merged[target.format(layer)] - base[source.format(layer)], expected) < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("architecture,verbose", MERGED)
def test_output_loads_with_transformers(architecture, verbose, moe_merge):
    _, out, _ = moe_merge(architecture, verbose)
    model, info = model_class(architecture).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    stacks = {k: v for k, v in load_weights(out).items() if re.search(r"experts\.\w+$", k)}
    assert len(stacks) == 2 * LAYERS
    for name, tensor in stacks.items():
        assert torch.equal(state[name], tensor), name
