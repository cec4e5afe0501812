"""Generative skills for the causal-LM merge benchmark, each with its own prompt format.

Every prompt names its skill on its first line (``Task: addition``), so a merged
model is told which expert's behaviour is wanted. Answers are scored by greedy
decoding and exact match. Data are deterministic generators or real data from
Debian packages, split three ways by a seed: a few examples mixed into
pretraining (so the base already reads the formats), the experts' training set,
and a held-out test set disjoint from both.
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

WORDNET_ADJECTIVES = Path("/usr/share/wordnet/data.adj")

Example = Tuple[str, str]  # (prompt, answer)


def addition(rng: random.Random) -> Example:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a} + {b} =", str(a + b)


def larger_number(rng: random.Random) -> Example:
    a, b = rng.sample(range(100, 1000), 2)
    return f"{a} or {b} ->", str(max(a, b))


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reverse_letters(rng: random.Random, lengths: Tuple[int, int] = (3, 5)) -> Example:
    # "letters:" first, so every letter is a space-prefixed token, in question and answer.
    letters = rng.sample(LETTERS, rng.randint(*lengths))
    return "letters: " + " ".join(letters) + " ->", " ".join(reversed(letters))


def count_on(rng: random.Random) -> Example:
    number = rng.randrange(10000)
    return f"{number} ->", f"{number + 1} {number + 2} {number + 3}"


UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen"
         " fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_name(number: int) -> str:
    """English name of 0 <= number < 10000: 'two thousand three hundred forty-seven'."""
    thousands, number = divmod(number, 1000)
    if thousands:
        return f"{UNITS[thousands]} thousand" + (f" {number_name(number)}" if number else "")
    hundreds, rest = divmod(number, 100)
    if rest < 20:
        tail = UNITS[rest]
    else:
        tail = TENS[rest // 10] + ("-" + UNITS[rest % 10] if rest % 10 else "")
    if not hundreds:
        return tail
    return f"{UNITS[hundreds]} hundred" + (f" {tail}" if rest else "")


def number_words(rng: random.Random) -> Example:
    number = rng.randrange(10000)
    return f"{number} ->", number_name(number)


def sort_list(rng: random.Random) -> Example:
    numbers = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
    return f"sorted({numbers}) =", str(sorted(numbers))


def adjective_antonyms() -> List[Example]:
    """WordNet's direct antonyms of one-word adjectives ("!" pointers in data.adj), sorted."""
    if not WORDNET_ADJECTIVES.exists():
        raise FileNotFoundError("the antonym skill needs the Debian package wordnet-base"
                                " (apt-get install -y wordnet-base)")
    synsets, pointers = {}, []
    with open(WORDNET_ADJECTIVES, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" | ")[0].split()
            count = int(fields[3], 16)
            synsets[fields[0]] = [re.sub(r"\(.*\)$", "", word) for word in fields[4:4 + 2 * count:2]]
            at = 4 + 2 * count
            for index in range(int(fields[at])):
                symbol, target, _, words = fields[at + 1 + 4 * index:at + 5 + 4 * index]
                if symbol == "!":  # source/target word numbers, two hex digits each
                    pointers.append((fields[0], int(words[:2], 16), target, int(words[2:], 16)))
    pairs = sorted({(synsets[source][i - 1].lower(), synsets[target][j - 1].lower())
                    for source, i, target, j in pointers})
    antonyms: Dict[str, str] = {}
    for word, antonym in pairs:  # one answer per word: the alphabetically first
        if word.isalpha() and antonym.isalpha():
            antonyms.setdefault(word, antonym)
    return sorted(antonyms.items())


@dataclass(frozen=True)
class Skill:
    """A prompt format and where its examples come from."""

    name: str
    instruction: str  # the prompt's first line
    generate: Callable[[random.Random], Example] = None  # draws one example, or
    pool: Callable[[], List[Example]] = None  # lists every example
    max_new_tokens: int = 16

    def prompt(self, question: str) -> str:
        return f"Task: {self.instruction}\n{question}"


SKILLS: Dict[str, Skill] = {
    "math": Skill("math", "addition", generate=addition, max_new_tokens=5),
    "compare": Skill("compare", "larger number", generate=larger_number, max_new_tokens=5),
    "antonyms": Skill("antonyms", "antonym of the adjective",
                      pool=lambda: [(f"{word} ->", antonym) for word, antonym in adjective_antonyms()],
                      max_new_tokens=8),
    "reverse": Skill("reverse", "reverse the letters", generate=reverse_letters, max_new_tokens=12),
    "reverse_four": Skill("reverse_four", "reverse four letters",
                          generate=lambda rng: reverse_letters(rng, (4, 4)), max_new_tokens=10),
    "count": Skill("count", "count on", generate=count_on, max_new_tokens=16),
    "code": Skill("code", "python sorted", generate=sort_list, max_new_tokens=18),
    "numbers": Skill("numbers", "number in words", generate=number_words, max_new_tokens=16),
}


@dataclass(frozen=True)
class SkillData:
    """One skill's examples: full prompts (skill line included) and answers."""

    name: str
    pretrain: Tuple[Example, ...]
    train: Tuple[Example, ...]
    test: Tuple[Example, ...]


@dataclass(frozen=True)
class SkillSizes:
    pretrain: int = 1000  # mixed into the base's pretraining documents
    train: int = 2000
    test: int = 200


def split_skill(skill: Skill, sizes: SkillSizes, seed: int) -> SkillData:
    """Three disjoint sets of distinct questions, fixed by ``seed``."""
    rng = random.Random(f"{skill.name}/{seed}")
    wanted = sizes.test + sizes.train + sizes.pretrain
    if skill.pool is not None:
        examples = skill.pool()
        rng.shuffle(examples)
    else:
        seen, examples = set(), []
        for _ in range(50 * wanted):  # draws repeat; give up well before looping forever
            question, answer = skill.generate(rng)
            if question not in seen:
                seen.add(question)
                examples.append((question, answer))
                if len(examples) == wanted:
                    break
    if len(examples) < wanted:
        raise ValueError(f"skill {skill.name} has {len(examples)} distinct questions,"
                         f" fewer than the {wanted} asked for")
    examples = [(skill.prompt(question), " " + answer) for question, answer in examples[:wanted]]
    test, train = examples[:sizes.test], examples[sizes.test:sizes.test + sizes.train]
    return SkillData(skill.name, tuple(examples[sizes.test + sizes.train:]), tuple(train),
                     tuple(test))


def build_skills(names: Sequence[str], sizes: SkillSizes, seed: int) -> List[SkillData]:
    return [split_skill(SKILLS[name], sizes, seed) for name in names]


def as_document(example: Example) -> str:
    prompt, answer = example
    return prompt + answer
