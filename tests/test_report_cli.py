"""``mergekit-wudi-report`` on tiny families, checked against the checkpoints themselves.

Every figure of ``report.json`` is recomputed here in float64 from the safetensors
the family wrote (task vectors, Eq. 21 term by term, eigenvalues of C), the loss
at WUDI's solution against the tensor ``mergekit-yaml`` writes for the same recipe,
and the LoRA path against the adapters' own factors.
"""

import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.conftest import load_weights, run_console_script
from tests.oracle import eq21_term

pytestmark = pytest.mark.slow

LAMBDA = 0.5
PLOTS = ("heatmap.png", "layers.png", "cosine.png", "expert_shares.png")



def participation_ratio(eigenvalues: torch.Tensor) -> float:
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


def recipe(base: Path, experts: List[Path], models_parameters: List[dict], **parameters) -> str:
    models = [{"model": str(path), **({"parameters": extra} if extra else {})}
              for path, extra in zip(experts, models_parameters)]
    return yaml.safe_dump({"merge_method": "wudi", "base_model": str(base), "models": models,
                           "parameters": parameters, "dtype": "float32"}, sort_keys=False)


def report_of(directory: Path) -> Dict:
    return json.loads((directory / "report.json").read_text())


def expert_weights(name: str) -> List[float]:
    """The per-expert weights the llama recipe below resolves to for ``name``."""
    return [1.0, 0.5, 0.0 if ".mlp." in name else 1.5]


@pytest.fixture(scope="module")
def llama_run(families, tmp_path_factory):
    """The report and the merge of one recipe with per-expert weights, filters and lambda."""
    base, *experts = families("llama")
    root = tmp_path_factory.mktemp("report_llama")
    (root / "recipe.yml").write_text(recipe(
        base, experts,
        [{}, {"weight": 0.5}, {"weight": [{"filter": "mlp", "value": 0}, {"value": 1.5}]}],
        **{"lambda": LAMBDA, "iterations": [{"filter": "self_attn", "value": 30}, {"value": 60}]},
    ))
    report = run_console_script("mergekit-wudi-report", "recipe.yml", "report", cwd=root)
    assert report.returncode == 0, report.stderr[-3000:]
    merge = run_console_script("mergekit-yaml", "recipe.yml", "merged", "--no-copy-tokenizer",
                               "--no-write-model-card", cwd=root)
    assert merge.returncode == 0, merge.stderr[-3000:]
    return {
        "root": root, "stdout": report.stdout, "stderr": report.stderr,
        "report": report_of(root / "report"), "merged": load_weights(root / "merged"),
        "base": load_weights(base), "experts": [load_weights(path) for path in experts],
    }


def task_vectors(run, name: str, transpose: bool = False) -> List[torch.Tensor]:
    """weight_i * (W_i - W_base) in float64, for each expert with a nonzero weight."""
    base = run["base"][name].double()
    vectors = [w * (expert[name].double() - base)
               for w, expert in zip(expert_weights(name), run["experts"]) if w]
    return [t.T for t in vectors] if transpose else vectors


def test_every_tensor_of_the_checkpoint_is_reported_with_the_merge_rule(llama_run):
    rows = {row["name"]: row for row in llama_run["report"]["tensors"]}
    assert set(rows) == set(llama_run["base"])
    for name, row in rows.items():
        linear = ".layers." in name and name.endswith("_proj.weight")
        assert row["fate"] == ("wudi" if linear else "task_arithmetic"), name
        if linear:
            assert row["view"] == "out_in"
            # Per-tensor filters resolve as in the merge.
            assert row["parameters"]["iterations"] == (30 if "self_attn" in name else 60)
            assert row["parameters"]["lambda"] == LAMBDA
    assert rows["model.layers.1.mlp.up_proj.weight"]["layer"] == 1
    assert rows["model.layers.1.mlp.up_proj.weight"]["module"] == "mlp.up_proj"
    assert [e["label"] for e in llama_run["report"]["experts"]] == ["expert_1", "expert_2", "expert_3"]


def test_every_number_equals_a_float64_computation_from_the_checkpoints(llama_run):
    checked = 0
    zero_total = sum_total = 0.0
    for row in llama_run["report"]["tensors"]:
        if row["fate"] != "wudi":
            continue
        name, weights = row["name"], expert_weights(row["name"])
        taus = task_vectors(llama_run, name)
        present = [i for i, w in enumerate(weights) if w]
        assert row["contributing"] == [bool(w) for w in weights]
        norms = [float(torch.linalg.vector_norm(t)) for t in taus]
        assert [row["norms"][i] for i in present] == pytest.approx(norms, rel=1e-12)
        assert all(row["norms"][i] == 0.0 for i in range(3) if i not in present)
        for a, i in enumerate(present):
            for b, j in enumerate(present):
                cosine = float((taus[a] * taus[b]).sum()) / (norms[a] * norms[b])
                assert row["cosine"][i][j] == pytest.approx(cosine, rel=1e-10, abs=1e-13)
        total = sum(taus)
        for point, merged in (("zero", torch.zeros_like(total)), ("sum", total),
                              ("average", total / len(taus))):
            terms = [eq21_term(merged, tau) for tau in taus]
            assert [row["expert_loss"][point][i] for i in present] == pytest.approx(terms, rel=1e-10)
            assert row["loss"][point] == pytest.approx(sum(terms), rel=1e-10)
            assert [row["expert_share"][point][i] for i in present] == pytest.approx(
                [term / sum(terms) for term in terms], rel=1e-10)
        assert row["relative"]["sum"] == pytest.approx(row["loss"]["sum"] / row["loss"]["zero"], rel=1e-12)
        gram = sum(t.T @ t / (t * t).sum() for t in taus)
        assert row["effective_rank"] == pytest.approx(participation_ratio(torch.linalg.eigvalsh(gram)), rel=1e-9)
        for a, i in enumerate(present):
            singular = torch.linalg.svdvals(taus[a])
            assert row["expert_effective_rank"][i] == pytest.approx(participation_ratio(singular**2), rel=1e-9)
        zero_total += row["loss"]["zero"]
        sum_total += row["loss"]["sum"]
        checked += 1
    assert checked == 14  # 7 projections in each of 2 layers
    totals = llama_run["report"]["totals"]
    assert totals["tensors"] == {"wudi": 14, "task_arithmetic": 7, "unchanged": 0}
    assert totals["loss"]["zero"] == pytest.approx(zero_total, rel=1e-12)
    assert totals["relative"]["sum"] == pytest.approx(sum_total / zero_total, rel=1e-12)


def test_loss_at_the_solution_is_the_loss_of_the_tensor_mergekit_yaml_writes(llama_run):
    for row in llama_run["report"]["tensors"]:
        if row["fate"] != "wudi":
            continue
        name = row["name"]
        taus = task_vectors(llama_run, name)
        written = llama_run["merged"][name].double() - llama_run["base"][name].double()
        assert row["loss"]["merged"] == pytest.approx(sum(eq21_term(written, t) for t in taus), rel=1e-5)
        assert row["loss"]["solution"] == pytest.approx(
            sum(eq21_term(written / LAMBDA, t) for t in taus), rel=1e-5)
        assert row["removed"] == pytest.approx(1 - row["loss"]["solution"] / row["loss"]["sum"], rel=1e-12)
        assert 0 < row["removed"] < 1, name  # Adam lowered the loss, and not to zero


def test_terminal_summary_lists_the_ten_most_interfering_tensors_and_a_progress_bar(llama_run):
    rows = [row for row in llama_run["report"]["tensors"] if row["fate"] == "wudi"]
    expected = sorted(rows, key=lambda row: -row["relative"]["sum"])[:10]
    lines = llama_run["stdout"].splitlines()
    listed = [line.split()[0] for line in lines if line.strip().startswith("model.layers.")]
    assert listed == [row["name"] for row in expected]
    assert "14 tensors solved by WUDI, 7 by task arithmetic, 0 unchanged." in lines
    removed = 100 * llama_run["report"]["totals"]["removed"]
    assert f"WUDI removes {removed:.1f}% of task arithmetic's interference." in llama_run["stdout"]
    assert "Interference: 100%" in llama_run["stderr"] and "21/21" in llama_run["stderr"]


def test_outputs_are_the_plots_and_a_self_contained_page(llama_run):
    from PIL import Image

    directory = llama_run["root"] / "report"
    page = (directory / "report.html").read_text()
    for name in PLOTS:
        with Image.open(directory / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 300 and image.height > 200
        assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert llama_run["report"]["recipe"]["text"] == (llama_run["root"] / "recipe.yml").read_text()
    assert {"mergekit", "mergekit-wudi", "torch"} <= set(llama_run["report"]["versions"])


def test_gpt2_conv1d_weights_are_reported_on_their_out_in_view(families, tmp_path):
    base, *experts = families("gpt2")
    (tmp_path / "recipe.yml").write_text(recipe(base, experts, [{}, {}, {}]))
    # python -m, and --no-solve: no solution figures.
    result = run_console_script("python", "-m", "mergekit_wudi.report", "recipe.yml", "out",
                                "--no-solve", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    stored = [load_weights(path) for path in [base, *experts]]
    rows = [row for row in report_of(tmp_path / "out")["tensors"] if row["fate"] == "wudi"]
    assert {row["view"] for row in rows} == {"in_out"}
    assert len(rows) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
    for row in rows:
        taus = [(expert[row["name"]].double() - stored[0][row["name"]].double()).T
                for expert in stored[1:]]
        total = sum(taus)
        assert row["loss"]["sum"] == pytest.approx(sum(eq21_term(total, t) for t in taus), rel=1e-10)
        assert set(row["loss"]) == {"zero", "sum", "average"} and row["removed"] is None


def test_identical_experts_have_cosine_one_and_no_interference_once_solved(families, tmp_path):
    base, expert, *_ = families("llama")
    copies = [shutil.copytree(expert, tmp_path / f"copy_{i}") for i in range(3)]
    (tmp_path / "recipe.yml").write_text(
        recipe(base, copies, [{}, {}, {}], solver="closed_form", omega=1e-8))
    result = run_console_script("mergekit-wudi-report", "recipe.yml", "out", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = report_of(tmp_path / "out")
    rows = [row for row in report["tensors"] if row["fate"] == "wudi"]
    assert rows
    for row in rows:
        assert all(value == pytest.approx(1.0, abs=1e-12) for line in row["cosine"] for value in line)
        # The sum, 3 tau, leaves an error 2 tau on each expert's own subspace.
        assert row["relative"]["sum"] == pytest.approx(4.0, rel=1e-9)
        assert row["relative"]["solution"] < 1e-12, row["name"]
        assert row["removed"] == pytest.approx(1.0, abs=1e-12)
    assert report["totals"]["cosine"] == [[pytest.approx(1.0, abs=1e-12)] * 3] * 3


def test_lora_experts_are_read_through_mergekits_lora_merge(tmp_path):
    from mergekit_wudi.demo import write_family
    from tests.test_lora import ALL_LINEAR, Adapter, read_lora_factors, write_adapter

    (base,) = write_family(tmp_path, "llama", experts=0)
    adapters = {"attention-lora": Adapter(2, 4, ("q_proj", "v_proj")),
                "everywhere-lora": Adapter(4, 6, ALL_LINEAR)}
    for seed, (name, adapter) in enumerate(adapters.items(), start=1):
        write_adapter(base, tmp_path / name, adapter, seed)
    (tmp_path / "recipe.yml").write_text(recipe(
        base, [f"{base}+{tmp_path / name}" for name in adapters], [{}, {}]))
    result = run_console_script("mergekit-wudi-report", "recipe.yml", "out", "--lora-merge-cache",
                                "cache", "--lora-merge-dtype", "float32", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = report_of(tmp_path / "out")
    assert [e["label"] for e in report["experts"]] == list(adapters)
    factors = [read_lora_factors(tmp_path / name) for name in adapters]
    rows = {row["name"]: row for row in report["tensors"]}
    for name, row in rows.items():
        touched = [name in factor for factor in factors]
        if not any(touched):  # embeddings, norms, lm_head: no adapter changed them
            assert row["fate"] == "unchanged", name
            continue
        assert row["fate"] == "wudi" and row["contributing"] == touched, name
        for index, (adapter, factor) in enumerate(zip(adapters.values(), factors)):
            if touched[index]:
                lora_b, lora_a = factor[name]
                update = adapter.scale * lora_b.double() @ lora_a.double()
                # float32 rounding of base + update, relative to the update: a few 1e-7.
                assert row["norms"][index] == pytest.approx(float(torch.linalg.vector_norm(update)), rel=1e-5)


def test_errors_name_the_fault(families, tmp_path, monkeypatch):
    from mergekit_wudi.report.cli import main

    base, *experts = families("llama")
    (tmp_path / "ties.yml").write_text(recipe(base, experts, [{}, {}, {}]).replace(
        "merge_method: wudi", "merge_method: ties"))
    result = CliRunner().invoke(main, [str(tmp_path / "ties.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "merge_method is 'ties'; the interference report reads recipes with merge_method: wudi" in result.output
    (tmp_path / "typo.yml").write_text(recipe(base, experts, [{}, {}, {}], iteration=5))
    result = CliRunner().invoke(main, [str(tmp_path / "typo.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Unknown parameter(s) for wudi: iteration" in result.output
    assert not (tmp_path / "out").exists()  # nothing written before the figures are complete

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    (tmp_path / "wudi.yml").write_text(recipe(base, experts, [{}, {}, {}]))
    result = CliRunner().invoke(main, [str(tmp_path / "wudi.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "matplotlib: pip install 'mergekit-wudi[report]'" in result.output


def test_moe_expert_stacks_are_reported_slice_by_slice(moe_merge):
    """A Mixtral recipe: each fused expert stack's figures are its slices' summed, and
    its loss is the loss of the stack mergekit-yaml writes, slice by slice."""
    from tests.conftest import MOE_LAMBDA, MOE_WEIGHTS, fused_stacks

    paths, out, _ = moe_merge("mixtral", False)
    result = run_console_script("mergekit-wudi-report", out.parent / "config.yml",
                                out.parent / "report", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in report_of(out.parent / "report")["tensors"]}
    base, *experts = [fused_stacks(load_weights(path), "mixtral") for path in paths]
    written = load_weights(out)  # mergekit writes the fused stacks
    assert set(base) <= set(rows)
    for name, stack in base.items():
        row = rows[name]
        assert row["fate"] == "wudi" and row["reason"] == "solved by WUDI: expert slices [out, in]"
        zero = solution = 0.0
        for e in range(stack.shape[0]):
            taus = [w * (x[name][e].double() - stack[e].double())
                    for w, x in zip(MOE_WEIGHTS, experts) if not torch.equal(x[name][e], stack[e])]
            update = (written[name][e].double() - stack[e].double()) / MOE_LAMBDA
            zero += sum(eq21_term(torch.zeros_like(t), t) for t in taus)
            solution += sum(eq21_term(update, t) for t in taus)
        assert row["loss"]["zero"] == pytest.approx(zero, rel=1e-10), name
        assert row["loss"]["solution"] == pytest.approx(solution, rel=1e-5), name
