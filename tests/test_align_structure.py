import copy

import pytest
import torch
import transformers

from mergekit_wudi.align.permute import permute_model
from mergekit_wudi.align.structure import UnsupportedModel, read_structure
from tests.align_models import FAMILIES, VOCAB, outputs, random_permutation, shapes, tiny_model

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
# float32 rounding of a reordered sum, relative to outputs of size ~1.
TOLERANCE = 2e-5


def _permuted(model, structure, only=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    permutations = structure.identity()
    for number, group in enumerate(structure.groups):
        if only is None or number == only:
            permutations[number] = random_permutation(group, generator)
    permuted = copy.deepcopy(model)
    permute_model(structure, permuted, permutations)
    return permuted, permutations


@pytest.mark.parametrize("family", FAMILIES)
def test_every_group_preserves_the_function(family):
    model = tiny_model(family)
    structure = read_structure(model.config, shapes(model))
    expected = outputs(model, IDS)
    for number, group in enumerate(structure.groups):
        permuted, permutations = _permuted(model, structure, only=number)
        assert not torch.equal(permutations[number], torch.arange(group.units)), group.name
        changed = [n for n, t in permuted.state_dict().items() if not torch.equal(t, model.state_dict()[n])]
        assert changed, f"{group.name} moved nothing"
        torch.testing.assert_close(outputs(permuted, IDS), expected, atol=TOLERANCE, rtol=0, msg=group.name)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_groups_together_preserve_the_function(family):
    model = tiny_model(family)
    structure = read_structure(model.config, shapes(model))
    permuted, _ = _permuted(model, structure)
    torch.testing.assert_close(outputs(permuted, IDS), outputs(model, IDS), atol=TOLERANCE, rtol=0)


def test_a_permutation_outside_the_groups_changes_the_function():
    # The test above can fail: moving q/k dims within a head breaks RoPE.
    model = tiny_model("llama")
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("q_proj", "k_proj"):
            weight = getattr(permuted.model.layers[0].self_attn, name).weight
            weight.copy_(weight.view(-1, 8, 32).flip(1).reshape(weight.shape))
    assert (outputs(permuted, IDS) - outputs(model, IDS)).abs().max() > 1e-3


@pytest.mark.parametrize("family, expected", [
    ("llama", {"residual", "layers.0.mlp", "layers.0.heads", "layers.0.query_heads"}),
    ("qwen2", {"residual", "layers.0.mlp", "layers.0.heads", "layers.0.query_heads"}),
    ("gpt2", {"residual", "layers.0.mlp", "layers.0.heads", "layers.0.qk_dims"}),
    ("bert", {"residual", "layers.0.mlp", "layers.0.heads", "layers.0.qk_dims"}),
    # A headless encoder's output is the residual stream itself: it stays in place.
    ("bert_encoder", {"layers.0.mlp", "layers.0.heads", "layers.0.qk_dims"}),
])
def test_groups_per_family(family, expected):
    model = tiny_model(family)
    names = {group.name for group in read_structure(model.config, shapes(model)).groups}
    assert {name for name in names if not name.startswith("layers.1.")} == expected


def test_tied_embeddings_stay_tied():
    model = tiny_model("qwen3")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    structure = read_structure(model.config, shapes(model))
    permuted, _ = _permuted(model, structure)
    assert permuted.lm_head.weight is permuted.model.embed_tokens.weight
    assert not torch.equal(permuted.lm_head.weight, model.lm_head.weight)


def test_unsupported_architecture_is_named():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, architectures=["OPTForCausalLM"])
    with pytest.raises(UnsupportedModel, match=r"OPTForCausalLM \(model_type 'opt'\) is not supported"):
        read_structure(config, {})


def test_unknown_parameter_is_named():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedModel, match=r"LlamaForCausalLM: .*unknown layout: model.extra.weight"):
        read_structure(model.config, {**shapes(model), "model.extra.weight": (4, 4)})
    missing = {k: v for k, v in shapes(model).items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(UnsupportedModel, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        read_structure(model.config, missing)
