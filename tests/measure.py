"""Machine-independent measures of a computation, by watching the ops torch runs.

``LiveTensorBytes``: the peak bytes of tensor storage that ops made and that were
still alive, beyond what existed before (an allocator's workspace inside one
kernel, e.g. LAPACK's, is not seen). ``MatmulFlops``: the FLOPs of the
matrix-product ops, by dtype. Both are ``TorchDispatchMode``s: every op, on any
device, passes through them, so the tests and benchmarks count what the code
does, not what a timer or a page table makes of it.
"""

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


class LiveTensorBytes(TorchDispatchMode):
    """``peak``: the most bytes of storage made inside the mode alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages = set()

    def _released(self, key, nbytes):
        self._storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {_key(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = _key(storage), storage.nbytes()
            # A view or an in-place result shares an input's storage: not new.
            if nbytes and key not in self._storages and key not in inputs:
                self._storages.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._released, key, nbytes)
        return out


def _key(storage):
    return storage.device, storage.data_ptr()


def _mm(a, b):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


# FLOPs of each matrix-product op from its arguments (2 per multiply-add).
MATMUL_FLOPS = {
    aten.mm.default: lambda a, b: _mm(a, b),
    aten.mm.out: lambda a, b, **_: _mm(a, b),
    aten.addmm.default: lambda c, a, b, **_: _mm(a, b),
    aten.addmm.out: lambda c, a, b, **_: _mm(a, b),
    aten.addmm_.default: lambda c, a, b, **_: _mm(a, b),
    aten.bmm.default: lambda a, b: a.shape[0] * _mm(a[0], b[0]),
    aten.baddbmm.default: lambda c, a, b, **_: a.shape[0] * _mm(a[0], b[0]),
    # LAPACK's counts: Cholesky n^3/3, its solve 2 n^2 k, a symmetric eigensolver 9 n^3.
    aten.linalg_cholesky_ex.default: lambda a, **_: a.shape[-1] ** 3 // 3,
    aten.cholesky_solve.default: lambda b, f, *_: 2 * f.shape[-1] ** 2 * b.shape[-1],
    aten._linalg_eigh.default: lambda a, *_, **__: 9 * a.shape[-1] ** 3,
}


class MatmulFlops(TorchDispatchMode):
    """``flops[dtype]``: FLOPs of matrix products (``MATMUL_FLOPS``) run in ``dtype``."""

    def __init__(self):
        super().__init__()
        self.flops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        count = MATMUL_FLOPS.get(func)
        if count is not None:
            self.flops[args[0].dtype] += count(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
