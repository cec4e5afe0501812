"""The report's outputs: ``report.json``, the plots (PNG), ``report.html`` and the terminal summary.

The HTML page is self-contained: the plots are embedded as base64 PNG and the
page loads nothing else, so it opens offline. Plots need matplotlib (the
``report`` extra); everything else needs only the standard library.
"""

import base64
import dataclasses
import html
import io
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_wudi.report.figures import POINTS, overall

FORMAT = "mergekit-wudi-report/1"
EXTRA = "report"
INSTALL_HINT = f"pip install 'mergekit-wudi[{EXTRA}]'"

POINT_LABELS = {
    "zero": "base (no update)",
    "sum": "task arithmetic (sum)",
    "average": "average",
    "solution": "WUDI solution",
    "merged": "WUDI x lambda (as written)",
}
POINT_MEANINGS = {
    "zero": "no update at all, the base model: the scale of the relative figures",
    "sum": "sum of the weighted task vectors: task arithmetic at lambda 1, WUDI's start",
    "average": "sum divided by the number of contributing experts",
    "solution": "the configured solver's merged task vector tau_m",
    "merged": "lambda * tau_m, the update mergekit-yaml writes",
}
TOP = 10


def missing_plot_dependency() -> Optional[str]:
    """None when the plots can be drawn, else what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"mergekit-wudi-report draws its plots with matplotlib: {INSTALL_HINT}"
    return None


# ---------------------------------------------------------------- names


_INDEX = re.compile(r"^\d+$")


def layer_and_module(name: str) -> Tuple[Optional[int], str]:
    """The first numeric segment of a tensor name is its layer; what follows, its module type.

    ``model.layers.3.self_attn.q_proj.weight`` -> (3, ``self_attn.q_proj``); a name
    without one (``lm_head.weight``) -> (None, ``lm_head``).
    """
    segments = name.split(".")
    if segments[-1] == "weight":
        segments = segments[:-1]
    for index, segment in enumerate(segments):
        if _INDEX.match(segment):
            return int(segment), ".".join(segments[index + 1:]) or name
    return None, ".".join(segments)


def expert_labels(models: Sequence[str]) -> List[str]:
    """Short names for plots: each path's last part (an adapter's for ``base+adapter``)."""
    short = [model.split("+")[-1].rstrip("/").split("/")[-1] or model for model in models]
    return short if len(set(short)) == len(short) else list(models)


# ---------------------------------------------------------------- report.json


def build_report(tensors: Sequence[Any], experts: Sequence[str], recipe: Mapping[str, Any],
                 options: Mapping[str, Any], versions: Mapping[str, str]) -> Dict[str, Any]:
    """The whole report as JSON-ready data; ``tensors`` are ``binding.TensorReport``s."""
    rows, summaries = [], []
    for tensor in tensors:
        layer, module = layer_and_module(tensor.name)
        row = {
            "name": tensor.name, "layer": layer, "module": module, "shape": tensor.shape,
            "dtype": tensor.dtype, "fate": tensor.fate, "reason": tensor.reason,
            "view": tensor.view, "parameters": tensor.parameters,
        }
        if tensor.summary is not None:
            row.update(dataclasses.asdict(tensor.summary))
            summaries.append(tensor.summary)
        rows.append(row)
    counts = {fate: sum(row["fate"] == fate for row in rows)
              for fate in ("wudi", "task_arithmetic", "unchanged")}
    return {
        "format": FORMAT,
        "versions": dict(versions),
        "recipe": dict(recipe),
        "options": dict(options),
        "experts": [{"model": model, "label": label}
                    for model, label in zip(experts, expert_labels(experts))],
        "points": {point: POINT_MEANINGS[point] for point in POINTS},
        "totals": {"tensors": counts, **overall(summaries)},
        "tensors": rows,
    }


def solved(report: Mapping[str, Any]) -> List[Dict[str, Any]]:
    return [row for row in report["tensors"] if row["fate"] == "wudi"]


def most_interfering(report: Mapping[str, Any], count: int = TOP) -> List[Dict[str, Any]]:
    """The solved tensors with the highest interference at task arithmetic, relative to the base."""
    return sorted(solved(report), key=lambda row: -(row["relative"]["sum"] or 0.0))[:count]


# ---------------------------------------------------------------- terminal


def _number(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_text(report: Mapping[str, Any]) -> str:
    totals = report["totals"]
    counts = totals["tensors"]
    lines = [
        f"{counts['wudi']} tensors solved by WUDI, {counts['task_arithmetic']} by task"
        f" arithmetic, {counts['unchanged']} unchanged.",
    ]
    if totals["loss"]:
        lines.append("Interference (Eq. 21) summed over the solved tensors; relative: base = 1")
        for point, value in totals["loss"].items():
            # At lambda 1 "merged" is the solution itself.
            if point != "zero" and not (point == "merged" and value == totals["loss"]["solution"]):
                lines.append(f"  {POINT_LABELS[point]:<28} {_number(value):>11}"
                             f"   relative {_number(totals['relative'][point], 3)}")
        if totals["removed"] is not None:
            lines.append(f"  WUDI removes {_percent(totals['removed'])} of task arithmetic's interference.")
        lines.append("Most interfering tensors (relative interference at task arithmetic):")
        top = most_interfering(report)
        width = max(len(row["name"]) for row in top)
        lines.append(f"  {'tensor':<{width}} {'sum':>8} {'WUDI':>8} {'removed':>8}")
        for row in top:
            lines.append(f"  {row['name']:<{width}} {_number(row['relative']['sum'], 3):>8}"
                         f" {_number(row['relative'].get('solution'), 3):>8}"
                         f" {_percent(row['removed']):>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def compared_points(report: Mapping[str, Any]) -> Tuple[str, str]:
    """Task arithmetic against WUDI's solution, or against the average without a solve."""
    return ("sum", "solution") if "solution" in report["totals"]["loss"] else ("sum", "average")


def _grid(rows: Sequence[Mapping[str, Any]]):
    layers = sorted({row["layer"] for row in rows}, key=lambda layer: (layer is None, layer or 0))
    modules = list(dict.fromkeys(row["module"] for row in rows))
    return layers, modules


def _relative_of(rows: Sequence[Mapping[str, Any]], point: str) -> Optional[float]:
    zero = sum(row["loss"]["zero"] for row in rows)
    return sum(row["loss"][point] for row in rows) / zero if zero else None


def heatmap_png(report: Mapping[str, Any]) -> bytes:
    """Layers x module types, relative interference at task arithmetic and after WUDI."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    rows = solved(report)
    layers, modules = _grid(rows)
    points = compared_points(report)
    grids = []
    for point in points:
        grid = [[math.nan] * len(modules) for _ in layers]
        for layer_index, layer in enumerate(layers):
            for module_index, module in enumerate(modules):
                cell = [row for row in rows if row["layer"] == layer and row["module"] == module]
                value = _relative_of(cell, point) if cell else None
                if value is not None:
                    grid[layer_index][module_index] = value
        grids.append(grid)
    positive = [value for grid in grids for line in grid for value in line if value > 0]
    top = max(positive, default=1.0)
    norm = LogNorm(vmin=max(min(positive, default=top / 10), top * 1e-4), vmax=top)
    width = max(8.0, 2.0 + 1.6 * len(modules)) * len(points) / 1.6
    height = max(3.5, 1.6 + 0.42 * len(layers))
    figure, axes = plt.subplots(1, len(points), figsize=(min(width, 18), height), squeeze=False,
                                constrained_layout=True)
    for axis, point, grid in zip(axes[0], points, grids):
        image = axis.imshow([[max(v, norm.vmin) if v == v else v for v in line] for line in grid],
                            cmap="magma", norm=norm, aspect="auto")
        axis.set_title(f"{POINT_LABELS[point]}")
        axis.set_xticks(range(len(modules)))
        axis.set_xticklabels(modules, rotation=35, ha="right", fontsize=8)
        axis.set_yticks(range(len(layers)))
        axis.set_yticklabels(["-" if layer is None else str(layer) for layer in layers], fontsize=8)
        axis.set_ylabel("layer")
        if len(layers) * len(modules) <= 200:
            for layer_index, line in enumerate(grid):
                for module_index, value in enumerate(line):
                    if value == value:
                        light = norm(max(value, norm.vmin)) < 0.6
                        axis.text(module_index, layer_index, f"{value:.2g}", ha="center",
                                  va="center", fontsize=7, color="white" if light else "black")
    figure.colorbar(image, ax=axes[0].tolist(), label="interference / interference of the base")
    figure.suptitle("Interference on each expert's own input subspace (Eq. 21), relative to the base")
    return _png(figure)


def cosine_png(report: Mapping[str, Any]) -> bytes:
    """The experts' mean cosine similarity of task vectors over the solved tensors."""
    plt = _pyplot()
    matrix = report["totals"]["cosine"]
    labels = [expert["label"] for expert in report["experts"]]
    size = len(labels)
    figure, axis = plt.subplots(figsize=(2.5 + 0.9 * size, 2.0 + 0.8 * size), constrained_layout=True)
    values = [[math.nan if value is None else value for value in line] for line in matrix]
    image = axis.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
    axis.set_xticks(range(size))
    axis.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    axis.set_yticks(range(size))
    axis.set_yticklabels(labels, fontsize=8)
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            if value == value:
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if abs(value) > 0.6 else "black")
    figure.colorbar(image, ax=axis, label="cosine similarity")
    axis.set_title("Task vectors' cosine similarity\n(mean over solved tensors)", fontsize=10)
    return _png(figure)


def layers_png(report: Mapping[str, Any]) -> bytes:
    """Per layer: relative interference at each point, and per module type."""
    plt = _pyplot()
    rows = [row for row in solved(report) if row["layer"] is not None]
    layers, modules = _grid(rows)
    points = [point for point in report["totals"]["loss"] if point not in ("zero", "merged")]
    first, second = compared_points(report)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for point in points:
        left.plot(layers, [_relative_of([r for r in rows if r["layer"] == layer], point)
                           for layer in layers], marker="o", label=POINT_LABELS[point])
    left.set_title("all module types")
    colours = plt.get_cmap("tab10").colors
    for index, module in enumerate(modules):
        colour = colours[index % len(colours)]
        for point, style in ((first, "--"), (second, "-")):
            series = [_relative_of([r for r in rows if r["layer"] == layer and r["module"] == module],
                                   point) if any(r["layer"] == layer and r["module"] == module
                                                 for r in rows) else math.nan
                      for layer in layers]
            right.plot(layers, series, style, color=colour,
                       label=module if point == second else None)
    right.set_title(f"per module type ({POINT_LABELS[first]} dashed, {POINT_LABELS[second]} solid)",
                    fontsize=9)
    for axis in (left, right):
        axis.set_xlabel("layer")
        axis.set_ylabel("interference / interference of the base")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_xticks(layers)
    return _png(figure)


def shares_png(report: Mapping[str, Any]) -> bytes:
    """Each expert's share of the summed interference: who is disturbed most."""
    plt = _pyplot()
    labels = [expert["label"] for expert in report["experts"]]
    shares = report["totals"]["expert_share"]
    points = compared_points(report)
    figure, axis = plt.subplots(figsize=(2.5 + 1.2 * len(labels), 3.6), constrained_layout=True)
    width = 0.8 / len(points)
    for index, point in enumerate(points):
        positions = [i + (index - (len(points) - 1) / 2) * width for i in range(len(labels))]
        values = [100 * (share or 0.0) for share in shares[point]]
        axis.bar(positions, values, width, label=POINT_LABELS[point])
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("% of the interference")
    axis.set_title("Each expert's share of the interference (Eq. 21 terms)", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _png(figure)


PLOTS = {
    "heatmap.png": heatmap_png,
    "layers.png": layers_png,
    "cosine.png": cosine_png,
    "expert_shares.png": shares_png,
}
PLOT_CAPTIONS = {
    "heatmap.png": "Interference per layer and module type, relative to the base's (no update = 1).",
    "layers.png": "Interference per layer: all module types together (left), each module type (right).",
    "cosine.png": "Cosine similarity of the experts' task vectors, mean over the solved tensors.",
    "expert_shares.png": "Each expert's share of the interference: whose own subspace the merge disturbs.",
}


def plots(report: Mapping[str, Any]) -> Dict[str, bytes]:
    """Every plot as PNG bytes: none when no tensor is solved, no per-layer curves
    when no solved tensor's name carries a layer number."""
    rows = solved(report)
    if not rows:
        return {}
    layered = any(row["layer"] is not None for row in rows)
    return {name: draw(report) for name, draw in PLOTS.items()
            if layered or name != "layers.png"}


# ---------------------------------------------------------------- report.html

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
figure { margin: 1.5em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


_NUMERIC = re.compile(r"^-?[\d.]+(e[-+]?\d+)?%?$|^-$")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=number' if _NUMERIC.match(cell) else ''}>"
                         f"{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def report_html(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    totals = report["totals"]
    counts = totals["tensors"]
    labels = [expert["label"] for expert in report["experts"]]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<title>WUDI interference report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>WUDI interference report</h1>",
        f"<p>Recipe <code>{html.escape(str(report['recipe'].get('path', '')))}</code>:"
        f" {counts['wudi']} tensors solved by WUDI, {counts['task_arithmetic']} by task"
        f" arithmetic, {counts['unchanged']} unchanged. Interference is WUDI's loss (paper"
        " Eq. 21), the energy of the merged update's error on each expert's own input"
        " subspace; <em>relative</em> divides it by the base's (no update at all = 1).</p>",
    ]
    if totals["loss"]:
        parts.append(_table(
            ["point", "interference", "relative", "meaning"],
            [[POINT_LABELS[point], _number(value), _number(totals["relative"][point], 3),
              report["points"][point]] for point, value in totals["loss"].items()],
        ))
        if totals["removed"] is not None:
            parts.append(f"<p><strong>WUDI removes {_percent(totals['removed'])}</strong> of"
                         " task arithmetic's interference.</p>")
    for name, image in images.items():
        encoded = base64.b64encode(image).decode("ascii")
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{encoded}'>"
                     f"<figcaption>{html.escape(PLOT_CAPTIONS[name])}</figcaption></figure>")
    if totals["loss"]:
        shares = totals["expert_share"]
        parts.append("<h2>Experts</h2>")
        parts.append(_table(
            ["expert", "model"] + [f"share, {POINT_LABELS[point]}" for point in shares],
            [[label, expert["model"]] + [_percent(shares[point][i]) for point in shares]
             for i, (label, expert) in enumerate(zip(labels, report["experts"]))],
        ))
        parts.append(f"<h2>The {TOP} most interfering tensors</h2>")
        parts.append(_tensor_table(most_interfering(report)))
        parts.append("<h2>Every solved tensor</h2>")
        parts.append(_tensor_table(solved(report)))
    others = [row for row in report["tensors"] if row["fate"] != "wudi"]
    if others:
        parts.append("<h2>Tensors WUDI does not solve</h2>")
        parts.append(_table(["tensor", "shape", "fate", "reason"],
                            [[row["name"], "x".join(map(str, row["shape"])), row["fate"],
                              row["reason"]] for row in others]))
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    parts.append(f"<p><small>{html.escape(versions)}. Every figure is in"
                 " <code>report.json</code>.</small></p></body></html>")
    return "\n".join(parts)


def _tensor_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return _table(
        ["tensor", "shape", "relative: sum", "average", "WUDI", "removed", "effective rank of C"],
        [[row["name"], "x".join(map(str, row["shape"])), _number(row["relative"]["sum"], 3),
          _number(row["relative"]["average"], 3), _number(row["relative"].get("solution"), 3),
          _percent(row["removed"]), _number(row["effective_rank"], 3)] for row in rows],
    )
