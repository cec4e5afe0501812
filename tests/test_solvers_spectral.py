"""Spectral WUDI (``wudi_spectral``) against the float64 references in tests/oracle.py."""

import math

import pytest
import torch

from mergekit_wudi.solvers import RankRule, spectral_working_bytes, wudi_spectral
from mergekit_wudi.solvers.spectral import automatic_rank
from tests.measure import LiveTensorBytes
from tests.oracle import (
    clamped_spectrum,
    eq21,
    gavish_donoho_rank,
    gradient_flow,
    half_eq21_gradient_descent,
    literal_gram_and_target,
    low_rank_task_vectors,
    participation_sqrt_rank,
    relative_error,
    spectral_reference,
    structured_task_vectors,
)

# [out, in]: in > out with N out >= in (C from the in x in Gram), in < out, square,
# and N out < in (the spectrum from the smaller N out x N out Gram).
SHAPES = [(12, 20), (20, 12), (16, 16), (6, 40)]


def update_error(result, expected, task_vectors) -> float:
    """Relative difference of result - sum and expected - sum: stricter than of the results."""
    start = sum(tau.double() for tau in task_vectors)
    return relative_error(result - start, expected - start)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("flow_time", [1.0, 30.0, 300.0])
def test_filter_is_the_gradient_flow_of_eq21(shape, count, flow_time):
    task_vectors = structured_task_vectors(count, *shape, seed=count)
    result = wudi_spectral(task_vectors, flow_time=flow_time)
    assert update_error(result, gradient_flow(task_vectors, flow_time), task_vectors) < 1e-9


@pytest.mark.parametrize("shape", [(8, 12), (3, 16)])
def test_gradient_descent_on_half_eq21_lands_on_flow_time(shape):
    # What makes this WUDI: t / eta plain gradient steps from the sum, eta -> 0.
    task_vectors = structured_task_vectors(3, *shape, seed=7)
    flow_time = 20.0
    result = wudi_spectral(task_vectors, flow_time=flow_time)
    errors = [
        update_error(
            half_eq21_gradient_descent(task_vectors, step, round(flow_time / step)),
            result, task_vectors,
        )
        for step in (0.04, 0.02, 0.01)
    ]
    # Euler's error is first order in the step: it halves with it ...
    assert 0.4 < errors[1] / errors[0] < 0.6 and 0.4 < errors[2] / errors[1] < 0.6, errors
    # ... and 2000 steps from the sum land within 0.3% of the filter's move.
    assert errors[2] < 3e-3, errors


def test_zero_flow_time_is_the_sum_exactly():
    task_vectors = structured_task_vectors(3, 12, 20)
    expected = sum(tau.double() for tau in task_vectors)
    assert torch.equal(wudi_spectral(task_vectors, flow_time=0.0), expected)
    assert torch.equal(wudi_spectral(task_vectors, flow_time=0.0, rank_ratio="auto"), expected)


@pytest.mark.parametrize("settings", [{}, {"flow_time": math.inf, "rank_ratio": "auto"}])
def test_one_active_expert_is_returned_exactly(settings):
    tau = structured_task_vectors(1, 12, 20)[0]
    zero = torch.zeros_like(tau)
    assert torch.equal(wudi_spectral([zero, tau, zero], **settings), tau.double())


def test_zero_task_vectors_are_left_out():
    task_vectors = structured_task_vectors(3, 16, 16)
    zero = torch.zeros_like(task_vectors[0])
    assert torch.equal(
        wudi_spectral([task_vectors[0], zero, *task_vectors[1:], zero]),
        wudi_spectral(task_vectors),
    )


@pytest.mark.parametrize("shape", [(20, 12), (16, 16)])
def test_infinite_flow_time_is_the_minimiser_on_full_rank_gram(shape):
    task_vectors = structured_task_vectors(3, *shape, seed=2)
    gram, target = literal_gram_and_target(task_vectors)
    minimiser = torch.linalg.solve(gram, target.T).T  # D C^-1
    result = wudi_spectral(task_vectors, flow_time=math.inf)
    assert update_error(result, minimiser, task_vectors) < 1e-10


@pytest.mark.parametrize(
    "shape,ranks,tolerance",
    [
        # C from the 24 x 24 Gram, rank 9: its 15 null eigenvalues are rounding
        # noise clamped to 1e-8, so f / lam multiplies float64 rounding by 1e8.
        ((16, 24), (2, 3, 4), 1e-7),
        # C's spectrum from the 12 x 12 S S^T, itself of rank 6: the same
        # amplification of its null directions' rounding.
        ((4, 40), (1, 2, 3), 1e-7),
    ],
)
def test_infinite_flow_time_is_the_minimum_norm_minimiser_on_singular_gram(
    shape, ranks, tolerance
):
    task_vectors = low_rank_task_vectors(*shape, ranks, seed=3)
    gram, target = literal_gram_and_target(task_vectors)
    # D C^+, C's eigenvalues at the rounding of the float32 task vectors (about
    # 1e-16 here, against 1e-2 and up) counted as zero.
    minimiser = target @ torch.linalg.pinv(gram, hermitian=True, rtol=1e-9)
    result = wudi_spectral(task_vectors, flow_time=math.inf)
    assert relative_error(result, minimiser) < tolerance
    # Eq. 21 at its minimum, zero: the rows of C's null space carry nothing.
    start = sum(tau.double() for tau in task_vectors)
    assert eq21(result, task_vectors) < 1e-12 * eq21(start, task_vectors)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (6, 40)])
@pytest.mark.parametrize("rank_ratio", [0.3, 0.4])
@pytest.mark.parametrize("flow_time", [300.0, math.inf])
def test_rank_cut_keeps_the_largest_eigen_directions(shape, rank_ratio, flow_time):
    task_vectors = structured_task_vectors(3, *shape, seed=4)
    kept = math.ceil(rank_ratio * shape[1])
    result = wudi_spectral(task_vectors, flow_time=flow_time, rank_ratio=rank_ratio)
    expected = spectral_reference(task_vectors, flow_time, kept)
    assert update_error(result, expected, task_vectors) < 1e-9
    # The cut matters: one direction more is another result.
    assert update_error(spectral_reference(task_vectors, flow_time, kept + 1), expected,
                        task_vectors) > 1e-4


def test_rank_ratio_is_rounded_up_not_past_whole_numbers():
    # 0.7 * 10 is 7.000000000000001 in floating point: K is 7, not 8.
    task_vectors = structured_task_vectors(3, 12, 10, seed=5)
    result = wudi_spectral(task_vectors, rank_ratio=0.7)
    assert update_error(result, spectral_reference(task_vectors, 300.0, 7), task_vectors) < 1e-9
    assert update_error(result, spectral_reference(task_vectors, 300.0, 8), task_vectors) > 1e-4


def test_participation_sqrt_on_hand_made_spectra():
    assert automatic_rank(torch.full((6,), 0.5, dtype=torch.float64),
                          RankRule.PARTICIPATION_SQRT, (6, 6)) == 6
    # sqrt: 2, 1 and twice the clamp's 1e-4: (3.0002)^2 / 5 = 1.8002 -> 2.
    spectrum = torch.tensor([4.0, 1.0, 1e-8, 1e-8], dtype=torch.float64)
    assert automatic_rank(spectrum, RankRule.PARTICIPATION_SQRT, (4, 4)) == 2


def test_gavish_donoho_on_hand_made_spectra():
    # Square weight: omega(1) = 0.56 - 0.95 + 1.82 + 1.43 = 2.86.
    singular = torch.tensor([0.1, 0.2, 1.0, 2.0, 3.0, 9.0], dtype=torch.float64)
    # torch's (lower) median 1.0: keep 3 and 9. (numpy's 1.5 would keep 9 alone.)
    assert automatic_rank(singular**2, RankRule.GAVISH_DONOHO, (6, 6)) == 2
    # beta = 1/4: omega = 0.00875 - 0.059375 + 0.455 + 1.43 = 1.834375; median 1: keep 2, 3, 9.
    assert automatic_rank(singular**2, RankRule.GAVISH_DONOHO, (6, 24)) == 3
    # A flat spectrum has nothing above the threshold: the top direction is kept.
    assert automatic_rank(torch.ones(5, dtype=torch.float64), RankRule.GAVISH_DONOHO,
                          (5, 5)) == 1


# (shape, count): C from the in x in Gram, and from the smaller S S^T, whose 31
# null eigenvalues of C, at the clamp, set the median.
AUTOMATIC_CASES = [((20, 12), 3), ((12, 20), 3), ((3, 40), 3)]


@pytest.mark.parametrize("shape,count", AUTOMATIC_CASES)
@pytest.mark.parametrize("rule", list(RankRule))
@pytest.mark.parametrize("flow_time", [300.0, math.inf])
def test_automatic_rank_follows_the_rule_on_the_clamped_spectrum(shape, count, rule, flow_time):
    task_vectors = structured_task_vectors(count, *shape, seed=6)
    spectrum = clamped_spectrum(task_vectors)
    if rule == RankRule.PARTICIPATION_SQRT:
        kept = participation_sqrt_rank(spectrum)
    else:
        kept = gavish_donoho_rank(spectrum, shape)
        if shape == (3, 40):
            # Without C's null eigenvalues the median would be the nonzero ones'.
            assert gavish_donoho_rank(spectrum[-count * shape[0]:], shape) < kept
    rank = min(shape[1], count * shape[0])
    assert kept <= rank
    result = wudi_spectral(task_vectors, flow_time=flow_time, rank_ratio="auto", rank_rule=rule)
    expected = spectral_reference(task_vectors, flow_time, kept)
    assert update_error(result, expected, task_vectors) < 1e-9
    if kept < rank:
        assert update_error(spectral_reference(task_vectors, flow_time, kept + 1), expected,
                            task_vectors) > 1e-4


@pytest.mark.parametrize("shape,count", [((256, 128), 3), ((128, 256), 3), ((64, 512), 3)])
def test_working_memory_is_within_its_estimate(shape, count):
    # The device-fit decision (problems.solve_device) trusts the estimate: the
    # tensors a solve makes must stay under it, in the Gram and the row-space form.
    taus = structured_task_vectors(count, *shape)
    estimate = spectral_working_bytes(*shape, count)
    with LiveTensorBytes() as memory:
        wudi_spectral(taus)
    lapack = 8 * (2 * min(shape[1], count * shape[0]) ** 2)  # syevd's workspace, not a tensor
    assert memory.peak <= estimate - lapack
    assert memory.peak > 0.8 * (estimate - lapack - 2**20)
