"""The Adam solver against the authors' formulation (tests/oracle.py).

Precision tests run both ways of computing the accurate products: float64
matmuls and split float32 ones (``float64_matmuls=False``, the path chosen on
GPUs slow at float64).
"""

import pytest
import torch

from mergekit_wudi import solvers
from tests.measure import LiveTensorBytes, MatmulFlops
from tests.oracle import (
    authors_wudi,
    eq21,
    low_rank_task_vectors,
    relative_error,
    structured_task_vectors,
)

SHAPES = [(64, 32), (32, 64), (16, 200)]  # in < out, in > out, stacked form
PRODUCTS = pytest.mark.parametrize(
    "float64_matmuls", [True, False], ids=["float64-matmuls", "split-float32"]
)


@PRODUCTS
@pytest.mark.parametrize("count", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_adam_equals_authors_formulation(count, shape, float64_matmuls):
    taus = structured_task_vectors(count, *shape, seed=count)
    merged = solvers.wudi_adam(taus, float64_matmuls=float64_matmuls)
    expected = authors_wudi(taus)
    assert relative_error(merged, expected) < 1e-5
    # The solve really moved: a no-op solver would fail here.
    assert relative_error(sum(taus), expected) > 1e-2 or count == 1


@pytest.mark.parametrize("iterations,learning_rate", [(1, 1e-5), (37, 3e-5), (120, 1e-4)])
def test_iterations_and_learning_rate_are_honoured(iterations, learning_rate):
    taus = structured_task_vectors(4, 40, 56, seed=7)
    merged = solvers.wudi_adam(taus, iterations=iterations, learning_rate=learning_rate)
    expected = authors_wudi(taus, iterations=iterations, learning_rate=learning_rate)
    assert relative_error(merged, expected) < 1e-5


def test_both_forms_are_exercised_and_agree():
    # 2 * N * out < in selects the stacked form; force both on the same input.
    taus = structured_task_vectors(3, 12, 100, seed=3)
    assert solvers.prefers_stacked_form(12, 100, 3)
    assert not solvers.prefers_stacked_form(100, 12, 3)
    stacked = solvers.interference_statistics(taus, stacked=True)
    gram = solvers.interference_statistics(taus, stacked=False)
    assert stacked.gram is None and gram.rows is None
    torch.testing.assert_close(stacked.rows.T @ stacked.rows, gram.gram, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.target, gram.target, rtol=1e-5, atol=1e-9)


def test_zero_iterations_is_the_sum():
    taus = structured_task_vectors(3, 20, 30)
    assert torch.equal(solvers.wudi_adam(taus, iterations=0), taus[0] + taus[1] + taus[2])


def test_one_expert_is_returned_exactly():
    (tau,) = structured_task_vectors(1, 20, 30)
    assert torch.equal(solvers.wudi_adam([tau]), tau)


def test_zero_task_vectors_are_skipped():
    taus = structured_task_vectors(2, 24, 18, seed=5)
    with_zero = solvers.wudi_adam([taus[0], torch.zeros_like(taus[0]), taus[1]])
    assert relative_error(with_zero, authors_wudi(taus)) < 1e-5
    assert torch.equal(solvers.wudi_adam([torch.zeros(4, 3)] * 3), torch.zeros(4, 3))


def test_loss_decreases_from_the_sum():
    taus = structured_task_vectors(4, 32, 32, seed=11)
    before = eq21(sum(taus), taus)
    after = eq21(solvers.wudi_adam(taus), taus)
    assert after < 0.5 * before


def test_extreme_magnitudes_are_solved_in_float64():
    taus = structured_task_vectors(2, 8, 6, scale=1e30)
    assert solvers.scan_task_vectors(taus).dtype == torch.float64
    assert solvers.scan_task_vectors(structured_task_vectors(2, 8, 6)).dtype == torch.float32
    merged = solvers.wudi_adam(taus)
    assert merged.dtype == torch.float64 and torch.isfinite(merged).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_is_torch_optim_adam(dtype):
    # Fed the same gradients, torch.optim.Adam(fused=True) must give exactly the
    # same bits every step, and its default path the same numbers up to rounding.
    generator = torch.Generator().manual_seed(13)
    start = torch.randn(24, 16, generator=generator, dtype=dtype)
    curvature = torch.rand(16, generator=generator, dtype=dtype) + 0.1

    def gradient_at(step):
        return ours * (curvature * step**0.5)  # step-dependent, like re-anchoring

    ours = start.clone()
    solvers.adam_steps(ours, gradient_at, 40, 3e-2)
    references = {}
    for fused in (True, False):
        reference = start.clone()
        optimizer = torch.optim.Adam([reference], lr=3e-2, fused=fused)
        for step in range(1, 41):
            reference.grad = reference * (curvature * step**0.5)
            optimizer.step()
        references[fused] = reference
    assert not torch.equal(ours, start)
    assert torch.equal(ours, references[True])
    rounding = 64 * torch.finfo(dtype).eps * float(start.abs().max())
    assert float((ours - references[False]).abs().max()) < rounding


@PRODUCTS
@pytest.mark.parametrize("shape,ranks", [((96, 64), (2, 4, 8)), ((64, 96), (2, 4, 8)),
                                         ((128, 128), (4, 4, 4, 4)), ((8, 120), (1, 2))])
def test_low_rank_task_vectors_follow_the_exact_trajectory(shape, ranks, float64_matmuls):
    # LoRA-like updates make C singular: float32 copies of C and D would shift the
    # minimum along the directions they do not span (2e-6 to 1.5e-5 off before the
    # anchored gradient), and so would float32 products in the residual and its
    # folds (6e-7 to 1.8e-6). The authors' float32 loop is 4.4e-7 to 5.1e-7 off
    # here; ours 1.0e-7 to 1.7e-7 with either kind of accurate product, rounding
    # tau_m once per fold rather than every step.
    taus = low_rank_task_vectors(*shape, ranks, seed=sum(ranks))
    exact = authors_wudi(taus, dtype=torch.float64)
    merged = solvers.wudi_adam(taus, float64_matmuls=float64_matmuls)
    assert relative_error(merged, exact) < 3e-7


# Shapes of 2**20 entries: the accurate products' blocks are 1/16 of a tensor.
@pytest.mark.parametrize("shape,experts", [((4096, 256), 3), ((512, 2048), 2), ((256, 4096), 2)],
                         ids=["out>in", "in>out", "stacked"])
def test_working_memory_is_six_copies_beside_c_whatever_the_experts(shape, experts, monkeypatch):
    monkeypatch.setattr(solvers.adam, "RESIDUAL_REFRESH_STEPS", 2)  # a fold within 4 steps
    out_features, in_features = shape
    copy = 4 * out_features * in_features
    c_bytes = (experts * copy if solvers.prefers_stacked_form(*shape, experts)
               else 12 * in_features**2)  # the stacked task vectors, or C in three float32
    peaks = []
    for count in (experts, experts + 4):
        taus = structured_task_vectors(count, *shape)
        with LiveTensorBytes() as memory:
            solvers.wudi_adam(taus, iterations=4)
        peaks.append(memory.peak)
        assert memory.peak <= solvers.adam_working_bytes(*shape, count)
    # Offset, gradient, two Adam moments, anchor, residual; the old solver held 16.
    assert (peaks[0] - c_bytes) / copy <= 6.2
    if not solvers.prefers_stacked_form(*shape, experts + 4):
        assert peaks[1] == peaks[0]


def test_split_products_spend_no_float64_matmuls():
    taus = structured_task_vectors(3, 96, 64)
    counts = {}
    for float64_matmuls in (True, False):
        with MatmulFlops() as flops:
            solvers.wudi_adam(taus, float64_matmuls=float64_matmuls)
        counts[float64_matmuls] = flops.flops
    steps = solvers.DEFAULT_ITERATIONS * 2 * 96 * 64**2
    assert counts[False][torch.float64] == 0
    # Split products: three float32 matmuls where one float64 one was.
    assert counts[False][torch.float32] > counts[True][torch.float32] >= steps
    # Float64: the residual (3 experts' Grams, 3 terms through them) and 6 folds
    # (5 every 50 steps, 1 at the end), each a step's worth: 12 steps' of the 300.
    assert counts[True][torch.float64] == 12 * 2 * 96 * 64**2


@pytest.mark.parametrize("scale, share", [(2e-3, (0.15, 0.17)), (1e-2, (0.045, 0.065))])
def test_the_merged_update_of_low_rank_updates_is_not_low_rank(scale, share):
    # docs/lora.md: Adam's per-entry steps leave the adapters' span, the more so
    # the smaller the task vectors are next to the learning rate.
    taus = low_rank_task_vectors(48, 32, [2, 4, 8], scale=scale)
    singular = torch.linalg.svdvals(solvers.wudi_adam(taus).double())
    beyond = float(singular[14:].square().sum().sqrt() / singular.square().sum().sqrt())
    assert share[0] < beyond < share[1]
