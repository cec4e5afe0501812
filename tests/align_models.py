"""Tiny models of every family mergekit-wudi-align supports, built locally."""

import torch

VOCAB = 64
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "bert_encoder")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Random weights (biases and norms too, so that no entry is a constant), eval mode."""
    import transformers as T

    llama_like = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    bert = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    config, model_class = {
        "llama": (lambda: T.LlamaConfig(tie_word_embeddings=False, **llama_like), T.LlamaForCausalLM),
        "mistral": (lambda: T.MistralConfig(tie_word_embeddings=False, **llama_like), T.MistralForCausalLM),
        # One key/value head for four query heads: the widest GQA group.
        "qwen2": (lambda: T.Qwen2Config(**{**llama_like, "num_key_value_heads": 1}), T.Qwen2ForCausalLM),
        # Tied embeddings, q/k norms.
        "qwen3": (lambda: T.Qwen3Config(head_dim=8, tie_word_embeddings=True, **llama_like), T.Qwen3ForCausalLM),
        "gpt2": (lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
                 T.GPT2LMHeadModel),
        "bert": (lambda: T.BertConfig(**bert), T.BertForMaskedLM),
        "bert_encoder": (lambda: T.BertConfig(**bert), T.BertModel),
    }[family]
    torch.manual_seed(seed)
    model = model_class(config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.config.architectures = [model_class.__name__]
    return model


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def shapes(model: torch.nn.Module) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def random_permutation(group, generator: torch.Generator) -> torch.Tensor:
    """A random permutation a group may take (heads whole, blocks kept)."""
    if group.head_size:
        heads = group.units // group.head_size
        order = torch.randperm(heads, generator=generator)
        return torch.cat([torch.randperm(group.head_size, generator=generator) + int(h) * group.head_size
                          for h in order])
    block = group.block or group.units
    return torch.cat([torch.randperm(block, generator=generator) + start for start in range(0, group.units, block)])
