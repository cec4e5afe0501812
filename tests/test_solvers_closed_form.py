"""WUDI-CFS (``wudi_closed_form``, paper Eq. 20) against independent references."""

import pytest
import torch

from mergekit_wudi.solvers import closed_form_working_bytes, wudi_closed_form
from tests.measure import LiveTensorBytes
from tests.oracle import (
    eq21,
    exact_minimiser,
    normal_equations_wudi_cfs,
    relative_error,
    structured_task_vectors,
)

# [out, in]: in > out (Gram rank-deficient without the ridge), in < out, square, in >> out.
SHAPES = [(12, 20), (20, 12), (16, 16), (6, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("omega", [1e-6, 1e-4, 1e-2])
def test_closed_form_equals_eq20_normal_equations(shape, count, omega):
    task_vectors = structured_task_vectors(count, *shape, seed=count)
    expected = normal_equations_wudi_cfs(task_vectors, omega)
    # A float64 Cholesky solve against a float64 explicit inverse: 1.2e-14 at
    # worst here; the same solve in float32 is 8e-8 off at best.
    assert relative_error(wudi_closed_form(task_vectors, omega=omega), expected) < 1e-11


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_tiny_omega_approaches_the_minimiser_of_eq21(shape, count):
    task_vectors = structured_task_vectors(count, *shape, seed=count)
    start = eq21(sum(task_vectors), task_vectors)
    minimum = eq21(exact_minimiser(task_vectors), task_vectors)
    assert minimum < start
    losses = [
        eq21(wudi_closed_form(task_vectors, omega=omega), task_vectors)
        for omega in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10)
    ]
    # A smaller ridge is a smaller bias towards the weighted mean of the tau_i ...
    assert losses == sorted(losses, reverse=True)
    # ... and the tiniest closes all but 1e-5 of the gap from the sum start to the minimum.
    assert losses[-1] <= start
    assert losses[-1] - minimum <= 1e-5 * (start - minimum)


@pytest.mark.parametrize("shape", [(1024, 256), (256, 1024)])
def test_working_memory_is_bounded_whatever_the_experts(shape):
    peaks = []
    for count in (2, 6):
        task_vectors = structured_task_vectors(count, *shape)
        with LiveTensorBytes() as memory:
            wudi_closed_form(task_vectors, omega=1e-4)
        assert memory.peak <= closed_form_working_bytes(*shape, count)
        peaks.append(memory.peak)
    assert peaks[0] == peaks[1]
