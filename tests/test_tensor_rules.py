"""Which tensors get WUDI, and in which orientation.

The orientation of MoE expert stacks is established against transformers'
modules in tests/test_moe.py.
"""

import pytest

from mergekit_wudi.tensor_rules import (
    ApplyWudi,
    Fallback,
    Layout,
    TensorFate,
    looks_like_linear_layer,
    tensor_fate,
)


def wudi_layout(name, shape, vocabulary_axis, apply_wudi=ApplyWudi.AUTO, layout=Layout.AUTO):
    """The stored layout of a plain (not stacked) solved matrix, or None."""
    fate = tensor_fate(name, shape, vocabulary_axis, apply_wudi, layout)
    assert not fate.stacked
    return fate.layout

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
    assert tensor_fate(name, (8, 4), None).solved
    assert wudi_layout(name, (8, 4), None) == Layout.OUT_IN


@pytest.mark.parametrize("name", NOT_LINEAR)
def test_tables_heads_and_biases_fall_back(name):
    fate = tensor_fate(name, (8, 4), None)
    assert fate == TensorFate(reason=fate.reason) and fate.reason in (
        Fallback.TABLE_OR_HEAD, Fallback.NOT_A_WEIGHT
    )
    assert fate.describe() == f"task arithmetic ({fate.reason.value})"


def test_vocabulary_axis_means_fallback_whatever_the_name():
    fate = tensor_fate("model.layers.0.mlp.up_proj.weight", (8, 4), 0)
    assert fate == TensorFate(reason=Fallback.VOCABULARY_AXIS)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (2, 3, 4, 5), ()])
def test_other_ranks_and_unknown_3d_tensors_fall_back(shape):
    assert tensor_fate("x.weight", shape, None) == TensorFate(reason=Fallback.NOT_A_MATRIX)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4, 5), ()])
def test_only_matrices_and_stacks_get_wudi_even_when_forced(shape):
    assert tensor_fate("x.weight", shape, None, ApplyWudi.ALWAYS) == TensorFate(
        reason=Fallback.NOT_A_MATRIX
    )


def test_overrides():
    assert wudi_layout("lm_head.weight", (8, 4), 0, ApplyWudi.ALWAYS) == Layout.OUT_IN
    assert wudi_layout("model.layers.0.mlp.up_proj.weight", (8, 4), None, ApplyWudi.NEVER) is None
    assert wudi_layout("a.weight", (8, 4), None, layout=Layout.IN_OUT) == Layout.IN_OUT


# Names from mergekit 0.1.5's architecture files (mixtral, qwen3_moe, glm4moe,
# qwen3_vl, llama4, granite4moehybrid), with a tiny shape.
STACKS = [
    ("model.layers.0.mlp.experts.gate_up_proj", (4, 48, 16), Layout.OUT_IN),
    ("model.layers.7.mlp.experts.down_proj", (4, 16, 24), Layout.OUT_IN),
    ("language_model.model.layers.0.feed_forward.experts.gate_up_proj", (4, 16, 48), Layout.IN_OUT),
    ("language_model.model.layers.0.feed_forward.experts.down_proj", (4, 24, 16), Layout.IN_OUT),
    ("model.layers.0.block_sparse_moe.input_linear.weight", (4, 48, 16), Layout.OUT_IN),
    ("model.layers.0.block_sparse_moe.output_linear.weight", (4, 16, 24), Layout.OUT_IN),
    # Qwen3-VL-MoE, hidden 32 > 2 * intermediate 24: transformers 5's layout ...
    ("model.language_model.layers.0.mlp.experts.gate_up_proj", (4, 24, 32), Layout.OUT_IN),
    ("model.language_model.layers.0.mlp.experts.down_proj", (4, 32, 12), Layout.OUT_IN),
    # ... and the released checkpoints' (transformers 4's).
    ("model.language_model.layers.0.mlp.experts.gate_up_proj", (4, 32, 24), Layout.IN_OUT),
    ("model.language_model.layers.0.mlp.experts.down_proj", (4, 12, 32), Layout.IN_OUT),
]


@pytest.mark.parametrize("name,shape,layout", STACKS)
def test_expert_stacks_are_solved_slice_by_slice(name, shape, layout):
    fate = tensor_fate(name, shape, None)
    assert fate == TensorFate(layout=layout, stacked=True)
    assert fate.describe() == f"expert slices {'[out, in]' if layout == Layout.OUT_IN else '[in, out]'}"
    # The override and the opt-out reach stacks too.
    assert tensor_fate(name, shape, None, layout=Layout.IN_OUT).layout == Layout.IN_OUT
    assert tensor_fate(name, shape, None, ApplyWudi.ALWAYS) == fate
    assert tensor_fate(name, shape, None, ApplyWudi.NEVER) == TensorFate(reason=Fallback.NEVER)


def test_any_3d_tensor_is_a_stack_when_forced():
    assert tensor_fate("conv.weight", (8, 1, 4), None, ApplyWudi.ALWAYS) == TensorFate(
        layout=Layout.OUT_IN, stacked=True
    )


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.mlp.gate.weight",  # the MoE router is an ordinary linear layer
        "model.layers.0.mlp.router.gate.weight",  # AFMoE
        "model.layers.0.mlp.experts.3.down_proj.weight",  # AFMoE's separate experts
        "model.layers.0.mlp.shared_experts.up_proj.weight",
        "model.layers.0.feed_forward.shared_expert.gate_proj.weight",
        "model.layers.0.shared_mlp.input_linear.weight",
    ],
)
def test_routers_and_shared_experts_are_ordinary_linear_layers(name):
    assert tensor_fate(name, (8, 4), None) == TensorFate(layout=Layout.OUT_IN)


def test_what_looks_like_a_linear_layer():
    assert looks_like_linear_layer("model.layers.0.mlp.up_proj.weight", (8, 4))
    assert looks_like_linear_layer("model.layers.0.moe.w_stack_proj", (2, 8, 4))
    assert looks_like_linear_layer("encoder.layer.3.output.dense.weight", (8, 4))
    assert not looks_like_linear_layer("model.layers.0.mlp.up_proj.bias", (8,))
    assert not looks_like_linear_layer("model.layers.0.mamba.conv1d.weight", (8, 1, 4))
    assert not looks_like_linear_layer("model.embed_tokens.weight", (8, 4))
    assert not looks_like_linear_layer("vision.patch_embed.proj.weight", (8, 3, 2, 2))


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
