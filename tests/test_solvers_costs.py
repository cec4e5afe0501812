"""solvers.costs: the FLOP model against the FLOPs counted in real solves."""

import pytest
import torch

from mergekit_wudi import solvers
from mergekit_wudi.solvers.costs import folds, solve_flops
from tests.measure import MatmulFlops
from tests.oracle import structured_task_vectors

EXPERTS = 3


def solve(solver, task_vectors, iterations, float64_matmuls):
    if solver == "adam":
        return solvers.wudi_adam(task_vectors, iterations=iterations, float64_matmuls=float64_matmuls)
    if solver == "closed_form":
        return solvers.wudi_closed_form(task_vectors, omega=solvers.DEFAULT_OMEGA)
    return solvers.wudi_spectral(task_vectors)


@pytest.mark.parametrize(
    "solver, float64_matmuls",
    [("adam", True), ("adam", False), ("closed_form", True), ("spectral", True)],
)
# Square, tall, wide (Adam through tau^T; spectral in the row space) and stacked.
@pytest.mark.parametrize("shape", [(96, 96), (224, 64), (64, 224), (16, 128)])
def test_model_counts_what_the_solve_multiplies(solver, float64_matmuls, shape):
    task_vectors = structured_task_vectors(EXPERTS, *shape)
    with MatmulFlops() as counted:
        solve(solver, task_vectors, 7, float64_matmuls)
    model = solve_flops(solver, shape, EXPERTS, 7, float64_matmuls)
    assert {k: v for k, v in counted.flops.items() if v} == model


def test_folds_and_no_solve():
    assert [folds(n) for n in (1, 50, 51, 300)] == [1, 1, 2, 6]
    assert solve_flops("adam", (8, 8), 1, 300, True) == {}
    assert solve_flops("adam", (8, 8), 3, 0, True) == {}
