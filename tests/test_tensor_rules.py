"""Which tensors get WUDI, and in which orientation."""

import pytest

from mergekit_wudi.tensor_rules import ApplyWudi, Layout, is_linear_weight, wudi_layout

LINEAR = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.11.mlp.down_proj.weight",
    "encoder.layer.3.attention.self.query.weight",
    "encoder.layer.3.output.dense.weight",
    "pooler.dense.weight",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",  # OpenCLIP: ordinary Linear
    "visual.transformer.resblocks.0.attn.in_proj_weight",
]
NOT_LINEAR = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "bert.embeddings.word_embeddings.weight",
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "vision_model.embeddings.position_embedding.weight",
    "shared.weight",
    "classifier.weight",
    "score.weight",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "model.layers.0.self_attn.q_proj.bias",
]


@pytest.mark.parametrize("name", LINEAR)
def test_linear_weights_get_wudi(name):
    assert is_linear_weight(name, vocabulary_axis=None)
    assert wudi_layout(name, (8, 4), None) == Layout.OUT_IN


@pytest.mark.parametrize("name", NOT_LINEAR)
def test_tables_heads_and_biases_fall_back(name):
    assert wudi_layout(name, (8, 4), None) is None


def test_vocabulary_axis_means_fallback_whatever_the_name():
    assert wudi_layout("model.layers.0.mlp.up_proj.weight", (8, 4), 0) is None


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (2, 3, 4, 5), ()])
def test_only_matrices_get_wudi_even_when_forced(shape):
    assert wudi_layout("x.weight", shape, None, ApplyWudi.ALWAYS) is None


def test_overrides():
    assert wudi_layout("lm_head.weight", (8, 4), 0, ApplyWudi.ALWAYS) == Layout.OUT_IN
    assert wudi_layout("model.layers.0.mlp.up_proj.weight", (8, 4), None, ApplyWudi.NEVER) is None
    assert wudi_layout("a.weight", (8, 4), None, layout=Layout.IN_OUT) == Layout.IN_OUT


@pytest.mark.parametrize(
    "name",
    [
        "transformer.h.0.attn.c_attn.weight",
        "h.11.attn.c_proj.weight",
        "transformer.h.3.mlp.c_fc.weight",
        "transformer.h.3.mlp.c_proj.weight",
        "transformer.h.2.crossattention.q_attn.weight",
    ],
)
def test_gpt2_conv1d_is_solved_transposed(name):
    assert wudi_layout(name, (48, 144), None) == Layout.IN_OUT
