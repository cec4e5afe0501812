"""The report's binding on one tensor group, as mergekit's adapter hands it over:
where the figures are computed, and what a stack's slices hold."""

import pytest
import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_wudi import problems, solvers
from mergekit_wudi.parameters import PARAMETERS
from mergekit_wudi.report import binding
from tests.measure import LiveTensorBytes
from tests.oracle import structured_task_vectors

MIXTRAL = "model.layers.0.mlp.experts.down_proj"  # a stack of [out, in] slices
LINEAR = "model.layers.0.self_attn.q_proj.weight"
IDS = ("base", "a", "b", "c")


def group_of(name, base, models):
    return TensorGroup.from_tensors([base, *models], ids=IDS[: len(models) + 1], base_index=0, name=name)


def bound_parameters(**overrides):
    parameters = {spec.name: spec.default for spec in PARAMETERS}
    parameters["weight"] = {model: 1.0 for model in IDS[1:]}
    parameters["iterations"] = 20
    return {**parameters, **overrides}


def linear_models(shape=(24, 40)):
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    return base, [base + tau for tau in structured_task_vectors(3, *shape, scale=1e-2)]


def test_a_moved_solve_s_figures_read_the_moved_task_vectors(monkeypatch):
    # As tests/test_method.py: a device that differs from the tensors' own,
    # so the fit check's move really happens and each step's device is seen.
    another = torch.device("cpu", 0)
    base, models = linear_models()
    group, parameters = group_of(LINEAR, base, models), bound_parameters()
    expected = binding.tensor_report(group, parameters, IDS[1:], run_solver=True).summary
    seen = []
    figures = binding.interference_figures
    monkeypatch.setattr(binding, "interference_figures",
                        lambda vectors, *args: seen.append(vectors.device) or figures(vectors, *args))
    monkeypatch.setattr(problems, "FALLBACK_DEVICE", another)
    monkeypatch.setattr(problems, "free_memory", lambda device: None if device == another else 1024)
    moved = binding.tensor_report(group, parameters, IDS[1:], run_solver=True).summary
    assert seen == [another]
    assert moved == expected


def stack_report_peak(slices):
    generator = torch.Generator().manual_seed(1)
    base = (torch.randn(slices, 48, 32, generator=generator) * 0.05).to(torch.bfloat16)
    models = [(base.float() + 1e-2 * torch.randn(slices, 48, 32, generator=generator)).to(torch.bfloat16)
              for _ in range(3)]
    group, parameters = group_of(MIXTRAL, base, models), bound_parameters()
    with LiveTensorBytes() as memory:
        report = binding.tensor_report(group, parameters, IDS[1:], run_solver=True)
    assert report.fate == "wudi" and report.summary is not None
    return memory.peak


def test_a_stack_is_reported_one_slice_at_a_time():
    # Memory as the merge: what a slice's problem, solve and figures take, whatever
    # the number of slices (the plan of every slice holds no working copy).
    assert stack_report_peak(8) == stack_report_peak(2)
