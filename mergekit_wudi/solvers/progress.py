"""The hook through which a long solve reports its progress: no display here.

A solver given ``progress`` calls ``progress(phase, done, total)`` between its
steps, never inside one: ``done`` of the solve's ``total`` units are finished and
``phase`` names what runs next. Units are Adam's steps (its setup counts one) or
the one-shot solvers' phases. Without a hook nothing is called.
"""

from typing import Callable

Progress = Callable[[str, int, int], None]

DONE = "done"


def silent(phase: str, done: int, total: int) -> None:
    """The hook of a solve nobody watches."""
