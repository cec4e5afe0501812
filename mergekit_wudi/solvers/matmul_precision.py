"""Full-float32 matmuls for a solve, whatever the caller set, through both of PyTorch's APIs.

PyTorch has two switches for the internal precision of float32 matmuls: the
legacy one (``torch.set_float32_matmul_precision``, which
``torch.backends.cuda.matmul.allow_tf32`` also sets) and, since 2.9, one per
backend (``torch.backends.cuda.matmul.fp32_precision``,
``torch.backends.mkldnn.matmul.fp32_precision``). Each reads the other's state:
after a setting through the new API alone, the legacy getters raise ("mix of the
legacy and new APIs"), and CUDA's TF32 check raises when the two disagree. So
``full_float32_matmuls`` sets both together (the legacy setter to "highest",
which also sets each backend's matmul to "ieee": a consistent state) and puts
back exactly what it found, both APIs' values.

The setting is process-wide, and mergekit's ``--multi-gpu`` runs one solve per GPU
in threads. There is no thread-local switch in PyTorch, so the solves share one:
the first to enter sets full float32, the last to leave restores the caller's
setting (a lock and a count), and no solve's matmuls ever run in TF32 because
another finished. Meanwhile other threads' float32 matmuls run in full float32
too: slower for them, never less accurate.
"""

import contextlib
import threading
from typing import Dict, Iterator, Optional

import torch

# Backends whose float32 matmuls the new API sets: CUDA's cuBLAS (TF32) and
# oneDNN on CPUs (bfloat16 or TF32 where the CPU has them).
BACKENDS = ("cuda", "mkldnn")
FULL_FLOAT32 = "ieee"  # the new API's name for "highest"

_lock = threading.RLock()  # matmul_precision reads under it too
_depth = 0
_saved: Optional[Dict[str, str]] = None


def has_backend_api() -> bool:
    """Whether this PyTorch has the per-backend API (2.9 and later)."""
    return hasattr(torch._C, "_get_fp32_precision_getter")


def matmul_precision() -> Dict[str, str]:
    """The float32 matmul precision now: ``legacy`` (``torch.get_float32_matmul_precision``'s
    stored value, read even where the two APIs disagree and it would raise) and, with
    the per-backend API, each of ``BACKENDS``' matmul setting. To read the legacy
    value it briefly sets the backends to "ieee" (under the solves' lock)."""
    if not has_backend_api():
        return {"legacy": torch.get_float32_matmul_precision()}
    with _lock:
        setting = {backend: torch._C._get_fp32_precision_getter(backend, "matmul")
                   for backend in BACKENDS}
        # The legacy getter raises only when a backend's value contradicts it; with
        # every backend at "ieee" none does, and it returns the stored value.
        for backend in BACKENDS:
            torch._C._set_fp32_precision_setter(backend, "matmul", FULL_FLOAT32)
        setting["legacy"] = torch.get_float32_matmul_precision()
        _set(setting)
    return setting


def _set(setting: Dict[str, str]) -> None:
    """Put back a ``matmul_precision()`` reading: the legacy value first (it also
    sets the backends'), then each backend's own."""
    torch.set_float32_matmul_precision(setting["legacy"])
    for backend in BACKENDS:
        if backend in setting:
            torch._C._set_fp32_precision_setter(backend, "matmul", setting[backend])


@contextlib.contextmanager
def full_float32_matmuls() -> Iterator[None]:
    """Float32 matmuls in full float32 (no TF32, no bfloat16) inside; the caller's
    setting back after the last solve in any thread leaves. Also a decorator."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = matmul_precision()
            torch.set_float32_matmul_precision("highest")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_saved)
                _saved = None
