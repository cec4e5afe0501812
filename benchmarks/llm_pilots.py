"""Why the LLM benchmark's skills and fine-tuning budget are what they are: its pilots.

``benchmarks/llm_quality.py`` scores four skills learnt in 150 fine-tuning steps. This
runs the same pipeline (the same cached base per seed, the same skill data, merges
through ``mergekit-yaml``) on the variants it rejected, with full fine-tunes and two
recipes, WUDI at its defaults and task arithmetic at lambda 1:

* the four skills fine-tuned 300 steps instead of 150;
* addition as the math skill, after 150 steps, and after 500 steps at lr 1e-3;
* reversing 3-5 letters in place of four letters.

    HF_HUB_OFFLINE=1 python benchmarks/llm_pilots.py [--seeds 0 1]

Writes ``benchmarks/results/llm_pilots_seed0_1.md`` (the seeds in the name, so that seeds
can run in parallel processes): each expert's accuracy on its own skill
(the base's in brackets) and each merge's normalised average and gain kept.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.llm_experts import FineTune  # noqa: E402
from benchmarks.llm_quality import (  # noqa: E402
    BASE,
    BENCHMARK_SKILLS,
    CACHE,
    FINE_TUNES,
    PRETRAINING_SKILLS,
    RESULTS,
    SIZES,
    Results,
    find,
    merge,
    run_benchmark,
)
from benchmarks.llm_skills import build_skills  # noqa: E402


@dataclass(frozen=True)
class Pilot:
    name: str
    skills: Tuple[str, ...]
    fine_tune: FineTune


BENCHMARK_FULL = next(tune for tune in FINE_TUNES if tune.kind == "full")
PILOTS = (
    Pilot("the benchmark (150 steps, lr 3e-4)", BENCHMARK_SKILLS, BENCHMARK_FULL),
    Pilot("300 steps, lr 3e-4", BENCHMARK_SKILLS, FineTune("full", steps=300, learning_rate=3e-4)),
    Pilot("addition, 150 steps", ("math", "compare", "code", "numbers"), BENCHMARK_FULL),
    Pilot("addition, 500 steps, lr 1e-3", ("math", "compare", "code", "numbers"),
          FineTune("full", steps=500, learning_rate=1e-3)),
    Pilot("reversing 3-5 letters", ("compare", "reverse", "code", "numbers"), BENCHMARK_FULL),
)
RECIPES = (merge("wudi"), merge("task_arithmetic", weight=1.0, **{"lambda": 1.0}))


def run_pilot(pilot: Pilot, seed: int, cache: Path) -> Optional[Results]:
    """The pilot's results, or None (logged) when an expert did not beat the base."""
    formats = build_skills(PRETRAINING_SKILLS, SIZES, seed)
    skills = [data for name in pilot.skills for data in formats if data.name == name]
    try:
        return run_benchmark(cache, seed, skills, BASE, (pilot.fine_tune,), RECIPES,
                             log=lambda line: print(f"[{pilot.name}, seed {seed}] {line}", flush=True),
                             pretraining_skills=formats)
    except RuntimeError as error:  # llm_quality.check_learnt: nothing to merge
        print(f"[{pilot.name}, seed {seed}] {error}", flush=True)
        return None


def pilot_row(pilot: Pilot, seed: int, results: Optional[Results]) -> str:
    if results is None:
        return f"| {pilot.name} | {seed} | an expert did not beat the base | | |"
    own = results.own_expert("full")
    learnt = ", ".join(f"{skill} {own[skill]:.3f} ({results.base[skill]:.3f})" for skill in results.skills)
    cells = []
    for recipe in RECIPES:
        parameters = {name: value for name, value in (*recipe.parameters, *recipe.expert_parameters)
                      if name != "weight"}
        row = find(results, "full", recipe.method, **parameters)
        cells.append(f"{row['normalised']:.1f} ({results.gain_kept(row['scores'], 'full'):.0f} %)")
    return f"| {pilot.name} | {seed} | {learnt} | " + " | ".join(cells) + " |"


def result_name(seeds: Sequence[int]) -> str:
    return f"llm_pilots_seed{'_'.join(map(str, seeds))}.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as llm_quality.py runs
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    started = time.perf_counter()
    lines: List[str] = [
        "# Pilots of the LLM benchmark's skills and fine-tuning budget", "",
        "Full fine-tunes of `benchmarks/llm_quality.py`'s base (one per seed, the same cache), merged"
        " by `mergekit-yaml`. Experts: accuracy on their own skill, the base's in brackets. Merges:"
        " normalised average (gain kept). From `python benchmarks/llm_pilots.py --seeds"
        f" {' '.join(map(str, args.seeds))}`.", "",
        "| pilot | seed | experts on their own skills (base) | wudi | task_arithmetic lambda=1 |",
        "|---|---|---|---|---|",
    ]
    for pilot in PILOTS:
        for seed in args.seeds:
            lines.append(pilot_row(pilot, seed, run_pilot(pilot, seed, args.cache)))
    lines += ["", f"Wall time: {(time.perf_counter() - started) / 60:.1f} min ({os.cpu_count()} CPU"
              " cores shared with other jobs, one thread)."]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / result_name(args.seeds)).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
