"""Small Llama causal LMs pretrained from scratch on English text from Debian packages.

Shared by ``benchmarks/llm_quality.py`` (the base its experts are fine-tuned from)
and the alignment benchmark (two bases from different seeds). Everything is
offline and seeded:

* ``debian_corpus``: WordNet glosses (wordnet-base) and the English fortune
  cookies (fortunes), in a fixed order. Only named data packages are read, not
  ``/usr/share/doc``, whose contents depend on what else a machine has installed
  and would give CI a different base than this machine;
* ``train_tokenizer``: byte-level BPE from ``tokenizers``, digits split one by one;
* ``pretrained_llama``: a ``LlamaForCausalLM`` (GQA, RoPE, SwiGLU, RMSNorm,
  untied embeddings) trained with AdamW on packed blocks, saved with its
  tokenizer by ``save_pretrained`` and cached under a key of every argument;
* ``heldout_loss``: mean next-token cross-entropy on texts the model did not see.
"""

import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDNET = Path("/usr/share/wordnet")
FORTUNES_LIST = Path("/var/lib/dpkg/info/fortunes.list")
# fortunes files that are pictures, not prose.
NOT_PROSE = {"art", "ascii-art"}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def wordnet_documents() -> List[str]:
    """One document per synset: its words, then its gloss (definition and examples)."""
    documents = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(WORDNET / f"data.{part}", encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("  "):  # the licence header
                    continue
                fields, _, gloss = line.partition(" | ")
                fields = fields.split()
                count = int(fields[3], 16)
                words = [re.sub(r"\(.*\)$", "", word).replace("_", " ")
                         for word in fields[4:4 + 2 * count:2]]
                documents.append(f"{', '.join(words)}: {gloss.strip()}")
    return documents


def fortune_documents() -> List[str]:
    """One document per English fortune cookie, line breaks kept."""
    paths = sorted(
        Path(line.strip()) for line in FORTUNES_LIST.read_text().splitlines()
        if line.startswith("/usr/share/games/fortunes/") and "/" not in line.strip()[26:]
        and not line.strip().endswith((".dat", ".u8")) and Path(line.strip()).name not in NOT_PROSE
        and Path(line.strip()).is_file()
    )
    documents = []
    for path in paths:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few old files are Latin-1
            text = raw.decode("latin-1")
        documents += [chunk.strip() for chunk in re.split(r"^%\s*$", text, flags=re.M)
                      if chunk.strip()]
    return documents


def debian_corpus() -> List[str]:
    """General English documents from installed Debian packages, in a fixed order.

    Raises ``FileNotFoundError`` naming the apt package to install when one is missing.
    """
    needed = {"wordnet-base": WORDNET / "data.noun", "fortunes": FORTUNES_LIST}
    missing = [package for package, marker in needed.items() if not marker.exists()]
    if missing:
        raise FileNotFoundError(
            f"the pretraining corpus needs the Debian packages {', '.join(missing)}"
            f" (apt-get install -y {' '.join(missing)})"
        )
    return wordnet_documents() + fortune_documents()


def split_corpus(documents: Sequence[str], seed: int,
                 heldout_fraction: float = 0.05) -> Tuple[List[str], List[str]]:
    """(training, held-out): a seeded shuffle, the held-out part at least one document."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    if len(documents) < 2:
        raise ValueError(f"cannot split {len(documents)} document(s) into training and held-out")
    order = list(documents)
    random.Random(f"split/{seed}").shuffle(order)
    heldout = max(1, round(len(order) * heldout_fraction))
    return order[heldout:], order[:heldout]


def train_tokenizer(documents: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens; each digit its own token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int  # fewer than heads: grouped-query attention
    intermediate: int  # SwiGLU width
    vocab: int  # the BPE tokenizer's vocabulary
    context: int  # tokens per training block and max_position_embeddings

    def config(self, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate, max_position_embeddings=self.context,
            hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"],
        )


# Sized for a shared 2-core CPU: FULL pretrains in a few minutes on one thread.
FULL = LlamaSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344, vocab=1024,
                 context=48)
TINY = LlamaSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=512,
                 context=48)
LlamaSize.FULL, LlamaSize.TINY = FULL, TINY


def token_stream(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """Every document as <s> tokens </s>, concatenated."""
    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return torch.tensor([token for document in ids
                         for token in (tokenizer.bos_token_id, *document, tokenizer.eos_token_id)])


def cache_key(**arguments) -> str:
    import transformers

    digest = hashlib.sha256(json.dumps(
        [arguments, torch.__version__, transformers.__version__], sort_keys=True, default=str,
    ).encode())
    return digest.hexdigest()[:16]


def pretrained_llama(
    cache_dir: Path, seed: int, size: LlamaSize = FULL, steps: int = 1000, *,
    documents: Optional[Sequence[str]] = None, batch_size: int = 32,
    learning_rate: float = 2e-3, warmup: int = 50, log: Callable[[str], None] = lambda line: None,
) -> Path:
    """Train (or reuse from ``cache_dir``) a Llama on ``documents``; returns its directory.

    ``documents`` defaults to the training part of ``split_corpus(debian_corpus(), 0)``,
    whatever ``seed`` is, so bases of different seeds share one held-out set. The
    cache key covers every argument (the documents by their hash) and the torch and
    transformers versions; the directory holds the model and its tokenizer.
    """
    if documents is None:
        documents = split_corpus(debian_corpus(), 0)[0]
    documents_hash = hashlib.sha256("\x00".join(documents).encode()).hexdigest()
    key = cache_key(seed=seed, size=asdict(size), steps=steps, documents=documents_hash,
                    batch_size=batch_size, learning_rate=learning_rate, warmup=warmup)
    directory = Path(cache_dir) / f"llama-{key}"
    if (directory / "model.safetensors").exists():
        return directory

    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(documents, size.vocab)
    stream = token_stream(tokenizer, documents)
    log(f"tokenized {len(documents)} documents into {len(stream) / 1e6:.1f}M tokens"
        f" ({time.perf_counter() - started:.0f} s)")
    model = LlamaForCausalLM(size.config(tokenizer))
    train_causal_lm(model, stream, size.context, steps, batch_size, learning_rate, warmup, seed)
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(directory)  # an interrupted run leaves no half cache
    log(f"pretrained {directory.name} ({model.num_parameters() / 1e6:.1f}M parameters,"
        f" {steps} steps, {len(stream) / 1e6:.1f}M tokens) in {time.perf_counter() - started:.0f} s")
    return directory


def train_causal_lm(model, stream: torch.Tensor, context: int, steps: int, batch_size: int,
                    learning_rate: float, warmup: int, seed: int) -> None:
    """AdamW on random ``context``-token blocks of ``stream``; linear warmup, cosine decay."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / max(1, warmup), 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - context, (batch_size,), generator=generator)
        batch = torch.stack([stream[start:start + context] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.inference_mode()
def heldout_loss(model_dir: Path, texts: Sequence[str], max_tokens: int = 50_000) -> float:
    """Mean next-token cross-entropy (nats) over the first ``max_tokens`` tokens of ``texts``,
    packed as in training into blocks of the model's context length."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    context = model.config.max_position_embeddings
    stream = token_stream(tokenizer, texts)[:max_tokens]
    if len(stream) < 2:
        raise ValueError(f"heldout_loss needs at least 2 tokens, the texts gave {len(stream)}")
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, context):
        block = stream[start:start + context + 1]
        if len(block) < 2:
            break
        logits = model(input_ids=block[None, :-1]).logits[0]
        total += float(torch.nn.functional.cross_entropy(logits, block[1:], reduction="sum"))
        count += len(block) - 1
    return total / count
