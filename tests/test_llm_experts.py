"""Experts of the causal-LM merge benchmark (benchmarks/llm_experts.py): how LoRA adapters
are seeded, and the measure of how much their input spaces overlap."""

import math

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.llm_experts import (
    FineTune,
    adapter_overlap,
    adapter_start_overlap,
    fine_tune,
    row_space_overlap,
)
from benchmarks.llm_skills import SkillSizes, build_skills
from benchmarks.pretrain import TINY, train_tokenizer


def test_row_space_overlap_against_principal_angles():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(4, 32, generator=generator)
    mixing = torch.randn(4, 4, generator=generator)
    assert row_space_overlap(first, mixing @ first) == pytest.approx(1.0, abs=1e-12)
    # Rows in the first 16 and the last 16 coordinates: orthogonal spaces.
    left, right = first.clone(), first.clone()
    left[:, 16:], right[:, :16] = 0, 0
    assert row_space_overlap(left, right) == pytest.approx(0.0, abs=1e-12)
    # Two directions shared, two orthogonal: cosines 1, 1, 0, 0.
    shared = torch.eye(32)[:4]
    other = torch.cat([torch.eye(32)[:2], torch.eye(32)[10:12]])
    assert row_space_overlap(shared, other) == pytest.approx(0.5, abs=1e-12)
    # Random rank-8 spaces of 128 dimensions lie far from each other (about sqrt(8 / 128)).
    random_pair = [torch.randn(8, 128, generator=generator) for _ in range(2)]
    assert 0.1 < row_space_overlap(*random_pair) < 0.4


def test_adapter_overlap_averages_modules_and_pairs(tmp_path):
    directions = torch.eye(16)
    adapters = []
    # a and b read the same directions in module 0 and orthogonal ones in module 1; c is b.
    for name, module_one in (("a", directions[:2]), ("b", directions[8:10]), ("c", directions[8:10])):
        adapters.append(tmp_path / name)
        adapters[-1].mkdir()
        save_file({"m0.lora_A.weight": directions[:2].clone(), "m0.lora_B.weight": torch.ones(4, 2),
                   "m1.lora_A.weight": module_one.clone()},
                  str(adapters[-1] / "adapter_model.safetensors"))
    # Pairs (a,b), (a,c), (b,c): module 0 gives 1, 1, 1; module 1 gives 0, 0, 1.
    assert adapter_overlap(adapters) == pytest.approx(4 / 6, abs=1e-12)
    with pytest.raises(ValueError, match="two or more LoRA adapters"):
        adapter_overlap(adapters[:1])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An untrained TINY Llama with a tokenizer, saved as the experts' base."""
    from transformers import LlamaForCausalLM

    directory = tmp_path_factory.mktemp("base")
    tokenizer = train_tokenizer(["Task: python sorted\nsorted([3, 1]) = [1, 3]",
                                 "Task: number in words\n12 -> twelve"] * 20, 300)
    torch.manual_seed(0)
    LlamaForCausalLM(TINY.config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def lora_a(model) -> dict:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if "lora_A" in name}


def test_lora_adapters_start_apart_per_skill_and_repeat_per_seed(tiny_base):
    code, numbers = build_skills(["code", "numbers"], SkillSizes(pretrain=0, train=40, test=1), 0)
    untrained = FineTune("lora", steps=0, batch_size=4)
    starts = {data.name: lora_a(fine_tune(tiny_base, data, untrained, seed=0)) for data in (code, numbers)}
    assert lora_a(fine_tune(tiny_base, code, untrained, seed=0)).keys() == starts["code"].keys()
    for name, matrix in lora_a(fine_tune(tiny_base, code, untrained, seed=0)).items():
        assert torch.equal(matrix, starts["code"][name])  # the same skill and seed: the same start
    again_other_seed = lora_a(fine_tune(tiny_base, code, untrained, seed=1))
    overlaps = [row_space_overlap(starts["code"][name], starts["numbers"][name])
                for name in starts["code"]]
    # Two skills' adapters start in unrelated input spaces (rank 8 of 64: about sqrt(8 / 64)),
    # not in one shared space (1.0).
    assert max(overlaps) < 0.8 and sum(overlaps) / len(overlaps) < 2 * math.sqrt(8 / 64)
    assert not any(torch.equal(again_other_seed[name], starts["code"][name]) for name in starts["code"])


def test_adapter_start_overlap_is_one_untrained_and_falls_as_training_moves_a(tiny_base, tmp_path):
    (code,) = build_skills(["code"], SkillSizes(pretrain=0, train=40, test=1), 0)
    for steps, learning_rate, name in ((0, 1e-3, "untrained"), (20, 0.05, "moved")):
        settings = FineTune("lora", steps=steps, batch_size=4, learning_rate=learning_rate)
        fine_tune(tiny_base, code, settings, seed=0).save_pretrained(tmp_path / name)
    untrained = FineTune("lora", steps=0, batch_size=4)
    assert adapter_start_overlap(tiny_base, code, untrained, 0, tmp_path / "untrained") == pytest.approx(1.0)
    assert adapter_start_overlap(tiny_base, code, untrained, 0, tmp_path / "moved") < 0.95
