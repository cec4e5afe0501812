"""The statistics' loss of Eq. 21 (``interference_losses``) against Eq. 21 written out."""

import pytest
import torch

from mergekit_wudi import solvers
from tests.measure import LiveTensorBytes
from tests.oracle import eq21, structured_task_vectors


# [24, 16]: Gram form; [3, 40] with 3 task vectors: in > 2 N out, stacked form.
@pytest.mark.parametrize("shape", [(24, 16), (3, 40)])
def test_losses_at_the_sum_and_at_a_point_are_eq21(shape):
    taus = structured_task_vectors(3, *shape, scale=1e-2) + [torch.zeros(shape)]
    point = solvers.wudi_adam(taus, iterations=50)
    at_sum, at_point = solvers.interference_losses(taus, point)
    assert at_sum == pytest.approx(eq21(sum(tau.double() for tau in taus), taus), rel=1e-9)
    assert at_point == pytest.approx(eq21(point, taus), rel=1e-9)
    assert at_point < at_sum


def test_one_task_vector_has_no_interference():
    (tau,) = structured_task_vectors(1, 8, 6)
    assert solvers.interference_losses([tau], tau) == (0.0, 0.0)


# Gram form, and stacked ([16, 512] with 3 task vectors: in > 2 N out).
@pytest.mark.parametrize("shape", [(512, 128), (16, 512)])
def test_losses_working_memory_is_within_its_estimate(shape):
    taus = structured_task_vectors(3, *shape)
    point = sum(taus)
    with LiveTensorBytes() as memory:
        solvers.interference_losses(taus, point)
    bound = solvers.interference_losses_working_bytes(*shape, 3)
    # An upper bound, and not a loose one (the 1 MiB of small ones aside): the
    # device fit moves solves by it.
    assert memory.peak <= bound <= 2 * memory.peak + 2**20
