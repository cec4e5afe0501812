"""Alignment quality (issue 19): averaging two models trained from different seeds,
after no alignment, weight matching, activation matching and MuDSC.

    python benchmarks/align_quality.py --part digits      # about 2 min on 2 cores
    python benchmarks/align_quality.py --part lm          # pretrains two LMs once (cached), then ~10 min
    python benchmarks/align_quality.py --part hungarian   # linear_sum_assignment time and memory

Each part updates its entry of ``benchmarks/results/align_quality.json`` and rewrites
``align_quality.md`` from all entries.

(a) digits: MLPs 64-128-128-10 on scikit-learn's bundled 8x8 digits, model A on
labels 0-4, model B on labels 5-9, each from its own seed (the MuDSC paper's MNIST
setting at small size). B is aligned to A with ``mergekit_wudi.align.matching``
(groups: the two hidden layers; activations: the ReLU outputs on the training
images of both tasks) and the two are averaged. Score: accuracy on each task's
test images, argmax over that task's five labels. Mean over three seed pairs.

(b) language models: two small Llama LMs pretrained by ``benchmarks/pretrain.py``
from seeds 1 and 2 on the same Debian text (one tokenizer), aligned by the
``mergekit-wudi-align`` command (calibration: 2000 training documents) and merged
by the ``merge.yml`` it writes through ``mergekit-yaml``; score: held-out loss
(nats per token) against each endpoint's. The command always starts from activation
matching (as the official code), so its ``--alpha 1`` is weight-space descent from
there, not the identity-started weight matching of part (a).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit_wudi.align.matching import match  # noqa: E402
from mergekit_wudi.align.permute import permute_state_dict  # noqa: E402
from mergekit_wudi.align.statistics import CrossMoments  # noqa: E402
from mergekit_wudi.align.structure import Group, Member, Site, Structure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ALPHAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
TASKS = {"A (0-4)": list(range(5)), "B (5-9)": list(range(5, 10))}
SEED_PAIRS = ((0, 1), (2, 3), (4, 5))
WIDTH = 128


def method_name(alpha):
    return {None: "plain average", 0.0: "activation matching (alpha 0)",
            1.0: "weight matching (alpha 1)"}.get(alpha, f"MuDSC alpha {alpha}")


# ---------------------------------------------------------------- (a) digits
def digits_data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return (as_tensor(x_train, torch.float32), as_tensor(y_train, torch.long),
            as_tensor(x_test, torch.float32), as_tensor(y_test, torch.long))


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                               torch.nn.ReLU(), torch.nn.Linear(WIDTH, 10))


def train_mlp(seed, labels, x, y, epochs=300):
    torch.manual_seed(seed)
    model = mlp()
    keep = torch.isin(y, torch.tensor(labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(x[keep]), y[keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def task_accuracy(model, labels, x, y):
    keep = torch.isin(y, torch.tensor(labels))
    with torch.no_grad():
        logits = model(x[keep])[:, labels]
    return float((torch.tensor(labels)[logits.argmax(1)] == y[keep]).float().mean())


def mlp_structure(model) -> Structure:
    """The MLP's permutation groups: each hidden layer's units (its rows and bias, the next layer's columns)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    column = torch.arange(WIDTH)[:, None]
    groups = [
        Group(f"hidden{k}", WIDTH,
              [Member((f"{produce}.weight", 0), column), Member((f"{produce}.bias", 0), column),
               Member((f"{consume}.weight", 1), column)],
              [Site(f"hidden{k}", (f"{consume}.weight", 1), column)], chain=f"hidden{k}")
        for k, (produce, consume) in enumerate(((0, 2), (2, 4)))
    ]
    return Structure("mlp", groups, {}, shapes)


def hidden_correlations(reference, model, x):
    """Pearson correlation of the two ReLU outputs, reference units by model units."""
    correlations = {}
    with torch.no_grad():
        for k, depth in enumerate((2, 4)):
            outputs = [net[:depth](x) for net in (reference, model)]
            moments = CrossMoments(WIDTH, "cpu")
            moments.add(*outputs)
            correlations[f"hidden{k}"] = moments.correlation()
    return correlations


def merged_mlp(reference, model, alpha, correlations):
    state = model.state_dict()
    if alpha is not None:
        structure = mlp_structure(reference)
        # Weight matching uses no activations (Git Re-Basin: from the identity); every other
        # alpha starts from activation matching as the official MuDSC code does.
        permutations, _ = match(structure, reference.state_dict(), state, None if alpha == 1 else correlations, alpha)
        state = permute_state_dict(structure, state, permutations)
    merged = mlp()
    merged.load_state_dict({n: (t + state[n]) / 2 for n, t in reference.state_dict().items()})
    return merged.eval()


def run_digits():
    x_train, y_train, x_test, y_test = digits_data()
    rows = {}
    for seed_a, seed_b in SEED_PAIRS:
        a = train_mlp(seed_a, TASKS["A (0-4)"], x_train, y_train)
        b = train_mlp(seed_b, TASKS["B (5-9)"], x_train, y_train)
        correlations = hidden_correlations(a, b, x_train)
        candidates = {"endpoint A": a, "endpoint B": b}
        for alpha in (None, *ALPHAS):
            candidates[method_name(alpha)] = merged_mlp(a, b, alpha, correlations)
        for name, model in candidates.items():
            scores = [task_accuracy(model, labels, x_test, y_test) for labels in TASKS.values()]
            rows.setdefault(name, []).append(scores)
    table = {name: {"A": float(np.mean([s[0] for s in v])), "B": float(np.mean([s[1] for s in v])),
                    "mean": float(np.mean(v)), "per_pair": v} for name, v in rows.items()}
    return {"seed_pairs": SEED_PAIRS, "width": WIDTH, "table": table}


# ---------------------------------------------------------------- (b) language models
def lm_size():
    from benchmarks.pretrain import LlamaSize

    return LlamaSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=344, vocab=2048, context=64)


LM_SEEDS, LM_STEPS, LM_BATCH = (1, 2), 600, 16
LM_CALIBRATION_DOCUMENTS, LM_HELDOUT_TOKENS, LM_MAX_TOKENS = 2000, 30000, 32768


def _average_directories(first: Path, second: Path, out: Path):
    """The plain average of two model directories (no alignment), with the first's config and tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(first)
    other = LlamaForCausalLM.from_pretrained(second).state_dict()
    model.load_state_dict({n: (t + other[n]) / 2 for n, t in model.state_dict().items()})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(first).save_pretrained(out)


def run_lm(cache: Path):
    from benchmarks.pretrain import debian_corpus, heldout_loss, pretrained_llama, split_corpus

    training, heldout = split_corpus(debian_corpus(), 0)
    bases = [pretrained_llama(cache, seed, lm_size(), steps=LM_STEPS, batch_size=LM_BATCH, log=print)
             for seed in LM_SEEDS]
    rows, timings = {}, {}
    for seed, base in zip(LM_SEEDS, bases):
        rows[f"endpoint seed {seed}"] = heldout_loss(base, heldout, LM_HELDOUT_TOKENS)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        scratch = Path(scratch)
        calibration = scratch / "calibration.txt"
        calibration.write_text("\n".join(d.replace("\n", " ") for d in training[:LM_CALIBRATION_DOCUMENTS]))
        _average_directories(*bases, scratch / "plain")
        rows[method_name(None)] = heldout_loss(scratch / "plain", heldout, LM_HELDOUT_TOKENS)
        for alpha in (0.0, 0.5, 1.0):
            out = scratch / f"aligned-{alpha}"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mergekit_wudi.align", str(bases[0]), str(bases[1]),
                            "--calibration", str(calibration), "--out", str(out), "--alpha", str(alpha),
                            "--max-tokens", str(LM_MAX_TOKENS)], check=True)
            name = f"mergekit-wudi-align --alpha {alpha}"
            timings[name] = time.perf_counter() - started
            merged = scratch / f"merged-{alpha}"
            subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(out / "merge.yml"),
                            str(merged)], check=True, capture_output=True)
            rows[name] = heldout_loss(merged, heldout, LM_HELDOUT_TOKENS)
    size = lm_size()
    return {"size": size.__dict__, "steps": LM_STEPS, "seeds": LM_SEEDS, "heldout_tokens": LM_HELDOUT_TOKENS,
            "calibration_documents": LM_CALIBRATION_DOCUMENTS, "calibration_tokens": LM_MAX_TOKENS,
            "loss": rows, "align_seconds": timings}


# ---------------------------------------------------------------- Hungarian cost
def _time_assignment(n):
    """Run in a fresh process: (seconds, peak resident MiB) of one maximising assignment."""
    code = (
        "import time, resource, numpy as np\n"
        "from scipy.optimize import linear_sum_assignment\n"
        f"s = np.random.default_rng(0).random(({n}, {n}))\n"
        "t = time.perf_counter(); linear_sum_assignment(s, maximize=True); t = time.perf_counter() - t\n"
        "print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def run_hungarian(sizes):
    measured = {n: _time_assignment(n) for n in sizes}
    largest = max(sizes)
    seconds, _ = measured[largest]
    projected = seconds * (11008 / largest) ** 3
    return {"sizes": {str(n): {"seconds": t, "peak_mib": m} for n, (t, m) in measured.items()},
            "projected_11008_seconds_cubic": projected if largest < 11008 else None,
            "matrix_mib_11008": 11008**2 * 8 / 2**20}


# ---------------------------------------------------------------- report
def render(results) -> str:
    lines = ["# Alignment quality (issue 19)", "", "Made by `python benchmarks/align_quality.py` (see its docstring).", ""]
    if "digits" in results:
        d = results["digits"]
        lines += [f"## (a) digits MLPs (64-{d['width']}-{d['width']}-10), task A: labels 0-4, task B: 5-9, "
                  f"mean of {len(d['seed_pairs'])} seed pairs", "",
                  "| model | task A acc | task B acc | mean |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['A']:.3f} | {r['B']:.3f} | {r['mean']:.3f} |" for name, r in d["table"].items()]
        lines.append("")
    if "lm" in results:
        m = results["lm"]
        s = m["size"]
        lines += [f"## (b) two Llama LMs (hidden {s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} "
                  f"heads, MLP {s['intermediate']}, vocab {s['vocab']}) pretrained {m['steps']} steps from seeds "
                  f"{m['seeds'][0]} and {m['seeds'][1]}; held-out loss (nats/token, {m['heldout_tokens']} tokens)", "",
                  "| model | held-out loss | alignment time (s) |", "|---|---|---|"]
        lines += [f"| {name} | {loss:.4f} | {m['align_seconds'].get(name, float('nan')):.0f} |"
                  if name in m["align_seconds"] else f"| {name} | {loss:.4f} | |" for name, loss in m["loss"].items()]
        lines.append("")
    if "hungarian" in results:
        h = results["hungarian"]
        lines += ["## linear_sum_assignment (scipy, maximise) on a random dense float64 matrix, one process each", "",
                  "| units | seconds | peak RSS (MiB) |", "|---|---|---|"]
        lines += [f"| {n} | {r['seconds']:.2f} | {r['peak_mib']:.0f} |" for n, r in h["sizes"].items()]
        if h["projected_11008_seconds_cubic"]:
            lines.append(f"\nProjected at 11008 units by the cubic law: {h['projected_11008_seconds_cubic']:.0f} s; "
                         f"the similarity matrix alone is {h['matrix_mib_11008']:.0f} MiB.")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("digits", "lm", "hungarian"), required=True)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mergekit_wudi_align_cache")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 11008])
    args = parser.parse_args(argv)
    if args.part == "digits":
        entry = run_digits()
    elif args.part == "lm":
        args.cache.mkdir(parents=True, exist_ok=True)
        entry = run_lm(args.cache)
    else:
        entry = run_hungarian(args.sizes)
    # Read only now: another part may have finished while this one ran.
    path = RESULTS / "align_quality.json"
    results = {**(json.loads(path.read_text()) if path.exists() else {}), args.part: entry}
    path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "align_quality.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
