"""The LLM benchmark's pilots (benchmarks/llm_pilots.py): their table rows, on hand-made
results (the pipeline they run is llm_quality's, tested in test_llm_quality_quick.py)."""

from benchmarks import llm_pilots
from benchmarks.llm_pilots import PILOTS, pilot_row, result_name
from tests.test_llm_quality import hand_made


def test_a_row_holds_the_experts_and_both_recipes():
    row = pilot_row(PILOTS[1], 0, hand_made())
    assert row == ("| 300 steps, lr 3e-4 | 0 | a 0.900 (0.500), b 0.600 (0.000) |"
                   " 63.9 (50 %) | 36.1 (10 %) |")


def test_an_expert_that_learnt_nothing_is_a_row_not_a_crash(monkeypatch):
    def unlearnt(*arguments, **keywords):
        raise RuntimeError("full experts did not learn ['math']")

    monkeypatch.setattr(llm_pilots, "run_benchmark", unlearnt)
    results = llm_pilots.run_pilot(PILOTS[2], 0, cache=None)
    assert results is None
    assert pilot_row(PILOTS[2], 0, results) == (
        "| addition, 150 steps | 0 | an expert did not beat the base | | |")


def test_pilots_vary_one_thing_from_the_benchmark():
    benchmark = PILOTS[0]
    assert benchmark.skills == llm_pilots.BENCHMARK_SKILLS
    for pilot in PILOTS[1:]:
        changed = (pilot.skills != benchmark.skills) + (pilot.fine_tune != benchmark.fine_tune)
        assert changed >= 1, pilot.name
    assert {name for pilot in PILOTS for name in pilot.skills} <= set(llm_pilots.PRETRAINING_SKILLS)
    assert result_name([0, 1]) == "llm_pilots_seed0_1.md"
