"""What the merge did with each tensor, told through ``logging`` (stderr, never stdout).

mergekit's ``-v`` sets the root logger to INFO: then every tensor gets one line
(``log_tensor``). At mergekit's default level only warnings show: one per merge
if a tensor that looks like a linear layer fell back to task arithmetic
(``warn_fallback``).

"One per merge": the kernel sees one tensor at a time and nothing marks where a
merge begins, so a merge is known by its models (base and experts). The first
such tensor of a set of models warns, once per process; a second merge of the
same models in the same process (a sweep through mergekit's Python API) does not
warn again.
"""

import logging
import threading
from typing import FrozenSet, Hashable, Iterable, Optional, Sequence, Set, Tuple

from mergekit_wudi.tensor_rules import Fallback, TensorFate, looks_like_linear_layer

LOG = logging.getLogger("mergekit_wudi")

_warned_merges: Set[FrozenSet[str]] = set()
_warned_lock = threading.Lock()  # mergekit's multi-GPU executor runs tensors in threads


def accounting() -> bool:
    """Whether per-tensor lines are logged, so their losses are worth computing."""
    return LOG.isEnabledFor(logging.INFO)


def log_tensor(
    name: Optional[str],
    shape: Sequence[int],
    fate: TensorFate,
    solver: str,
    changed: int,
    models: int,
    losses: Optional[Tuple[float, float]],
    seconds: float,
) -> None:
    """One INFO line: name, shape, fate, how many models changed it, Eq. 21 at the
    sum of the task vectors and at the solve's result (summed over a stack's
    slices, before lambda), and the time the tensor took."""
    what = f"{solver}, {fate.describe()}" if fate.solved else fate.describe()
    loss = ""
    if losses is not None:
        loss = f"; Eq. 21 loss {losses[0]:.4g} at the sum, {losses[1]:.4g} solved"
    LOG.info(
        "wudi: %s %s: %s; %d of %d models changed it%s; %.2f s",
        name, list(shape), what, changed, models, loss, seconds,
    )


def warn_fallback(
    name: Optional[str], shape: Sequence[int], fate: TensorFate, models: Iterable[Hashable]
) -> None:
    """Warn, once per merge, that a tensor that looks like a linear layer gets task
    arithmetic. Not when the recipe asked for it (``apply_wudi: never``)."""
    if fate.solved or fate.reason == Fallback.NEVER or not looks_like_linear_layer(name, shape):
        return
    merge = frozenset(str(model) for model in models)
    with _warned_lock:
        if merge in _warned_merges:
            return
        _warned_merges.add(merge)
    LOG.warning(
        "wudi: tensor %r %s looks like a linear layer but gets task arithmetic (%s)."
        " If it is one, set `apply_wudi: always` for it with a filter (and `layout: in_out`"
        " if it computes x @ W); run mergekit with -v to see what every tensor gets."
        " Other such tensors of this merge are not reported.",
        name, list(shape), fate.reason.value,
    )
