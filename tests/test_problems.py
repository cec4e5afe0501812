"""A tensor's WUDI problems: fused MoE stacks solved slice by slice, in memory
(mergekit's merge_tensors) and through the public functions of ``problems``."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from mergekit_wudi import solvers
from mergekit_wudi.parameters import Precision, Solver
from mergekit_wudi.problems import TaskVectors, solve, solve_bytes, stack_matrices, wudi_problems
from mergekit_wudi.tensor_rules import Fallback, Layout, TensorFate
from tests.measure import LiveTensorBytes
from tests.oracle import authors_wudi, relative_error, structured_task_vectors

MIXTRAL = "model.layers.0.mlp.experts.gate_up_proj"  # slices [out, in]
LLAMA4 = "language_model.model.layers.0.feed_forward.experts.gate_up_proj"  # slices [in, out]
IDS = ("base", "math", "code", "chat")
EXPERTS = 3


def stacks(shape=(EXPERTS, 12, 10), count=3, seed=0):
    """A base stack and models = base + per-slice structured task vectors."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.05
    models = []
    for index in range(count):
        taus = structured_task_vectors(shape[0], *shape[1:], seed=seed + 10 * index + 1, scale=1e-2)
        models.append(base + torch.stack(taus))
    return base, models


def merge(base, models, name=MIXTRAL, **parameters):
    return merge_tensors(
        [base, *models], "wudi", base_index=0, ids=IDS[: len(models) + 1], name=name,
        parameters={"iterations": 40, **parameters},
    )


@pytest.mark.parametrize("name,transposed", [(MIXTRAL, False), (LLAMA4, True)])
def test_each_slice_is_the_oracle_on_that_slice_alone(name, transposed):
    base, models = stacks()
    merged = merge(base, models, name=name, weight=[0.5, 1.0, 2.0], **{"lambda": 0.7})
    assert merged.shape == base.shape
    for e in range(EXPERTS):
        taus = [w * (m[e] - base[e]) for w, m in zip([0.5, 1.0, 2.0], models)]
        if transposed:
            expected = authors_wudi([tau.T for tau in taus], iterations=40).T
        else:
            expected = authors_wudi(taus, iterations=40)
        assert relative_error(merged[e] - base[e], 0.7 * expected) < 1e-5, e
    # Solving the stored orientation is another method: layout overrides it.
    overridden = merge(base, models, name=name, weight=[0.5, 1.0, 2.0], **{"lambda": 0.7},
                       layout="out_in" if transposed else "in_out")
    assert relative_error(overridden, merged) > 1e-4


def test_slices_follow_the_matrix_rules_one_by_one():
    base, models = stacks()
    for model in models:
        model[0] = base[0]  # no model changed expert 0
    models[1][1] = base[1]
    models[2][1] = base[1]  # only the first changed expert 1
    merged = merge(base, models, weight=[2.0, 1.0, 1.0], **{"lambda": 0.5})
    assert torch.equal(merged[0], base[0])
    assert torch.equal(merged[1], models[0][1])
    # An untouched or weightless model is as if absent, slice by slice.
    alone = merge(base, [models[0], models[2]], weight=[2.0, 1.0], **{"lambda": 0.5})
    padded = merge(base, [models[0], base.clone(), models[2]], weight=[2.0, 1.0, 1.0], **{"lambda": 0.5})
    weightless = merge(base, [models[0], base + 1, models[2]], weight=[2.0, 0.0, 1.0], **{"lambda": 0.5})
    assert torch.equal(padded, alone) and torch.equal(weightless, alone)


def test_never_is_task_arithmetic_on_stacks_and_always_solves_any_3d_tensor():
    base, models = stacks()
    never = merge(base, models, apply_wudi="never", **{"lambda": 0.7})
    expected = merge_tensors(
        [base, *models], "task_arithmetic", base_index=0, name=MIXTRAL,
        parameters={"weight": 1.0, "lambda": 0.7},
    )
    torch.testing.assert_close(never, expected, rtol=1e-6, atol=1e-7)
    unknown = "model.layers.0.moe.w_in_proj"  # 3-D, not a known expert stack
    torch.testing.assert_close(merge(base, models, name=unknown, **{"lambda": 0.7}), expected)
    assert torch.equal(merge(base, models, name=unknown, apply_wudi="always"), merge(base, models))


def test_nan_names_tensor_slice_and_model():
    base, models = stacks()
    models[1][2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=rf"tensor '{MIXTRAL}' of model code contains NaN or Inf in expert slice 2;"):
        merge(base, models)


def test_overflow_names_the_slice():
    base, models = stacks()
    models[0][1] += 1.0
    with pytest.raises(ValueError, match=rf"merged tensor '{MIXTRAL}\[1\]' does not fit in torch.float16"):
        merge(base.half(), [m.half() for m in models], **{"lambda": 1e5})


def test_wudi_problems_are_the_slices_in_the_out_in_view():
    base, models = stacks()
    models[2][0] = base[0]
    fate = TensorFate(layout=Layout.IN_OUT, stacked=True)
    problems = list(wudi_problems("x", base, models, [1.0, 0.5, 2.0], fate, ids=IDS[1:]))
    assert [p.name for p in problems] == ["x[0]", "x[1]", "x[2]"]
    assert problems[0].ids == ["math", "code"] and problems[1].ids == list(IDS[1:])
    torch.testing.assert_close(problems[1][1], 0.5 * (models[1][1] - base[1]).T)
    # Back to the stored tensor: base + lambda * tau_m, each slice in its orientation.
    taus = [torch.full(base.shape[1:][::-1], float(e)) for e in range(EXPERTS)]
    merged = stack_matrices(fate, [p.merged_weight(tau, 0.5) for p, tau in zip(problems, taus)])
    assert torch.equal(merged, base + 0.5 * torch.stack([tau.T for tau in taus]))
    with pytest.raises(ValueError, match=r"tensor 'x' gets task arithmetic \(vocabulary axis\)"):
        wudi_problems("x", base, models, [1.0] * 3, TensorFate(reason=Fallback.VOCABULARY_AXIS))


def test_solve_dispatches_to_the_configured_solver():
    # At [40, 30] and 60 steps the two precisions' results differ in their last bits.
    taus = structured_task_vectors(3, 40, 30, scale=1e-2)
    problem = TaskVectors(torch.zeros(40, 30), taus, [1.0] * 3)
    parameters = {"solver": Solver.CLOSED_FORM, "omega": 1e-3, "iterations": 60, "learning_rate": 1e-5,
                  "precision": Precision.FLOAT32, "flow_time": 30.0, "rank_ratio": 0.5,
                  "rank_rule": solvers.RankRule.GAVISH_DONOHO}
    assert torch.equal(solve(problem, parameters), solvers.wudi_closed_form(taus, omega=1e-3))
    parameters["solver"] = Solver.ADAM
    assert torch.equal(solve(problem, parameters),
                       solvers.wudi_adam(taus, iterations=60, float64_matmuls=False))
    assert not torch.equal(solve(problem, parameters), solvers.wudi_adam(taus, iterations=60))
    parameters["solver"] = Solver.SPECTRAL
    assert torch.equal(solve(problem, parameters),
                       solvers.wudi_spectral(taus, flow_time=30.0, rank_ratio=0.5))


@pytest.mark.parametrize("storage, scale, working", [
    (torch.float64, 1e-2, torch.float32),  # float64 storage, ordinary magnitudes: a float32 solve
    (torch.float32, 1e-17, torch.float64),  # beyond float32's safe range: a float64 solve
    (torch.bfloat16, 1e-2, torch.float32),
])
def test_adam_is_sized_in_the_working_dtype_its_scan_chooses(storage, scale, working):
    taus = structured_task_vectors(3, 24, 40, scale=scale)
    base = torch.zeros(24, 40, dtype=storage)
    problem = TaskVectors(base, [tau.to(storage) for tau in taus], [1.0] * 3)
    assert solvers.scan_task_vectors(problem).dtype == working
    read = 3 * 24 * 40 * torch.finfo(problem.dtype).bits // 8
    assert solve_bytes(problem, {"solver": Solver.ADAM}) == (
        solvers.adam_working_bytes(24, 40, 3, working) + read)


def test_task_vectors_hold_no_working_copy_between_reads():
    # A bfloat16 base read in float32: the copy is made per read, so the
    # problem (and the original, once a fit check moved it) holds none.
    base = torch.zeros(64, 32, dtype=torch.bfloat16)
    experts = [tau.to(torch.bfloat16) for tau in structured_task_vectors(3, 64, 32)]
    with LiveTensorBytes() as memory:
        problem = TaskVectors(base, experts, [1.0] * 3)
        moved = problem.converted(device=torch.device("cpu", 0))
        assert memory.live == 0
        tau = moved[0]
        assert memory.live == tau.untyped_storage().nbytes() == 64 * 32 * 4
    assert moved.device == torch.device("cpu", 0) and problem.device == torch.device("cpu")
