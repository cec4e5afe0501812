"""The causal-LM merge benchmark's scores and report (benchmarks/llm_quality.py), on
hand-made results: no training, no merges (the pipeline runs in test_llm_quality_quick.py)."""

import json

import pytest

from benchmarks import llm_quality
from benchmarks.llm_quality import Results


def hand_made() -> Results:
    base = {"a": 0.5, "b": 0.0}
    experts = {"full": {"a": {"a": 0.9, "b": 0.0}, "b": {"a": 0.5, "b": 0.6}}}
    rows = [
        {"method": "wudi", "settings": {}, "experts": "full", "scores": {"a": 0.7, "b": 0.3},
         "average": 0.5, "normalised": 100 * (0.7 / 0.9 + 0.3 / 0.6) / 2},
        {"method": "task_arithmetic", "settings": {"lambda": 1.0, "weight": 1.0}, "experts": "full",
         "scores": {"a": 0.5, "b": 0.1}, "average": 0.3, "normalised": 100 * (0.5 / 0.9 + 0.1 / 0.6) / 2},
    ]
    return Results(["a", "b"], base, experts, rows, wall_time_s=125.0)


def test_gain_kept_pools_the_skills_gains():
    results = hand_made()
    # Gains over the base: a 0.4, b 0.6. WUDI keeps 0.2 + 0.3 of 1.0; task arithmetic 0 + 0.1.
    assert results.gain_kept({"a": 0.7, "b": 0.3}, "full") == pytest.approx(50.0)
    assert results.gain_kept({"a": 0.5, "b": 0.1}, "full") == pytest.approx(10.0)
    assert results.gain_kept(results.base, "full") == pytest.approx(0.0)
    assert results.gain_kept({"a": 0.9, "b": 0.6}, "full") == pytest.approx(100.0)
    # Below the base is negative, not clipped: a merge that breaks the base says so.
    assert results.gain_kept({"a": 0.0, "b": 0.0}, "full") == pytest.approx(-50.0)


def test_check_and_tables_read_the_gain():
    report = llm_quality.render(hand_made(), seed=0, status="")
    assert "the best merge (wudi) keeps 50.0% of the experts' gain over the base" in report
    assert "passed (needs 50% of the gain)" in report
    assert "| wudi | 0.700 | 0.300 | 0.500 | 63.9 | 50.0 |" in report
    assert "| base | 0.500 | 0.000 | 0.250 | 27.8 | 0.0 |" in report
    assert "Wall time: 2.1 min" in report
    failing = hand_made()
    failing.rows = failing.rows[1:]
    assert "keeps 10.0% of the experts' gain" in llm_quality.render(failing, 0, "")
    assert "FAILED" in llm_quality.render(failing, 0, "")


def test_redraw_rewrites_the_report_from_the_json_alone(tmp_path, monkeypatch):
    results = hand_made()
    results.lora_input_overlap = None
    (tmp_path / "llm_quality_seed3.json").write_text(json.dumps(results.to_json()))

    def no_training(*arguments, **keywords):
        raise AssertionError("--redraw must not train or merge")

    monkeypatch.setattr(llm_quality, "run_benchmark", no_training)
    monkeypatch.setattr(llm_quality, "full_merges", lambda: [  # the recipes of the JSON's rows
        llm_quality.merge("wudi"), llm_quality.merge("task_arithmetic", weight=1.0, **{"lambda": 1.0})])
    monkeypatch.setattr(llm_quality, "plot", lambda results, path: path.write_text("plot"))
    assert llm_quality.main(["--seed", "3", "--results", str(tmp_path), "--redraw"]) == 0
    report = (tmp_path / "llm_quality_seed3.md").read_text()
    assert "| wudi | 0.700 | 0.300 | 0.500 | 63.9 | 50.0 |" in report
    assert json.loads((tmp_path / "llm_quality_seed3.json").read_text()) == results.to_json()
    assert (tmp_path / "llm_quality_seed3.png").read_text() == "plot"


def test_seeds_table_lines_up_recipes_across_seeds(tmp_path):
    other = hand_made()
    other.rows = [dict(row, normalised=row["normalised"] - 10) for row in other.rows]
    for seed, results in ((0, hand_made()), (5, other)):
        (tmp_path / f"{llm_quality.result_stem(seed)}.json").write_text(json.dumps(results.to_json()))
    assert llm_quality.main(["--results", str(tmp_path), "--table", "0", "5"]) == 0
    table = (tmp_path / "llm_quality_seeds.md").read_text().splitlines()
    assert "| recipe | full, seed 0 | full, seed 5 |" in table
    # Sorted by the mean over seeds; each cell is the normalised average (gain kept).
    rows = [line for line in table if line.startswith("| `")]
    assert rows == ["| `wudi` | 63.9 (50) | 53.9 (50) |",
                    "| `task_arithmetic lambda=1` | 36.1 (10) | 26.1 (10) |",
                    "| `base` | 27.8 (0) | 27.8 (0) |"]
