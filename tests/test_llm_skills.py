"""The generative skills of the causal-LM merge benchmark (benchmarks/llm_skills.py)."""

import ast
import os

import pytest

from benchmarks.llm_skills import (
    SKILLS,
    WORDNET_ADJECTIVES,
    SkillSizes,
    adjective_antonyms,
    build_skills,
    number_name,
)

needs_wordnet = pytest.mark.skipif(not WORDNET_ADJECTIVES.exists() and not os.environ.get("CI"),
                                   reason="needs apt package wordnet-base")


def answer_of(prompt: str) -> str:
    """Each generated skill's answer computed independently from its question."""
    instruction, question = prompt.split("\n")
    if instruction == "Task: addition":
        a, b = question.removesuffix(" =").split(" + ")
        return str(int(a) + int(b))
    if instruction == "Task: larger number":
        return str(max(map(int, question.removesuffix(" ->").split(" or "))))
    if instruction == "Task: count on":
        number = int(question.removesuffix(" ->"))
        return f"{number + 1} {number + 2} {number + 3}"
    if instruction in ("Task: reverse the letters", "Task: reverse four letters"):
        letters = question.removeprefix("letters: ").removesuffix(" ->").split()
        assert len(letters) == 4 if "four" in instruction else 3 <= len(letters) <= 5
        return " ".join(letters[::-1])
    if instruction == "Task: python sorted":
        return str(sorted(ast.literal_eval(question.removeprefix("sorted(").removesuffix(") ="))))
    if instruction == "Task: number in words":
        return NAMES.get(int(question.removesuffix(" ->")))
    raise AssertionError(prompt)


# Written out by hand: every branch of number_name (teens, tens, hundreds, thousands, zeros).
NAMES = {
    0: "zero", 7: "seven", 13: "thirteen", 40: "forty", 47: "forty-seven", 100: "one hundred",
    305: "three hundred five", 1000: "one thousand", 2019: "two thousand nineteen",
    8014: "eight thousand fourteen", 9999: "nine thousand nine hundred ninety-nine",
}


def test_number_names():
    assert {number: number_name(number) for number in NAMES} == NAMES


@needs_wordnet
def test_antonyms_are_wordnet_pairs():
    pairs = dict(adjective_antonyms())
    assert pairs["able"] == "unable" and pairs["fat"] == "thin"
    assert len(pairs) > 3000
    assert all(word.isalpha() and antonym.isalpha() for word, antonym in pairs.items())


@needs_wordnet
def test_splits_are_disjoint_seeded_and_answered():
    sizes = SkillSizes(pretrain=100, train=300, test=50)
    skills = build_skills(list(SKILLS), sizes, seed=0)
    assert build_skills(list(SKILLS), sizes, seed=0) == skills
    assert build_skills(list(SKILLS), sizes, seed=1) != skills
    for data in skills:
        parts = [data.pretrain, data.train, data.test]
        assert [len(part) for part in parts] == [100, 300, 50]
        prompts = [prompt for part in parts for prompt, _ in part]
        assert len(set(prompts)) == len(prompts), data.name
        skill = SKILLS[data.name]
        for prompt, answer in data.test:
            assert prompt.startswith(f"Task: {skill.instruction}\n")
            assert answer.startswith(" ")
            expected = answer_of(prompt) if data.name != "antonyms" else None
            if expected is not None:
                assert answer.strip() == expected


def test_too_few_distinct_questions_is_an_error():
    # Two numbers below 100: 10,000 distinct additions.
    with pytest.raises(ValueError, match="skill math has 10000 distinct questions"):
        build_skills(["math"], SkillSizes(pretrain=0, train=10_000, test=1), seed=0)
