"""The interference report of the quality benchmark's experts (README, "Report").

    HF_HUB_OFFLINE=1 python benchmarks/report_quality.py

Reuses (or trains, about 15 min on 2 cores) the four all-MiniLM-L6-v2 experts of
``benchmarks/quality.py`` from ``benchmarks/.cache/quality``, writes the recipe
that benchmark merges as "wudi (defaults)", runs ``mergekit-wudi-report`` on it
as a user would, and copies the plots to ``benchmarks/results/report_*.png`` and
the terminal summary to ``benchmarks/results/report_quality.txt``.
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from benchmarks.quality import CACHE, RESULTS, wudi  # noqa: E402
from benchmarks.quality_tasks import (  # noqa: E402
    TASK_SOURCES,
    TaskSizes,
    TrainSettings,
    build_tasks,
    console_script,
    missing_prerequisites,
    prepare_family,
)

PLOTS = ("heatmap.png", "layers.png", "cosine.png", "expert_shares.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    missing = missing_prerequisites()
    if missing:
        print("missing prerequisites:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    family = prepare_family(args.cache, build_tasks(list(TASK_SOURCES), TaskSizes()),
                            TrainSettings(), log=print)
    scratch = args.cache / "report"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    recipe = scratch / "recipe.yml"
    recipe.write_text(yaml.safe_dump(wudi().config(family), sort_keys=False))
    started = time.perf_counter()
    completed = subprocess.run([console_script("mergekit-wudi-report"), str(recipe), str(scratch / "out")],
                               capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        print(completed.stdout, completed.stderr, file=sys.stderr)
        return completed.returncode
    args.results.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        shutil.copyfile(scratch / "out" / name, args.results / f"report_{name}")
    summary = (f"$ mergekit-wudi-report recipe.yml out   # the quality benchmark's 'wudi (defaults)'"
               f" recipe, {elapsed:.0f} s\n{completed.stdout}")
    (args.results / "report_quality.txt").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
