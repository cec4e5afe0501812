"""A progress bar for one long solve, beneath mergekit's, on stderr.

mergekit 0.1.5 passes ``--quiet`` to its bars as ``tqdm(disable=options.quiet)``,
and tqdm keeps only enabled bars in ``tqdm._instances``: the solve draws a bar
only where mergekit is drawing one (and ``--quiet`` leaves none), and only when
stderr is a terminal. tqdm's ``delay`` keeps a solve shorter than
``BAR_DELAY_SECONDS`` from drawing anything; the bar's line is cleared when the
solve ends. Python's API (``merge_tensors``) and piped output get no bar.
"""

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import tqdm

from mergekit_wudi.solvers.progress import Progress

BAR_DELAY_SECONDS = 3.0


def mergekit_bar_shown() -> bool:
    """Whether an enabled tqdm bar (mergekit's, unless ``--quiet``) is open."""
    return len(tqdm.tqdm._instances) > 0


@contextmanager
def solve_progress(name: Optional[str]) -> Iterator[Optional[Progress]]:
    """The ``progress`` hook for the solve of tensor ``name``: a tqdm bar, or None
    where none is to be drawn (``solvers.progress``: None costs the solve nothing)."""
    if not (sys.stderr.isatty() and mergekit_bar_shown()):
        yield None
        return
    bar = tqdm.tqdm(
        total=1, desc=f"wudi {name}", leave=False, delay=BAR_DELAY_SECONDS,
        file=sys.stderr, dynamic_ncols=True,
    )
    shown_phase = None

    def report(phase: str, done: int, total: int) -> None:
        nonlocal shown_phase
        bar.total = total
        bar.n = done
        if phase != shown_phase:
            # A phase may run long: name it now, if the bar is due to show.
            shown_phase = phase
            due = bar.format_dict["elapsed"] >= bar.delay
            bar.set_description_str(f"wudi {name}: {phase}", refresh=due)
        else:
            bar.update(0)

    try:
        yield report
    finally:
        bar.close()
