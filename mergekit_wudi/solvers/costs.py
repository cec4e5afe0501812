"""What one solve costs: matrix-product FLOPs by dtype, from the solvers' structure,
and the bytes its elementwise passes stream.

``benchmarks/llm_scale.py`` checks ``solve_flops`` against the FLOPs counted in
real solves (every 8B shape, both precisions); ``mergekit-wudi-estimate`` turns
it into time with this device's measured matmul rates (``matmul_rates``).
An eigendecomposition counts LAPACK's ``9 n^3``.
"""

import time
from typing import Dict

import torch

from mergekit_wudi.solvers.adam import RESIDUAL_REFRESH_STEPS, residual_through_own_gram
from mergekit_wudi.solvers.spectral import prefers_row_space
from mergekit_wudi.solvers.statistics import prefers_stacked_form


def folds(iterations: int) -> int:
    """Folds in a solve of ``iterations`` steps: one every RESIDUAL_REFRESH_STEPS, one at the end."""
    return (iterations - 1) // RESIDUAL_REFRESH_STEPS + 1


def solve_flops(solver: str, shape, experts: int, iterations: int,
                float64_matmuls: bool) -> Dict[torch.dtype, int]:
    """Matmul FLOPs of one solve of an ``[out, in]`` weight by dtype (``spectral`` at
    its defaults: every direction kept); ``solver`` is a ``parameters.Solver`` value."""
    m, n = shape
    if solver == "closed_form":
        return {torch.float64: experts * 4 * m * n * n + n**3 // 3 + 2 * n * n * m}
    if solver == "spectral":
        return {torch.float64: spectral_flops(m, n, experts)}
    if iterations == 0 or experts <= 1:
        return {}  # the sum: no product at all
    if prefers_stacked_form(m, n, experts):
        setup = experts * 4 * m * m * n  # (a - tau_i) tau_i^T, then tau_i
        fold = step = 4 * experts * m * m * n  # (x S^T) S
    else:
        if residual_through_own_gram(m, n, float64_matmuls):
            setup = experts * 4 * m * n * n  # tau_i^T tau_i, (a - tau_i) G_i
        else:
            setup = experts * (2 * m * n * n + 4 * m * m * n)  # C; through (a - tau_i) tau_i^T
        fold = step = 2 * m * n * n
    accurate = setup + folds(iterations) * fold
    if float64_matmuls:
        return {torch.float32: iterations * step, torch.float64: accurate}
    return {torch.float32: iterations * step + 3 * accurate}  # three float32 per product


def spectral_flops(m: int, n: int, experts: int) -> int:
    """``wudi_spectral``'s float64 FLOPs at its defaults (every direction kept)."""
    if not prefers_row_space(m, n, experts):
        # C and D; eigh of C; the sum and D onto the eigenvectors, and back.
        return experts * 4 * m * n * n + 9 * n**3 + 6 * m * n * n
    s = experts * m  # the rows of the stacked task vectors
    # Each expert's own [out, out] Gram and D; S S^T; its eigh; A U and B U;
    # U^T S, and the coefficients through it.
    return (experts * 4 * m * m * n + 2 * s * s * n + 9 * s**3 + experts * 4 * m * n * s
            + 2 * s * s * n + 2 * m * s * n)


def streamed_bytes(solver: str, shape, experts: int, iterations: int) -> int:
    """Bytes one solve streams through memory outside its matmuls (a rough count).

    Each task vector is made (``expert - base``) and read by the statistics
    twice, in float64 where the products are: about six float64 passes over
    ``[out, in]`` per expert; each Adam step adds the fused update's seven float32
    passes (four tensors read, three written) and the gradient's two. At small
    shapes these passes cost as much as the step's matmul.
    """
    entries = shape[0] * shape[1]
    statistics = experts * 6 * 8 * entries
    if solver == "adam" and iterations and experts > 1:
        return statistics + iterations * 9 * 4 * entries
    return statistics


def memory_rate(device: torch.device, entries: int = 2**22, calls: int = 5) -> float:
    """Bytes per second of an elementwise float32 pass (``a += b``) on ``device``."""
    a = torch.zeros(entries, device=device)
    b = torch.ones(entries, device=device)
    a += b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        a += b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls * 3 * 4 * entries / (time.perf_counter() - start)


def matmul_rates(device: torch.device, size: int, calls: int = 3) -> Dict[torch.dtype, float]:
    """Plain float32 and float64 matmul FLOP/s on ``device`` at ``[size, size]``."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rates = {}
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(size, size, dtype=dtype, device=device)
        a @ a  # warm-up
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            a @ a
        synchronize()
        rates[dtype] = calls * 2 * size**3 / (time.perf_counter() - start)
    return rates


def ideal_seconds(flops: Dict[torch.dtype, int], rates: Dict[torch.dtype, float]) -> float:
    """Seconds of ``flops`` at ``rates`` (FLOP/s by dtype)."""
    return sum(count / rates[dtype] for dtype, count in flops.items())
