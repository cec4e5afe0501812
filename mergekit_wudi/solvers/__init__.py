"""WUDI-Merging solvers (arXiv 2503.08099): pure tensor math, torch only, no mergekit.

Every solver takes the task vectors of one linear weight in its ``[out, in]`` view
and returns the merged task vector ``tau_m``; all read the same statistics
(``statistics``: C, D and the loss of Eq. 21).

- ``adam``: the paper's method, Adam on Eq. 21 from the sum (Algorithm 1);
- ``closed_form``: WUDI-CFS, the ridge-regularised minimiser (Eq. 20);
- ``spectral``: the authors' one-shot follow-up (OptMerge, arXiv 2505.19892): the
  gradient flow of Eq. 21 at time t through one eigendecomposition of C, with an
  optional rank cut (SWUDI) or an automatic one (ASWUDI).

``products`` holds the matrix products accurate beyond float32 that the Adam
solver's residual needs, with float64 matmuls or without them;
``matmul_precision`` keeps the Adam solve's float32 matmuls in full float32
(no TF32) whatever the caller set, through either of PyTorch's APIs.
"""

from mergekit_wudi.solvers.adam import (
    DEFAULT_ITERATIONS,
    DEFAULT_LEARNING_RATE,
    RESIDUAL_REFRESH_STEPS,
    adam_descent,
    adam_steps,
    adam_working_bytes,
    descent_start,
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
from mergekit_wudi.solvers.spectral import (
    AUTOMATIC_RANK,
    DEFAULT_FLOW_TIME,
    DEFAULT_RANK_RATIO,
    MIN_EIGENVALUE,
    RankRule,
    prefers_row_space,
    spectral_solve,
    spectral_working_bytes,
    wudi_spectral,
)
from mergekit_wudi.solvers.statistics import (
    InterferenceStatistics,
    interference_losses,
    interference_losses_working_bytes,
    interference_statistics,
    prefers_stacked_form,
    scan_task_vectors,
    working_dtype,
)

__all__ = [
    "AUTOMATIC_RANK",
    "DEFAULT_FLOW_TIME",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_OMEGA",
    "DEFAULT_RANK_RATIO",
    "FAST_FLOAT64_CAPABILITIES",
    "MIN_EIGENVALUE",
    "RESIDUAL_REFRESH_STEPS",
    "InterferenceStatistics",
    "RankRule",
    "adam_descent",
    "adam_steps",
    "adam_working_bytes",
    "closed_form_working_bytes",
    "descent_start",
    "exact_matmul",
    "float64_matmuls_are_fast",
    "gram_and_residual",
    "interference_losses",
    "interference_losses_working_bytes",
    "interference_statistics",
    "prefers_row_space",
    "prefers_stacked_form",
    "residual_through_own_gram",
    "scan_task_vectors",
    "spectral_solve",
    "spectral_working_bytes",
    "wudi_adam",
    "wudi_closed_form",
    "wudi_spectral",
    "working_dtype",
]
