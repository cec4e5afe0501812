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
from benchmarks.llm_experts import BaseSettings, FineTune
from benchmarks.llm_quality import find, merge, run_benchmark
from benchmarks.llm_skills import SkillSizes, build_skills

MISSING = not (pretrain.WORDNET / "data.noun").exists() or not pretrain.FORTUNES_LIST.exists()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING and not os.environ.get("CI"),
                       reason="needs apt packages wordnet-base fortunes"),
]

# Two skills a TINY Llama learns in a few hundred steps; the base reads their formats
# from pretraining examples, which are about a quarter of its pretraining tokens.
SKILL_NAMES = ("code", "numbers")
SIZES = SkillSizes(pretrain=3000, train=1000, test=100)
BASE = BaseSettings(TINY, steps=500, max_documents=8000)
FINE_TUNES = (FineTune("full", steps=150, learning_rate=1e-3),
              FineTune("lora", steps=150, learning_rate=3e-3))
RECOMMENDED = {}  # WUDI at its defaults
MARGIN = 10.0


def test_wudi_keeps_more_skill_than_task_arithmetic(tmp_path):
    skills = build_skills(SKILL_NAMES, SIZES, seed=0)
    merges = [merge("wudi", **RECOMMENDED), merge("task_arithmetic", weight=1.0, **{"lambda": 1.0})]
    results = run_benchmark(tmp_path, 0, skills, BASE, FINE_TUNES, merges, log=print)
    for kind in ("full", "lora"):
        wudi = find(results, kind, "wudi", **RECOMMENDED)["normalised"]
        arithmetic = find(results, kind, "task_arithmetic", **{"lambda": 1.0})["normalised"]
        print(kind, results.own_expert(kind), results.base, wudi, arithmetic)
