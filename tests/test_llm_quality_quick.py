"""The causal-LM merge benchmark at CI size: WUDI keeps generative skills task arithmetic loses.

The same pipeline as ``benchmarks/llm_quality.py`` end to end, small: a TINY
Llama pretrained here on part of the Debian corpus, two skills, full fine-tunes
and LoRA adapters, merges through ``mergekit-yaml`` (LoRA experts as
``base+adapter``), exact-match greedy answers. Nothing is cached between runs.

Needs ``apt-get install -y wordnet-base fortunes``; skips without, except under CI.
"""

import os

import pytest

from benchmarks import pretrain
from benchmarks.pretrain import TINY
from benchmarks.llm_experts import BaseSettings, FineTune, prepare_family
from benchmarks.llm_quality import find, interference_report, merge, run_benchmark
from benchmarks.llm_skills import SkillSizes, build_skills

MISSING = not (pretrain.WORDNET / "data.noun").exists() or not pretrain.FORTUNES_LIST.exists()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING and not os.environ.get("CI"),
                       reason="needs apt packages wordnet-base fortunes"),
]

# Two skills a small Llama learns in a few hundred steps (the FULL one reached only about
# 10 % on addition and letter reversal); their pretraining examples are about a fifth of
# the base's pretraining tokens.
SKILL_NAMES = ("code", "numbers")
SIZES = SkillSizes(pretrain=3000, train=1000, test=100)
BASE = BaseSettings(TINY, steps=500, max_documents=8000)
FINE_TUNES = (FineTune("full", steps=150, learning_rate=1e-3),
              FineTune("lora", steps=150, learning_rate=3e-3))
# Measured with these settings (torch 2.13 CPU, one thread, seed 0): full experts code 0.55,
# numbers 0.81, base 0 and 0; normalised WUDI (defaults) 16.8, task arithmetic at lambda 1
# 10.0: a gap of 6.8 points, about 7 test answers. The assertion keeps half of it, so that a
# few answers may flip on another CPU while WUDI merging like task arithmetic (gap 0) fails.
# LoRA experts learnt too little here (code 0.10) for a margin: their merges are only run.
MARGIN = 3.0


@pytest.fixture
def one_thread(monkeypatch):
    """As the benchmark runs (and as the numbers above were measured), mergekit-yaml included."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    torch.set_num_threads(threads)


def test_wudi_keeps_more_skill_than_task_arithmetic(tmp_path, one_thread):
    skills = build_skills(SKILL_NAMES, SIZES, seed=0)
    merges = [merge("wudi"), merge("task_arithmetic", weight=1.0, **{"lambda": 1.0})]
    results = run_benchmark(tmp_path, 0, skills, BASE, FINE_TUNES, merges, log=lambda line: None)
    full = results.own_expert("full")
    assert full["code"] >= 0.3 and full["numbers"] >= 0.5, full  # the experts learnt their skills
    assert results.base == {"code": 0.0, "numbers": 0.0}
    wudi = find(results, "full", "wudi")
    arithmetic = find(results, "full", "task_arithmetic", **{"lambda": 1.0})
    assert wudi["normalised"] > arithmetic["normalised"] + MARGIN, results.rows
    assert wudi["normalised"] > 0.0  # the merge kept some skill, it did not just break the model
    # Both kinds went through mergekit-yaml (LoRA as base+adapter) and were scored.
    assert sorted((row["experts"], row["method"]) for row in results.rows) == [
        ("full", "task_arithmetic"), ("full", "wudi"), ("lora", "task_arithmetic"), ("lora", "wudi")]
    assert all(set(row["scores"]) == set(SKILL_NAMES) for row in results.rows)

    # The interference report runs on the same cached experts, one section per kind.
    family = prepare_family(tmp_path, 0, BASE, FINE_TUNES, skills)
    report = interference_report(family, tmp_path / "report")
    assert report.startswith("## full experts") and "## lora experts" in report
    assert report.count("WUDI removes") == 2, report
