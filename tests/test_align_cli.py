import re
import subprocess
import sys

import pytest
import torch
import transformers
import yaml

from mergekit_wudi.align.cli import main
from mergekit_wudi.demo import save_tokenizer
from tests.align_models import VOCAB, outputs, tiny_model
from tests.conftest import load_weights, run_console_script

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _save(model, path, tokenizer=True):
    model.save_pretrained(path)
    if tokenizer:
        save_tokenizer(path, VOCAB)
    return path


@pytest.fixture
def calibration(tmp_path):
    generator = torch.Generator().manual_seed(5)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB, (20,), generator=generator)) for _ in range(12)]
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pair(tmp_path, family):
    """Two models of one family trained from different seeds (here: initialised)."""
    return (_save(tiny_model(family, seed=0), tmp_path / "reference"),
            _save(tiny_model(family, seed=1), tmp_path / "model"))


def _align(reference, models, calibration, out, *extra):
    main([str(reference), *map(str, models), "--calibration", str(calibration), "--out", str(out), *extra])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_aligned_models_load_and_compute_the_same_function(tmp_path, calibration, family):
    reference, model = _pair(tmp_path, family)
    second = _save(tiny_model(family, seed=2), tmp_path / "second")
    out = tmp_path / "out"
    _align(reference, [model, second], calibration, out, "--max-tokens", "100")
    for number, original in enumerate([model, second], 1):
        aligned_path = out / f"model-{number}"
        aligned = transformers.AutoModelForCausalLM.from_pretrained(aligned_path).eval()
        source = transformers.AutoModelForCausalLM.from_pretrained(original).eval()
        torch.testing.assert_close(outputs(aligned, IDS), outputs(source, IDS), atol=2e-5, rtol=0)
        moved = [n for n, t in aligned.state_dict().items() if not torch.equal(t, source.state_dict()[n])]
        assert moved, "nothing was permuted"
        assert transformers.AutoTokenizer.from_pretrained(aligned_path)("w3 w4")["input_ids"] == [3, 4]
    recipe = yaml.safe_load((out / "merge.yml").read_text())
    assert recipe["merge_method"] == "linear"
    assert [m["model"] for m in recipe["models"]] == [str(reference), str(out / "model-1"), str(out / "model-2")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "staging directory left behind"


@pytest.mark.slow
def test_the_recipe_merges_with_mergekit_yaml(tmp_path, calibration):
    reference, model = _pair(tmp_path, "qwen3")
    out = tmp_path / "out"
    _align(reference, [model], calibration, out)
    merged = tmp_path / "merged"
    result = run_console_script("mergekit-yaml", out / "merge.yml", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    weights, aligned = load_weights(merged), load_weights(out / "model-1")
    first = load_weights(reference)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(weights[name], (first[name] + aligned[name]) / 2)
    transformers.AutoModelForCausalLM.from_pretrained(merged)


@pytest.mark.slow
def test_the_bert_recipe_merges_with_mergekit_pytorch(tmp_path, calibration):
    reference, model = _pair(tmp_path, "bert")
    out = tmp_path / "out"
    _align(reference, [model], calibration, out)
    aligned = transformers.BertForMaskedLM.from_pretrained(out / "model-1").eval()
    torch.testing.assert_close(outputs(aligned, IDS), outputs(tiny_model("bert", seed=1), IDS), atol=2e-5, rtol=0)
    text = (out / "merge.yml").read_text()
    assert "mergekit-pytorch" in text
    merged = tmp_path / "merged"
    result = run_console_script("mergekit-pytorch", out / "merge.yml", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    torch.testing.assert_close(load_weights(merged)[name],
                               (load_weights(reference)[name] + load_weights(out / "model-1")[name]) / 2)


def _opt(path):
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=64)
    model = transformers.OPTForCausalLM(config)
    model.config.architectures = ["OPTForCausalLM"]
    return _save(model, path)


def _bad_inputs(tmp_path, calibration):
    llama = _save(tiny_model("llama"), tmp_path / "llama")
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**tiny_model("llama").config.to_dict(), "intermediate_size": 40}))
    wider.config.architectures = ["LlamaForCausalLM"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    return {
        "architecture": ([llama, _save(tiny_model("gpt2"), tmp_path / "gpt2")], calibration,
                         r"MODEL .*gpt2: architecture \['GPT2LMHeadModel'\] differs"),
        "shape": ([llama, _save(wider, tmp_path / "wider")], calibration,
                  r"MODEL .*wider: parameter model.layers.0.mlp.down_proj.weight has shape \(32, 40\)"),
        "tokenizer": ([llama, _save(tiny_model("llama", 1), tmp_path / "no_tokenizer", tokenizer=False)],
                      calibration, r"MODEL .*no_tokenizer: no usable tokenizer"),
        "calibration": ([llama, llama], empty, r"calibration file .*empty.txt is empty"),
        "unsupported": ([_opt(tmp_path / "opt"), _opt(tmp_path / "opt2")], calibration,
                        r"REFERENCE .*opt: architecture OPTForCausalLM \(model_type 'opt'\) is not supported"),
    }


def test_bad_input_is_named_and_writes_nothing(tmp_path, calibration, capsys):
    for case, (models, calibration_file, message) in _bad_inputs(tmp_path, calibration).items():
        out = tmp_path / f"out_{case}"
        with pytest.raises(SystemExit) as exit_:
            _align(models[0], models[1:], calibration_file, out)
        assert exit_.value.code == 2, case
        assert re.search(message, capsys.readouterr().err), case
        assert not out.exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out_{case}")], case


def test_module_entry_point_refuses_a_nonempty_out(tmp_path, calibration):
    reference, model = _pair(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "mergekit_wudi.align", str(reference), str(model), "--calibration",
         str(calibration), "--out", str(out)], capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert f"--out {out} exists and is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
