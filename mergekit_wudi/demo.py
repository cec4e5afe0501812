"""Tiny offline model families for the demo merge and the tests.

``python -m mergekit_wudi.demo DIR`` writes ``DIR/base`` and ``DIR/expert_{1,2,3}``:
a small LLaMA-architecture base with random weights and three "fine-tunes" whose
task vectors are low rank plus noise, like real fine-tuning updates. Nothing is
downloaded. ``--architecture`` picks another family, among them mixture-of-experts
ones (``mixtral``, ``qwen3_moe``, ``llama4``, ...), whose experts' weights are
perturbed expert by expert.
"""

import argparse
import os
from pathlib import Path
from typing import List

import torch

ARCHITECTURES = (
    "llama", "gpt2", "bert",
    "mixtral", "qwen3_moe", "glm4_moe", "llama4", "qwen3_vl_moe", "granitemoehybrid",
)
# Mixture-of-experts families: hidden size 32 larger than twice the experts' 12,
# as in released MoE models (see tensor_rules on Qwen3-VL-MoE).
_MOE_TEXT = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
)
_MOE_EXPERTS = 4


def _tiny_moe_config(architecture: str):
    import transformers

    if architecture == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=12, num_local_experts=_MOE_EXPERTS, num_experts_per_tok=2,
            **_MOE_TEXT,
        )
    # The others: a dense MLP of 24 where a family has one, experts of 12.
    sizes = dict(intermediate_size=24, moe_intermediate_size=12, num_experts_per_tok=2)
    if architecture == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=_MOE_EXPERTS, **sizes, **_MOE_TEXT)
    if architecture == "glm4_moe":
        # First layer dense, as in GLM-4.5.
        return transformers.Glm4MoeConfig(
            n_routed_experts=_MOE_EXPERTS, n_shared_experts=1, first_k_dense_replace=1,
            n_group=1, topk_group=1, **sizes, **_MOE_TEXT,
        )
    if architecture == "qwen3_vl_moe":
        return transformers.Qwen3VLMoeConfig(
            text_config=dict(num_experts=_MOE_EXPERTS, **sizes, **_MOE_TEXT),
            # mergekit's qwen3_vl.json expects three deepstack mergers.
            vision_config=dict(
                depth=3, hidden_size=16, intermediate_size=24, num_heads=2,
                out_hidden_size=32, deepstack_visual_indexes=[0, 1, 2],
            ),
        )
    if architecture == "llama4":
        return transformers.Llama4Config(
            text_config=transformers.Llama4TextConfig(
                intermediate_size=12, intermediate_size_mlp=24, num_local_experts=_MOE_EXPERTS,
                num_experts_per_tok=1, **_MOE_TEXT,
            ),
            vision_config=transformers.Llama4VisionConfig(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                image_size=16, patch_size=8, vision_output_dim=16, projector_input_dim=16,
                projector_output_dim=32,
            ),
        )
    if architecture == "granitemoehybrid":
        return transformers.GraniteMoeHybridConfig(
            intermediate_size=12, shared_intermediate_size=24, num_local_experts=_MOE_EXPERTS,
            num_experts_per_tok=2, layer_types=["mamba", "attention"], mamba_n_heads=4,
            mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_expand=2,
            **{k: v for k, v in _MOE_TEXT.items() if k != "head_dim"},
        )
    return None


def tiny_config(architecture: str):
    import transformers

    moe = _tiny_moe_config(architecture)
    if moe is not None:
        return moe
    if architecture == "llama":
        return transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    if architecture == "gpt2":
        return transformers.GPT2Config(
            vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64,
        )
    if architecture == "bert":
        return transformers.BertConfig(
            vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64,
        )
    raise ValueError(f"unknown architecture {architecture!r}; choose from {ARCHITECTURES}")


def model_class(architecture: str):
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertModel,
        "mixtral": transformers.MixtralForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "glm4_moe": transformers.Glm4MoeForCausalLM,
        "llama4": transformers.Llama4ForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "granitemoehybrid": transformers.GraniteMoeHybridForCausalLM,
    }[architecture]


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the tiny vocabulary, so the merge can copy one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)


def _matrix_update(rows: int, cols: int, generator: torch.Generator, rank: int) -> torch.Tensor:
    device = generator.device
    low_rank = torch.randn(rows, rank, generator=generator, device=device) @ torch.randn(
        rank, cols, generator=generator, device=device
    )
    return low_rank / rank**0.5 + 0.3 * torch.randn(rows, cols, generator=generator, device=device)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02, rank: int = 4) -> None:
    """Add a fine-tuning-like update: low rank plus noise on matrices (on each
    expert's matrix of a fused MoE stack), noise elsewhere. Drawn on the model's
    device (the same values on every CPU; others draw their own)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                update = _matrix_update(*parameter.shape, generator, rank)
            elif parameter.ndim == 3 and name.endswith(("gate_up_proj", "down_proj")):
                update = torch.stack(
                    [_matrix_update(*parameter.shape[1:], generator, rank) for _ in parameter]
                )
            else:
                update = torch.randn(parameter.shape, generator=generator, device=generator.device)
            parameter.add_(update.to(parameter.dtype), alpha=scale)


def write_family(
    directory: os.PathLike, architecture: str = "llama", experts: int = 3, seed: int = 0,
    dtype: torch.dtype = torch.float32, config=None, device: torch.device = "cpu",
) -> List[Path]:
    """Save ``base`` and ``expert_1..N`` under ``directory``; returns their paths.
    ``config``: the model's (default ``tiny_config(architecture)``); ``device``:
    where the weights are made (a GPU builds a large family in seconds)."""
    directory = Path(directory)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(architecture)(config or tiny_config(architecture)).to(dtype)
    # Mergekit reads the declared architecture; transformers 5 may leave it unset.
    model.config.architectures = [type(model).__name__]
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    paths = [directory / "base"] + [directory / f"expert_{i}" for i in range(1, experts + 1)]
    for index, path in enumerate(paths):
        model.load_state_dict(base_state)
        if index:
            perturb(model, seed=seed * 1000 + index)
        model.save_pretrained(path)
        save_tokenizer(path, model.config.get_text_config().vocab_size)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write base/ and expert_N/")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_family(args.directory, args.architecture, args.experts, args.seed):
        print(path)


if __name__ == "__main__":
    main()
