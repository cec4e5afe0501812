"""WUDI-Merging solvers (arXiv 2503.08099): pure tensor math, torch only, no mergekit.

Every solver takes the task vectors of one linear weight in its ``[out, in]`` view
and returns the merged task vector ``tau_m``; all read the same statistics
(``statistics``: C, D and the loss of Eq. 21).

- ``adam``: the paper's method, Adam on Eq. 21 from the sum (Algorithm 1);
- ``closed_form``: WUDI-CFS, the ridge-regularised minimiser (Eq. 20).

``products`` holds the matrix products accurate beyond float32 that the Adam
solver's residual needs, with float64 matmuls or without them.
"""

from mergekit_wudi.solvers.adam import (
    DEFAULT_ITERATIONS,
    DEFAULT_LEARNING_RATE,
    RESIDUAL_REFRESH_STEPS,
    adam_descent,
    adam_working_bytes,
    adam_steps,
    gram_and_residual,
    residual_through_own_gram,
    wudi_adam,
)
from mergekit_wudi.solvers.closed_form import (
    DEFAULT_OMEGA,
    closed_form_working_bytes,
    wudi_closed_form,
)
from mergekit_wudi.solvers.products import (
    FAST_FLOAT64_CAPABILITIES,
    exact_matmul,
    float64_matmuls_are_fast,
)
from mergekit_wudi.solvers.statistics import (
    InterferenceStatistics,
    interference_loss,
    interference_statistics,
    prefers_stacked_form,
    scan_task_vectors,
    solve_dtype,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_OMEGA",
    "FAST_FLOAT64_CAPABILITIES",
    "RESIDUAL_REFRESH_STEPS",
    "InterferenceStatistics",
    "adam_descent",
    "adam_working_bytes",
    "closed_form_working_bytes",
    "adam_steps",
    "exact_matmul",
    "float64_matmuls_are_fast",
    "gram_and_residual",
    "interference_loss",
    "interference_statistics",
    "prefers_stacked_form",
    "residual_through_own_gram",
    "scan_task_vectors",
    "solve_dtype",
    "wudi_adam",
    "wudi_closed_form",
]
