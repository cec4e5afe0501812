"""Base, experts and exact-match scoring for the causal-LM merge benchmark.

* the base: ``pretrain.pretrained_llama`` on the Debian corpus's training part plus
  each skill's few pretraining examples (so it reads every prompt format);
* experts of two kinds per skill: a full fine-tune (every weight) and a PEFT LoRA
  adapter on every linear layer of the blocks, both trained on the answer tokens
  only; mergekit reads the adapters as ``base+adapter``;
* scoring: greedy decoding, exact match of the text before ``</s>``.

Everything is cached under a key of what made it, written atomically.
"""

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.llm_skills import SKILLS, SkillData, as_document
from benchmarks.pretrain import LlamaSize, debian_corpus, pretrained_llama, split_corpus
from benchmarks.quality_tasks import write_atomically

# Linear layers of a Llama block: LoRA's targets, as in the usual LLM recipes.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# In the experts' cache key: adapters cached before fine_tune seeded each skill apart all
# started from one LoRA A, and must not be reused.
SEEDING = "per skill"


@dataclass(frozen=True)
class BaseSettings:
    size: LlamaSize
    steps: int
    batch_size: int = 32
    max_documents: Optional[int] = None  # of the corpus's (shuffled) training part; None: all


@dataclass(frozen=True)
class FineTune:
    """One kind of expert: how many AdamW steps at which learning rate (LoRA: its shape)."""

    kind: str  # "full" or "lora"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-4
    lora_rank: int = 8
    lora_alpha: int = 16


@dataclass(frozen=True)
class Family:
    """A base, and per expert kind one expert reference per skill as mergekit reads it."""

    base: Path
    experts: Dict[str, Dict[str, str]] = field(default_factory=dict)  # kind -> skill -> model


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrained_base(cache: Path, seed: int, settings: BaseSettings, skills: Sequence[SkillData],
                    log: Callable[[str], None]) -> Path:
    """The base: Debian text (split by ``seed``) plus the skills' pretraining examples."""
    documents = split_corpus(debian_corpus(), seed)[0][:settings.max_documents]
    documents += [as_document(example) for data in skills for example in data.pretrain]
    return pretrained_llama(cache, seed, settings.size, settings.steps, documents=documents,
                            batch_size=settings.batch_size, log=log)


def encode_examples(tokenizer, examples: Sequence[Tuple[str, str]]):
    """<s> prompt answer </s>, right-padded; labels only on the answer and </s>."""
    rows, labels = [], []
    for prompt, answer in examples:
        prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    pad = lambda values, filler: [value + [filler] * (width - len(value)) for value in values]
    input_ids = torch.tensor(pad(rows, tokenizer.pad_token_id))
    return input_ids, torch.tensor(pad([[1] * len(row) for row in rows], 0)), torch.tensor(pad(labels, -100))


def fine_tune(base: Path, data: SkillData, settings: FineTune, seed: int):
    """The base fine-tuned on ``data.train`` (a PEFT model for LoRA), in eval mode."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    # Seeded per skill: adapters that share LoRA A's random start keep reading nearly the same
    # input directions (adapter_overlap 0.88-0.89 after 150 steps, against 0.20 seeded apart),
    # a different merging problem from independently trained experts (docs/llm-merges.md).
    torch.manual_seed(int(digest(data.name, seed), 16) % 2**31)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base)
    if settings.kind == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS)))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # No weight decay: it would move weights the skill never touches.
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, (settings.steps - step) / (settings.steps - warmup)))
    rng = random.Random(f"{data.name}/{seed}")
    order: List[Tuple[str, str]] = []
    model.train()
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:
            order = list(data.train)
            rng.shuffle(order)
        batch, order = order[:settings.batch_size], order[settings.batch_size:]
        input_ids, attention_mask, labels = encode_examples(tokenizer, batch)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def expert_reference(base: Path, directory: Path, kind: str) -> str:
    """How a recipe names the expert: a model directory, or ``base+adapter`` for LoRA."""
    return f"{base.resolve()}+{directory.resolve()}" if kind == "lora" else str(directory.resolve())


def prepare_family(cache: Path, seed: int, base_settings: BaseSettings,
                   fine_tunes: Sequence[FineTune], skills: Sequence[SkillData],
                   log: Callable[[str], None] = lambda line: None,
                   pretraining_skills: Optional[Sequence[SkillData]] = None) -> Family:
    """Pretrain (or reuse) the base, its pretraining mixing in the examples of
    ``pretraining_skills`` (default: ``skills``), then fine-tune (or reuse) one expert per skill."""
    base = pretrained_base(cache, seed, base_settings, pretraining_skills or skills, log)
    family = Family(base)
    for settings in fine_tunes:
        family.experts[settings.kind] = {}
        for data in skills:
            directory = base.parent / "experts" / (
                f"{base.name}-{settings.kind}-{data.name}"
                f"-{digest(asdict(settings), data.train, seed, SEEDING)}")
            if not (directory / "config.json").exists() and not (directory / "adapter_config.json").exists():
                started = time.perf_counter()
                model = fine_tune(base, data, settings, seed)
                write_atomically(directory, model.save_pretrained)
                log(f"fine-tuned {settings.kind} expert {data.name} in"
                    f" {time.perf_counter() - started:.0f} s")
            family.experts[settings.kind][data.name] = expert_reference(base, directory, settings.kind)
    return family


def adapter_of(reference: str) -> Optional[Path]:
    """The adapter directory of a ``base+adapter`` reference; None for a model directory."""
    return Path(reference.split("+")[1]) if "+" in reference else None


def lora_a(adapter: Path) -> Dict[str, torch.Tensor]:
    """A saved LoRA adapter's ``lora_A`` matrices, by name."""
    from safetensors.torch import load_file

    return {name: matrix for name, matrix in load_file(Path(adapter) / "adapter_model.safetensors").items()
            if "lora_A" in name}


def row_space_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean cosine of the principal angles between the row spaces of two ``[rank, in]``
    matrices: 1 when they span the same input directions, about sqrt(rank / in) at random."""
    bases = [torch.linalg.qr(matrix.double().T).Q for matrix in (first, second)]
    return float(torch.linalg.svdvals(bases[0].T @ bases[1]).mean())


def adapter_overlap(adapters: Sequence[Path]) -> float:
    """How much LoRA adapters share the input directions they read: ``row_space_overlap``
    of their ``lora_A`` matrices, averaged over modules and pairs of adapters."""
    weights = [lora_a(adapter) for adapter in adapters]
    names = sorted(weights[0])
    if len(weights) < 2 or not names:
        raise ValueError(f"adapter_overlap needs two or more LoRA adapters, got {list(adapters)}")
    overlaps = [row_space_overlap(first[name], second[name]) for name in names
                for index, first in enumerate(weights) for second in weights[index + 1:]]
    return sum(overlaps) / len(overlaps)


def adapter_start_overlap(base: Path, data: SkillData, settings: FineTune, seed: int,
                          adapter: Path) -> float:
    """How much of a trained LoRA adapter's input space is its random start: ``row_space_overlap``
    of its ``lora_A`` with the ``lora_A`` that ``fine_tune`` starts it from, averaged over modules.
    WUDI reads a task vector's row space as the inputs its expert sees; near 1, LoRA's row space
    is still the random start's."""
    import peft

    start = peft.get_peft_model_state_dict(fine_tune(base, data, replace(settings, steps=0), seed))
    trained = lora_a(adapter)
    return sum(row_space_overlap(matrix, start[name]) for name, matrix in trained.items()) / len(trained)


def load_model(reference: str):
    """A causal LM from a directory or a ``base+adapter`` reference (adapter merged in)."""
    from transformers import LlamaForCausalLM

    adapter = adapter_of(reference)
    if adapter is not None:
        import peft

        base = reference.split("+")[0]
        return peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)\
            .merge_and_unload().eval()
    model, info = LlamaForCausalLM.from_pretrained(reference, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:  # a merge that wrote no weights
        raise RuntimeError(f"{reference} is incomplete: missing {sorted(info['missing_keys'])},"
                           f" mismatched {sorted(info['mismatched_keys'])}")
    return model.eval()


@torch.inference_mode()
def accuracy(model, tokenizer, data: SkillData, batch_size: int = 100) -> float:
    """Exact-match accuracy of greedy answers to ``data.test``, a fraction."""
    limit = SKILLS[data.name].max_new_tokens
    correct = 0
    for start in range(0, len(data.test), batch_size):
        batch = data.test[start:start + batch_size]
        prompts = [[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
                   for prompt, _ in batch]
        width = max(map(len, prompts))  # left padding: every prompt ends at the same column
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=limit, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[:, width:]
        for row, (_, answer) in zip(generated.tolist(), batch):
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            correct += tokenizer.decode(row, skip_special_tokens=True).strip() == answer.strip()
    return correct / len(data.test)


def score(reference: str, family: Family, skills: Sequence[SkillData]) -> Dict[str, float]:
    """One model's accuracy on every skill."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family.base)
    model = load_model(reference)
    return {data.name: accuracy(model, tokenizer, data) for data in skills}
