"""Offline benchmark of merged generative skills in a causal LM (the paper's Table 3 in miniature).

A small Llama is pretrained here on Debian text (benchmarks/pretrain.py), four
experts are fine-tuned from it on four generative skills (benchmarks/llm_skills.py),
once as full fine-tunes and once as LoRA adapters, and every merge runs through
``mergekit-yaml`` with the recipe a user writes (LoRA experts as ``base+adapter``):
WUDI over its knobs against mergekit's community methods over theirs. Each merged
model answers every skill's held-out prompts by greedy decoding, scored by exact
match and normalised to each skill's own expert.

    apt-get update && apt-get install -y wordnet-base fortunes
    HF_HUB_OFFLINE=1 python benchmarks/llm_quality.py [--seed 1]

Base and experts are cached under ``benchmarks/.cache/llm_quality`` (a rerun only
merges); results go to ``benchmarks/results/llm_quality.{md,json,png}`` for the
default seed and ``llm_quality_seed<N>.*`` for another.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality_tasks  # noqa: E402
from benchmarks.llm_experts import (  # noqa: E402
    BaseSettings,
    Family,
    FineTune,
    adapter_of,
    adapter_overlap,
    adapter_start_overlap,
    prepare_family,
    score,
)
from benchmarks.llm_skills import SkillData, SkillSizes, build_skills  # noqa: E402
from benchmarks.pretrain import FULL  # noqa: E402
from benchmarks.quality import normalised_average  # noqa: E402
from benchmarks.quality_tasks import Merge  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "llm_quality"
RESULTS = HERE / "results"
DEFAULT_SEED = 0

# The base reads seven prompt formats (WUDI_NOTES: a base that already reads them keeps the
# experts' updates small): pretraining mixes 4,000 examples of each into 30,000 Debian
# documents. The merges are scored on the four skills that 150 small steps teach its experts:
# benchmarks/llm_pilots.py runs the variants rejected (addition, reversing 3-5 letters, 300
# steps), whose experts either do not learn or cannot be merged (docs/llm-merges.md).
BASE = BaseSettings(FULL, steps=1500, max_documents=30_000)
FINE_TUNES = (FineTune("full", steps=150, learning_rate=3e-4),
              FineTune("lora", steps=150, learning_rate=2e-3))
PRETRAINING_SKILLS = ("math", "compare", "reverse", "reverse_four", "count", "code", "numbers")
BENCHMARK_SKILLS = ("compare", "reverse_four", "code", "numbers")
SIZES = SkillSizes(pretrain=4000, train=2000, test=200)
# The share of the experts' gain over the base (Results.gain_kept) the best merge must keep
# before methods are compared
# (WUDI_NOTES: below it every merge answers in one expert's format and nothing is told apart).
SKILL_KEPT_CHECK = 50.0
# Methods whose draws are random (DARE's drops, DELLA's): mergekit-yaml --random-seed.
RANDOM_METHODS = {"dare_ties", "dare_linear", "della"}

Scores = Dict[str, float]


def merge(method: str, uses_base: bool = True, **parameters) -> Merge:
    """A recipe: ``weight``/``density``/``epsilon``/``gamma`` go on every model, the rest global."""
    per_model = {"weight", "density", "epsilon", "gamma"}
    label = method + "".join(f" {name}={value:g}" if isinstance(value, float) else f" {name}={value}"
                             for name, value in parameters.items() if name != "weight")
    return Merge(label, method,
                 tuple((name, value) for name, value in parameters.items() if name not in per_model),
                 tuple((name, value) for name, value in parameters.items() if name in per_model),
                 uses_base)


def full_merges() -> List[Merge]:
    """WUDI over its knobs; each community method at its defaults and over its main knob."""
    spectral_llm = dict(solver="spectral", flow_time=math.inf, rank_ratio="auto",
                        rank_rule="gavish_donoho")
    # Ordered so that a run cut short still compares the main recipes.
    return [
        merge("wudi"),
        merge("task_arithmetic", weight=1.0, **{"lambda": 1.0}),
        merge("wudi", **spectral_llm),  # ASWUDI, full LLM fine-tunes
        merge("task_arithmetic", weight=1.0, **{"lambda": 0.3}),
        merge("ties", weight=1.0, density=0.5),
        # DARE at density 1 (mergekit's default) drops nothing: 0.5 is the usual recipe.
        merge("dare_ties", weight=1.0, density=0.5, **{"lambda": 1.0}),
        merge("wudi", **{"lambda": 0.3}),
        # DELLA's density must keep density +- epsilon (0.15) inside (0, 1): 1.0 is invalid.
        merge("della", weight=1.0, density=0.5),
        merge("linear", uses_base=False, weight=1.0),
        merge("wudi", solver="closed_form"),
        merge("model_stock"),
        merge("sce", select_topk=0.1),
        merge("dare_linear", weight=1.0, density=0.5, **{"lambda": 0.5}),
        merge("breadcrumbs_ties", weight=1.0),
        merge("wudi", **{"lambda": 0.5}),
        merge("task_arithmetic", weight=1.0, **{"lambda": 0.5}),
        merge("wudi", solver="spectral"),
        merge("ties", weight=1.0, density=1.0),
        merge("dare_ties", weight=1.0, density=0.5, **{"lambda": 0.5}),
        merge("wudi", learning_rate=1e-4),
        merge("sce", select_topk=1.0),
        merge("dare_linear", weight=1.0, density=0.5, **{"lambda": 1.0}),
        merge("breadcrumbs_ties", weight=1.0, **{"lambda": 0.5}),
        merge("wudi", solver="spectral", flow_time=300.0, rank_ratio=0.85),  # SWUDI, Llama
        merge("task_arithmetic", weight=1.0, **{"lambda": 0.2}),
        merge("wudi", **{"lambda": 0.7}),
    ]


@dataclass
class Results:
    skills: List[str]
    base: Scores
    experts: Dict[str, Dict[str, Scores]]  # kind -> expert's skill -> scores on every skill
    rows: List[dict]
    # Mean principal-angle cosine between the LoRA adapters' input spaces (llm_experts.adapter_overlap).
    lora_input_overlap: Optional[float] = None
    # ... and between each adapter's trained lora_A and its random start (adapter_start_overlap).
    lora_start_overlap: Optional[float] = None
    wall_time_s: Optional[float] = None  # of the run that measured the rows
    # In the JSON only when measured.
    OPTIONAL = ("lora_input_overlap", "lora_start_overlap", "wall_time_s")

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        return cls(data["skills"], data["base"], data["experts"], data["rows"],
                   **{name: data.get(name) for name in cls.OPTIONAL})

    def own_expert(self, kind: str) -> Scores:
        """Each skill's accuracy in its own expert: the normalisation."""
        return {skill: self.experts[kind][skill][skill] for skill in self.skills}

    def to_json(self) -> dict:
        measured = {name: getattr(self, name) for name in self.OPTIONAL if getattr(self, name) is not None}
        return {"skills": self.skills, "experts": self.experts, "base": self.base, "rows": self.rows,
                **measured}

    def gain_kept(self, scores: Scores, kind: str) -> float:
        """The share of the experts' gain over the base that a merge keeps, in %: summed over
        skills, (merged - base) / (own expert - base); 0 is the base, 100 the experts. Stricter
        than the normalised average where the base already has part of a skill, and pooled so
        that a skill the base nearly has (a small gain) does not swing it."""
        own = self.own_expert(kind)
        gained = sum(own[skill] - self.base[skill] for skill in self.skills)
        return 100.0 * sum(scores[skill] - self.base[skill] for skill in self.skills) / gained


def settings_of(recipe: Merge, random_seed: Optional[int]) -> dict:
    """The recipe's parameters as JSON holds them (an infinite flow_time as "inf")."""
    settings = {name: "inf" if value == math.inf else value
                for name, value in (*recipe.parameters, *recipe.expert_parameters)}
    if recipe.method in RANDOM_METHODS:
        settings["random_seed"] = random_seed
    return settings


def run_benchmark(cache: Path, seed: int, skills: Sequence[SkillData], base: BaseSettings,
                  fine_tunes: Sequence[FineTune], merges: Sequence[Merge],
                  log: Callable[[str], None] = print,
                  on_row: Callable[["Results"], None] = lambda results: None,
                  pretraining_skills: Optional[Sequence[SkillData]] = None) -> Results:
    """Scores of the base, the experts, and every merge of both expert kinds; ``on_row``
    sees the results after each recipe."""
    family = prepare_family(cache, seed, base, fine_tunes, skills, log, pretraining_skills)
    names = [data.name for data in skills]
    results = Results(names, score(str(family.base), family, skills), {}, [])
    if "lora" in family.experts:
        adapters = {skill: adapter_of(reference) for skill, reference in family.experts["lora"].items()}
        lora = next(settings for settings in fine_tunes if settings.kind == "lora")
        results.lora_input_overlap = adapter_overlap(list(adapters.values()))
        results.lora_start_overlap = sum(
            adapter_start_overlap(family.base, data, lora, seed, adapters[data.name])
            for data in skills) / len(skills)
        log(f"LoRA adapters' input overlap: {results.lora_input_overlap:.3f} between skills,"
            f" {results.lora_start_overlap:.3f} with their random start")
    for kind, experts in family.experts.items():
        results.experts[kind] = {skill: score(reference, family, skills)
                                 for skill, reference in experts.items()}
        check_learnt(kind, results.own_expert(kind), results.base)
        log(f"{kind} experts on their own skills: {results.own_expert(kind)};"
            f" base: {results.base}")
    for recipe in merges:  # both kinds per recipe: a run cut short has rows of both
        for kind, experts in family.experts.items():
            started = time.perf_counter()
            view = quality_tasks.Family(family.base, experts, {})
            scores = merge_and_score(recipe, view, family, skills, cache / f"merged-seed{seed}", seed)
            row = {"method": recipe.method, "settings": settings_of(recipe, seed), "experts": kind,
                   "scores": scores, "average": sum(scores.values()) / len(scores),
                   "normalised": normalised_average(scores, results.own_expert(kind))}
            results.rows.append(row)
            log(f"{kind} {recipe.label}: {row['normalised']:.1f} normalised"
                f" ({time.perf_counter() - started:.0f} s)")
        on_row(results)
    return results


def check_learnt(kind: str, own: Scores, base: Scores) -> None:
    """Each expert must beat the base on its skill: it is what the merges are normalised by."""
    unlearnt = [skill for skill in own if own[skill] <= base[skill]]
    if unlearnt:
        raise RuntimeError(f"{kind} experts did not learn {unlearnt} (own expert {own},"
                           f" base {base}): nothing to merge")


def lora_merge_cache(experts: Mapping[str, str], scratch: Path) -> Optional[Path]:
    """Where mergekit applies the ``base+adapter`` experts; None when there are none."""
    return scratch / "lora" if any(adapter_of(model) for model in experts.values()) else None


def merge_and_score(recipe: Merge, view: quality_tasks.Family, family: Family,
                    skills: Sequence[SkillData], scratch: Path, seed: int) -> Scores:
    random_seed = seed if recipe.method in RANDOM_METHODS else None
    out = quality_tasks.run_merge(recipe, view, scratch / "model", random_seed,
                                  lora_merge_cache(view.experts, scratch))
    try:
        return score(str(out), family, skills)
    finally:
        shutil.rmtree(out)  # only the scores are kept


def interference_report(family: Family, scratch: Path) -> str:
    """``mergekit-wudi-report`` on the WUDI recipe (defaults) of each expert kind: its summary,
    under a heading per kind. Eq. 21's interference, with no data, next to what the merges lost."""
    import yaml

    sections = []
    for kind, experts in family.experts.items():
        recipe = scratch / f"report-{kind}.yml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(merge("wudi").config(
            quality_tasks.Family(family.base, experts, {})), sort_keys=False))
        completed = subprocess.run(
            [quality_tasks.console_script("mergekit-wudi-report"), str(recipe), str(scratch / f"report-{kind}"),
             *quality_tasks.lora_merge_options(lora_merge_cache(experts, scratch))],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if completed.returncode != 0:
            raise RuntimeError(f"mergekit-wudi-report on the {kind} experts failed"
                               f" (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        summary_lines = [line for line in completed.stdout.splitlines() if not line.startswith("Wrote")]
        sections += [f"## {kind} experts", "", *summary_lines, ""]
    return "\n".join(sections)


def label(row: Mapping) -> str:
    return row["method"] + "".join(f" {name}={value:g}" if isinstance(value, float)
                                   else f" {name}={value}"
                                   for name, value in row["settings"].items()
                                   if name not in ("weight", "random_seed"))


def find(results: Results, kind: str, method: str, **settings) -> dict:
    """The row of ``method`` with exactly ``settings`` (weight and random_seed aside)."""
    for row in results.rows:
        shown = {name: value for name, value in row["settings"].items()
                 if name not in ("weight", "random_seed")}
        if row["experts"] == kind and row["method"] == method and shown == settings:
            return row
    raise KeyError(f"no {kind} row {method} {settings}")


def markdown_tables(results: Results) -> List[str]:
    skills = results.skills
    header = "| " + " | ".join(["model", *skills, "average", "normalised", "gain kept"]) + " |"
    rule = "|---" * (len(skills) + 4) + "|"
    lines: List[str] = []
    for kind in results.experts:
        own = results.own_expert(kind)
        lines += [f"### {kind} experts", "", header, rule]
        for skill, scores in results.experts[kind].items():
            lines.append(f"| {skill} expert | " + " | ".join(f"{scores[name]:.3f}" for name in skills)
                         + f" | {sum(scores.values()) / len(scores):.3f} | | |")
        base = results.base
        lines.append("| base | " + " | ".join(f"{base[name]:.3f}" for name in skills)
                     + f" | {sum(base.values()) / len(base):.3f} |"
                     f" {normalised_average(base, own):.1f} | 0.0 |")
        rows = sorted((row for row in results.rows if row["experts"] == kind),
                      key=lambda row: -row["normalised"])
        for row in rows:
            lines.append(f"| {label(row)} | " + " | ".join(f"{row['scores'][name]:.3f}" for name in skills)
                         + f" | {row['average']:.3f} | {row['normalised']:.1f} |"
                         f" {results.gain_kept(row['scores'], kind):.1f} |")
        lines.append("")
    return lines


def summary(results: Results) -> List[str]:
    """The check, then WUDI against the rest, per kind; lines of rows not (yet) run are left out."""
    lines = []
    for kind in results.experts:
        rows = [row for row in results.rows if row["experts"] == kind]
        if not rows:
            continue
        top = max(rows, key=lambda row: results.gain_kept(row["scores"], kind))
        top_gain = results.gain_kept(top["scores"], kind)
        base = normalised_average(results.base, results.own_expert(kind))
        lines.append(
            f"- **{kind} experts.** Check before comparing: the best merge ({label(top)}) keeps"
            f" {top_gain:.1f}% of the experts' gain over the base (normalised {top['normalised']:.1f}%,"
            f" base {base:.1f}%): {'passed' if round(top_gain, 1) >= SKILL_KEPT_CHECK else 'FAILED'}"
            f" (needs {SKILL_KEPT_CHECK:g}% of the gain).")
        wudi = [row for row in rows if row["method"] == "wudi"]
        others = [row for row in rows if row["method"] != "wudi"]
        if wudi and others:
            top_wudi = max(wudi, key=lambda row: row["normalised"])
            top_other = max(others, key=lambda row: row["normalised"])
            lines.append(
                f"  Best WUDI: {label(top_wudi)} {top_wudi['normalised']:.1f}; best other method:"
                f" {label(top_other)} {top_other['normalised']:.1f}"
                f" ({top_wudi['normalised'] - top_other['normalised']:+.1f} points).")
        try:
            defaults, arithmetic = find(results, kind, "wudi"), find(
                results, kind, "task_arithmetic", **{"lambda": 1.0})
            lines.append(f"  WUDI at its defaults {defaults['normalised']:.1f}; task arithmetic"
                         f" at lambda 1 {arithmetic['normalised']:.1f}.")
        except KeyError:
            pass
        if kind == "lora" and results.lora_input_overlap is not None:
            lines.append(f"  The adapters' input spaces overlap {results.lora_input_overlap:.3f}"
                         " between skills (mean principal-angle cosine of their lora_A; 1 = the same"
                         " directions)"
                         + (f" and {results.lora_start_overlap:.3f} with their random start"
                            if results.lora_start_overlap is not None else "") + ".")
    return lines


def seeds_table(by_seed: Mapping[int, Results]) -> List[str]:
    """One markdown table across seeds: per recipe, normalised average and gain kept for each
    expert kind and seed, sorted by the full fine-tunes' mean normalised score."""
    seeds = sorted(by_seed)
    kinds = [kind for kind in ("full", "lora") if all(kind in by_seed[seed].experts for seed in seeds)]
    columns = [(kind, seed) for kind in kinds for seed in seeds]
    recipes: Dict[str, Dict[tuple, str]] = {}
    means: Dict[str, float] = {}
    for kind, seed in columns:
        results = by_seed[seed]
        cells = {"base": f"{normalised_average(results.base, results.own_expert(kind)):.1f} (0)"}
        for row in results.rows:
            if row["experts"] == kind:
                cells[label(row)] = (f"{row['normalised']:.1f}"
                                     f" ({results.gain_kept(row['scores'], kind):.0f})")
                if kind == kinds[0]:
                    means[label(row)] = means.get(label(row), 0.0) + row["normalised"] / len(seeds)
        for name, cell in cells.items():
            recipes.setdefault(name, {})[kind, seed] = cell
    order = sorted((name for name in recipes if name != "base"), key=lambda name: -means.get(name, 0.0))
    lines = ["| recipe | " + " | ".join(f"{kind}, seed {seed}" for kind, seed in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name in [*order, "base"]:
        lines.append(f"| `{name}` | " + " | ".join(recipes[name].get(column, "") for column in columns) + " |")
    return lines


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results.experts)
    count = max(sum(row["experts"] == kind for row in results.rows) for kind in kinds)
    figure, axes = plt.subplots(1, len(kinds), figsize=(8 * len(kinds), 0.28 * count + 1.5),
                                squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        rows = sorted((row for row in results.rows if row["experts"] == kind),
                      key=lambda row: row["normalised"])
        colours = ["tab:red" if row["method"] == "wudi" else "tab:grey" for row in rows]
        bars = axis.barh(range(len(rows)), [row["normalised"] for row in rows], color=colours)
        axis.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        base = normalised_average(results.base, results.own_expert(kind))
        axis.axvline(base, color="black", linestyle="--", linewidth=0.8, label=f"base {base:.1f}")
        axis.axvline(100, color="black", linewidth=0.8)
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels([label(row) for row in rows], fontsize=7)
        axis.set_xlabel("normalised accuracy, % of each skill's own expert (red: WUDI)")
        axis.set_title(f"{kind} experts, {len(results.skills)} skills")
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # long recipe labels stay whole
    plt.close(figure)


def result_stem(seed: int) -> str:
    return "llm_quality" if seed == DEFAULT_SEED else f"llm_quality_seed{seed}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="pretraining, fine-tuning, data splits and DARE's draws")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--redraw", action="store_true",
                        help="only redraw the seed's table and plot from its JSON (no training, no merges)")
    parser.add_argument("--table", type=int, nargs="+", metavar="SEED",
                        help="only write <results>/llm_quality_seeds.md: every recipe's normalised"
                        " average (gain kept) across these seeds' JSON files")
    parser.add_argument("--report", action="store_true",
                        help="only run mergekit-wudi-report on the seed's WUDI recipes (base and"
                        " experts trained or reused from the cache), into <results>/<name>_report.txt")
    args = parser.parse_args(argv)
    # One thread, here and in mergekit-yaml: models this small gain little from two, and on
    # a shared machine two threads per process spin against each other (30x slower here).
    torch.set_num_threads(1)
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    started = time.perf_counter()
    formats = build_skills(PRETRAINING_SKILLS, SIZES, args.seed)
    skills = [data for data in formats if data.name in BENCHMARK_SKILLS]
    merges = full_merges()
    stem = result_stem(args.seed)
    args.results.mkdir(parents=True, exist_ok=True)

    def write(results: Results) -> None:
        """The report so far; until every merge is in, it says PARTIAL in its title and file."""
        done = len({(row["method"], json.dumps(row["settings"])) for row in results.rows})
        partial = done < len(merges)
        report = render(results, args.seed,
                        f"PARTIAL: {done} of {len(merges)} recipes. " if partial else "")
        name = stem + ("_partial" if partial else "")
        (args.results / f"{name}.md").write_text(report + "\n")
        # JSON: the raw scores, which other programs read; the table and plot are redrawn from it.
        (args.results / f"{name}.json").write_text(json.dumps(results.to_json(), indent=1, allow_nan=False) + "\n")
        plot(results, args.results / f"{name}.png")
        if not partial:
            for suffix in ("md", "json", "png"):
                (args.results / f"{stem}_partial.{suffix}").unlink(missing_ok=True)
            print(report)

    if args.table:
        by_seed = {seed: Results.from_json(json.loads((args.results / f"{result_stem(seed)}.json").read_text()))
                   for seed in args.table}
        table = "\n".join([
            f"# Merged generative skills across seeds {', '.join(map(str, sorted(by_seed)))}", "",
            "Normalised average (% of each skill's own expert), with the share of the experts' gain"
            " over the base kept in brackets (%); from `python benchmarks/llm_quality.py --table"
            f" {' '.join(map(str, args.table))}`.", "", *seeds_table(by_seed)])
        (args.results / "llm_quality_seeds.md").write_text(table + "\n")
        print(table)
        return 0
    if args.redraw:
        write(Results.from_json(json.loads((args.results / f"{stem}.json").read_text())))
        return 0
    if args.report:
        family = prepare_family(args.cache, args.seed, BASE, FINE_TUNES, skills, print, formats)
        text = interference_report(family, args.cache / f"report-seed{args.seed}")
        (args.results / f"{stem}_report.txt").write_text(
            f"# mergekit-wudi-report on the WUDI recipes (defaults) of seed {args.seed}"
            f" (`python benchmarks/llm_quality.py --seed {args.seed} --report`)\n\n{text}")
        print(text)
        return 0

    def timed_write(results: Results) -> None:
        results.wall_time_s = time.perf_counter() - started
        write(results)

    write(run_benchmark(args.cache, args.seed, skills, BASE, FINE_TUNES, merges, on_row=timed_write,
                        pretraining_skills=formats))
    return 0


def render(results: Results, seed: int, status: str) -> str:
    size = BASE.size
    return "\n".join([
        f"# Merged generative skills in a small Llama (seed {seed})",
        "",
        f"{status}Base: LlamaForCausalLM, hidden {size.hidden}, {size.layers} layers, {size.heads} heads"
        f" ({size.kv_heads} key-value), SwiGLU {size.intermediate}, BPE vocabulary {size.vocab},"
        f" pretrained {BASE.steps} steps x {BASE.batch_size} x {size.context} tokens on Debian"
        f" text ({BASE.max_documents} documents) plus {SIZES.pretrain} examples of each of"
        f" {', '.join(PRETRAINING_SKILLS)}. Experts: "
        + "; ".join(f"{tune.kind} {tune.steps} AdamW steps x {tune.batch_size}, lr {tune.learning_rate:g}"
                    + (f", rank {tune.lora_rank}, alpha {tune.lora_alpha}" if tune.kind == "lora" else "")
                    for tune in FINE_TUNES)
        + f"; {SIZES.train} training and {SIZES.test} held-out test prompts per skill."
        f" Merges: mergekit-yaml, float32; DARE and DELLA with --random-seed {seed}."
        " Accuracy: greedy decoding, exact match, as a fraction; normalised: each skill's"
        " accuracy over its own expert's, in %, averaged; gain kept: (merged - base) over"
        " (own experts - base), accuracies summed over the skills, in %.",
        "",
        *summary(results),
        "",
        *markdown_tables(results),
        f"Wall time: {results.wall_time_s / 60:.1f} min (`python benchmarks/llm_quality.py --seed {seed}`,"
        f" {os.cpu_count()} CPU cores shared with other jobs, one thread)."
        if results.wall_time_s is not None else "Wall time: not recorded.",
    ])


if __name__ == "__main__":
    sys.exit(main())
