"""Tiny offline model families for the demo merge and the tests.

``python -m mergekit_wudi.demo DIR`` writes ``DIR/base`` and ``DIR/expert_{1,2,3}``:
a small LLaMA-architecture base with random weights and three "fine-tunes" whose
task vectors are low rank plus noise, like real fine-tuning updates. Nothing is
downloaded.
"""

import argparse
import os
from pathlib import Path
from typing import List

import torch

ARCHITECTURES = ("llama", "gpt2", "bert")


def tiny_config(architecture: str):
    import transformers

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


def _model_class(architecture: str):
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertModel,
    }[architecture]


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the tiny vocabulary, so the merge can copy one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02, rank: int = 4) -> None:
    """Add a fine-tuning-like update: low rank plus noise on matrices, noise elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                rows, cols = parameter.shape
                low_rank = torch.randn(rows, rank, generator=generator) @ torch.randn(
                    rank, cols, generator=generator
                )
                update = low_rank / rank**0.5 + 0.3 * torch.randn(rows, cols, generator=generator)
            else:
                update = torch.randn(parameter.shape, generator=generator)
            parameter.add_(update.to(parameter.dtype), alpha=scale)


def write_family(
    directory: os.PathLike, architecture: str = "llama", experts: int = 3, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> List[Path]:
    """Save ``base`` and ``expert_1..N`` under ``directory``; returns their paths."""
    directory = Path(directory)
    torch.manual_seed(seed)
    model = _model_class(architecture)(tiny_config(architecture)).to(dtype)
    # Mergekit reads the declared architecture; transformers 5 may leave it unset.
    model.config.architectures = [type(model).__name__]
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    paths = [directory / "base"] + [directory / f"expert_{i}" for i in range(1, experts + 1)]
    for index, path in enumerate(paths):
        model.load_state_dict(base_state)
        if index:
            perturb(model, seed=seed * 1000 + index)
        model.save_pretrained(path)
        save_tokenizer(path, model.config.vocab_size)
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
