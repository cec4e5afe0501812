"""WUDI-Merging solvers (arXiv 2503.08099): pure tensor math, torch only, no mergekit.

Every solver takes the task vectors of one linear weight in its ``[out, in]`` view
and returns the merged task vector ``tau_m``; all read the same statistics
(``statistics``: C, D and the loss of Eq. 21).

- ``adam``: the paper's method, Adam on Eq. 21 from the sum (Algorithm 1);
- ``closed_form``: WUDI-CFS, the ridge-regularised minimiser (Eq. 20).
"""

from mergekit_wudi.solvers.adam import (
    DEFAULT_ITERATIONS,
    DEFAULT_LEARNING_RATE,
    RESIDUAL_REFRESH_STEPS,
    adam_descent,
    adam_steps,
    wudi_adam,
)
from mergekit_wudi.solvers.closed_form import DEFAULT_OMEGA, wudi_closed_form
from mergekit_wudi.solvers.statistics import (
    InterferenceStatistics,
    interference_loss,
    interference_losses,
    interference_statistics,
    prefers_stacked_form,
    solve_dtype,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_OMEGA",
    "RESIDUAL_REFRESH_STEPS",
    "InterferenceStatistics",
    "adam_descent",
    "adam_steps",
    "interference_loss",
    "interference_losses",
    "interference_statistics",
    "prefers_stacked_form",
    "solve_dtype",
    "wudi_adam",
    "wudi_closed_form",
]
