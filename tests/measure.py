"""Machine-independent measures of a computation, by watching the ops torch runs.

``LiveTensorBytes``: the peak bytes of tensor storage that ops made and that were
still alive, beyond what existed before (an allocator's workspace inside one
kernel, e.g. LAPACK's, is not seen). ``MatmulFlops``: the FLOPs of the
matrix-product ops (every overload of every product family; an unknown one is an
error), by dtype. Both are ``TorchDispatchMode``s: every op, on any
device, passes through them, so the tests and benchmarks count what the code
does, not what a timer or a page table makes of it.
"""

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves



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


# Matrix products by family (the overload's name, an in-place "_" aside), any
# overload (.default, .out, ...): the two operands' positions. FLOPs: 2 per
# multiply-add, 2 * a.numel() * (columns of b): mm, bmm, mv and dot alike.
PRODUCT_OPERANDS = {
    "mm": (0, 1), "bmm": (0, 1), "mv": (0, 1), "dot": (0, 1), "vdot": (0, 1),
    "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2), "addmv": (1, 2),
    "_addmm_activation": (1, 2),
}

# LAPACK's counts: Cholesky n^3/3, its solve 2 n^2 k, a symmetric eigensolver
# 9 n^3, an LU solve 2/3 n^3 + 2 n^2 k.
FACTORISATION_FLOPS = {
    "linalg_cholesky_ex": lambda a, *_, **__: a.shape[-1] ** 3 // 3,
    "cholesky_solve": lambda b, f, *_, **__: 2 * f.shape[-1] ** 2 * b.shape[-1],
    "_linalg_eigh": lambda a, *_, **__: 9 * a.shape[-1] ** 3,
    "_linalg_solve_ex": lambda a, b, *_, **__: 2 * a.shape[-1] ** 3 // 3
    + 2 * a.shape[-1] ** 2 * (b.shape[-1] if b.dim() == a.dim() else 1),
}

# Name parts that make an op a matrix product or a factorisation: one of these
# outside the two tables above is an error, not a silent zero.
PRODUCT_PARTS = {"mm", "bmm", "mv", "dot", "matmul", "inner", "tensordot", "einsum", "linear"}
FACTORISATION_PARTS = {"cholesky", "eigh", "eig", "svd", "solve", "inv", "lu", "qr", "lstsq"}


def matmul_flops(func, args, kwargs):
    """(dtype, FLOPs) of a matrix-product or factorisation op; None for any other op.

    Raises on an op whose name says it is one of those but that is not counted
    here, so a new product in the code cannot escape the count."""
    name = func.overloadpacket.__name__
    family = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    if family in PRODUCT_OPERANDS:
        first, second = (args[index] for index in PRODUCT_OPERANDS[family])
        return first.dtype, 2 * first.numel() * (second.shape[-1] if second.dim() >= 2 else 1)
    if family in FACTORISATION_FLOPS:
        return args[0].dtype, FACTORISATION_FLOPS[family](*args, **kwargs)
    parts = set(family.strip("_").split("_"))
    if parts & (PRODUCT_PARTS | FACTORISATION_PARTS):
        raise NotImplementedError(f"tests/measure.py does not count the FLOPs of {func}; add it")
    return None


class MatmulFlops(TorchDispatchMode):
    """``flops[dtype]``: FLOPs of matrix products and factorisations (``matmul_flops``) run in ``dtype``."""

    def __init__(self):
        super().__init__()
        self.flops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counted = matmul_flops(func, args, kwargs or {})
        if counted is not None:
            self.flops[counted[0]] += counted[1]
        return func(*args, **(kwargs or {}))
