"""Matrix products accurate beyond float32, with or without float64 matmuls.

The Adam solver's residual ``tau_m C - D`` is a small difference of large terms,
so the few products that feed it must be accurate to well below float32's
rounding (``adam``). ``exact_matmul`` computes them either as float64 matmuls or,
where float64 matmuls are slow (consumer and inference GPUs run them at 1/32 to
1/64 of float32), as float32 matmuls on error-free splits of the operands:
Ozaki, Ogita, Oishi and Rump, "Error-free transformations of matrix
multiplication by using fast routines of matrix multiplication and its
applications" (Numerical Algorithms 59, 2012). Float64 is then used only
elementwise, on ``[rows, cols]`` blocks, where it costs memory bandwidth, not
matmul throughput.

The split: ``a = a1 + a2`` with ``a1`` rounded to ``bits`` bits relative to the
largest entry of its row (``b`` likewise per column). Every term of ``a1 @ b1``
is then an integer multiple of one unit below ``2**(2 bits)`` of them, so sums of
up to ``2**(24 - 2 bits)`` terms are exact in float32 whatever the order of
summation: ``a1 @ b1`` is exact over chunks of the inner dimension that long,
summed in float64. The rest, ``a1 @ b2 + a2 @ b``, is ``2**-bits`` smaller and
needs only float32 accuracy. Three float32 matmuls in all; the error is about
``2**-bits`` of a plain float32 matmul's. A right operand used for many products
(C) is split once and kept so (``AccurateMatrix``).
"""

import math
from typing import Iterator, Optional

import torch

from mergekit_wudi.solvers.matmul_precision import full_float32_matmuls

FLOAT32_MANTISSA_BITS = 24

# Inner-dimension chunk of the exact product: 4096 terms leave 6 bits per
# operand (error about 1/64 of float32's at any inner dimension; with the whole
# inner dimension at once, 28672 would leave 4).
EXACT_CHUNK = 4096

# Float64 matmul throughput relative to float32, by CUDA compute capability:
# 1/2 on the data-centre parts below, 1/32 to 1/64 on every other (GeForce,
# RTX/Quadro, T4 7.5, A10/A40 8.6, L4/L40 8.9, Jetson, B300 10.3).
FAST_FLOAT64_CAPABILITIES = {
    (6, 0): "P100",
    (7, 0): "V100",
    (8, 0): "A100, A30",
    (9, 0): "H100, H200, GH200",
    (10, 0): "B200, GB200",
}


def float64_matmuls_are_fast(device: torch.device) -> bool:
    """Whether float64 matmuls run at about half the float32 rate on ``device``.

    True on CPUs (half rate: twice the bytes, same FMA units) and on the CUDA
    parts in ``FAST_FLOAT64_CAPABILITIES``; False on every other accelerator.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) in FAST_FLOAT64_CAPABILITIES
    return False


# An operand: float32 values, or float64 ones that carry more digits than
# float32 holds (within its range of magnitudes, unless float64 matmuls).
# Temporaries are made a block at a time: about 1/BLOCKS of the operand they
# come from, and no smaller than MIN_BLOCK_ELEMENTS.
BLOCKS = 16
MIN_BLOCK_ELEMENTS = 2**16


def blocks(length: int, width: int) -> Iterator[slice]:
    """Slices of ``range(length)`` for about ``BLOCKS`` blocks of ``width``-long lines."""
    return slices(length, block_length(length, width))


def block_length(length: int, width: int) -> int:
    return min(length, max(math.ceil(length / BLOCKS), math.ceil(MIN_BLOCK_ELEMENTS / max(width, 1))))


def slices(length: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(length)``."""
    for start in range(0, length, max(size, 1)):
        yield slice(start, min(start + size, length))


def exact_matmul(a: torch.Tensor, b: torch.Tensor, *, float64_matmuls: bool) -> torch.Tensor:
    """``a @ b`` in float64, accurate to far below float32 rounding.

    ``b`` is converted (or split) a block of columns at a time; a right operand
    used for many products is better held as an ``AccurateMatrix``.
    """
    product = a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float64)
    if float64_matmuls:
        a = a.to(torch.float64)
    else:
        a = _left_operand(a)
    for columns in blocks(b.shape[1], b.shape[0]):
        if float64_matmuls:
            product[:, columns] = a @ b[:, columns].to(torch.float64)
        else:
            high, low = _float32_pair(b[:, columns])
            product[:, columns] = _split_product(a, high, *_right_operand(high, low))
    return product


class AccurateMatrix:
    """A ``[rows, cols]`` matrix B summed beyond float32 precision, then held ready
    for accurate products ``left @ B`` (``times``) and, as ``high`` (B in the
    working dtype), for fast ones.

    With float64 matmuls B is float64 (``high`` its float32 rounding, once
    finished; B itself for a float64 working dtype). Without, B is kept as two
    float32 halves while it is summed, then as the right operand of the split
    product: ``high``, its leading part and the rest (made in place of the low
    half). Either way three float32 ``[rows, cols]`` tensors' worth.
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device, float64_matmuls: bool):
        self.float64_matmuls = float64_matmuls
        if float64_matmuls:
            self.exact = torch.zeros(rows, cols, dtype=torch.float64, device=device)
            self.high = self.exact if dtype == torch.float64 else None
        else:
            self.high = torch.zeros(rows, cols, dtype=dtype, device=device)
            self.low = torch.zeros_like(self.high)
            self.lead = None

    def row_blocks(self) -> Iterator[slice]:
        return blocks(*self.exact.shape if self.float64_matmuls else self.high.shape)

    def rows_float64(self, rows: slice) -> torch.Tensor:
        """B[rows] in float64 (a copy), while B is being summed."""
        if self.float64_matmuls:
            return self.exact[rows].clone()
        return self.high[rows].to(torch.float64).add_(self.low[rows])

    def add_rows(self, rows: slice, addend: torch.Tensor) -> None:
        """B[rows] += addend (float64), the sum rounded once."""
        if self.float64_matmuls:
            self.exact[rows] += addend
            return
        total = self.rows_float64(rows).add_(addend)
        self.high[rows] = total
        self.low[rows] = total.sub_(self.high[rows])

    def add_gram(self, tau: torch.Tensor, weight: float) -> None:
        """B += weight tau^T tau, accurately."""
        if self.float64_matmuls:
            # Accumulated in place over blocks of tau's rows: no [cols, cols] temporary.
            for rows in blocks(*tau.shape):
                block = tau[rows].to(torch.float64)
                self.exact.addmm_(block.T, block, alpha=weight)
            return
        for rows in self.row_blocks():
            product = exact_matmul(tau[:, rows].T, tau, float64_matmuls=False)
            self.add_rows(rows, product.mul_(weight))

    @staticmethod
    def bytes_per_entry(float64_matmuls: bool) -> int:
        """Storage once finished: float64 (float32 ``high`` aside), or three float32."""
        return 8 if float64_matmuls else 12

    def finish(self, steps: bool = True) -> "AccurateMatrix":
        """Done summing: make the operands ``times`` reads, and ``high`` if ``steps``."""
        if self.float64_matmuls:
            if self.high is None and steps:
                self.high = self.exact.to(torch.float32)
        else:
            self.lead = _right_lead(self.high)
            for rows in self.row_blocks():  # rest = (high - lead) + low, in place of low
                self.low[rows] += self.high[rows] - self.lead[rows]
            self.rest, self.low = self.low, None
        return self

    def times(self, left: torch.Tensor) -> torch.Tensor:
        """left @ B, accurately, in float64 (after ``finish``)."""
        if self.float64_matmuls:
            return left.to(torch.float64) @ self.exact
        return _split_product(_left_operand(left), self.high, self.lead, self.rest)


def _float32_pair(x: torch.Tensor):
    """(high, low) float32 with high + low = x to 2**-48; low None for float32 x."""
    if x.dtype != torch.float64:
        return x, None
    high = x.to(torch.float32)
    return high, (x - high).to(torch.float32)


def _left_operand(a: torch.Tensor):
    """(lead, rest) of the left operand: ``a`` = lead + rest, lead split by rows."""
    high, low = _float32_pair(a)
    lead = _leading_part(high, _split_bits(min(a.shape[1], EXACT_CHUNK)), dim=1)
    rest = high - lead  # exact
    if low is not None:
        rest += low
    return lead, rest


def _right_operand(high: torch.Tensor, low: Optional[torch.Tensor]):
    """(lead, rest) of the right operand ``high + low``: lead split by columns."""
    lead = _right_lead(high)
    rest = high - lead  # exact
    if low is not None:
        rest += low
    return lead, rest


def _right_lead(high: torch.Tensor) -> torch.Tensor:
    """high's leading part by columns, made a block of rows at a time."""
    rows = list(blocks(*high.shape))
    largest = high[rows[0]].abs().amax(dim=0, keepdim=True)
    for block in rows[1:]:
        torch.maximum(largest, high[block].abs().amax(dim=0, keepdim=True), out=largest)
    shift = _shift(largest, _split_bits(min(high.shape[0], EXACT_CHUNK)))
    lead = torch.empty_like(high)
    for block in rows:
        torch.add(high[block], shift, out=lead[block]).sub_(shift)
    return lead


def _split_product(left, high, lead, rest) -> torch.Tensor:
    """(a_lead + a_rest) @ B, B = high (+ low) = lead + rest: three float32 matmuls."""
    a_lead, a_rest = left
    product = torch.zeros(a_lead.shape[0], high.shape[1], dtype=torch.float64, device=high.device)
    # The smaller terms too are summed a chunk at a time: float32's error on a
    # sum of n terms grows with n (up to n itself, in a narrow product). TF32 or
    # bfloat16 matmuls would round the rest terms to 10 or 7 bits.
    with full_float32_matmuls():
        for chunk in slices(a_lead.shape[1], EXACT_CHUNK):
            product += a_lead[:, chunk] @ lead[chunk]  # exact in float32
            product += (a_lead[:, chunk] @ rest[chunk]).addmm_(a_rest[:, chunk], high[chunk])
    return product


def _split_bits(inner: int) -> int:
    """Bits per operand that keep sums of ``inner`` products exact in float32."""
    return (FLOAT32_MANTISSA_BITS - math.ceil(math.log2(max(inner, 2)))) // 2


def _leading_part(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``x`` rounded to multiples of ``2**(e - bits)``, ``2**e`` bounding |x| along ``dim``."""
    shift = _shift(x.abs().amax(dim=dim, keepdim=True), bits)
    return (x + shift).sub_(shift)


def _shift(largest: torch.Tensor, bits: int) -> torch.Tensor:
    """Rump's extraction constant: ``(x + shift) - shift`` rounds x exactly to
    multiples of ``2**(e - bits)``, ``2**e`` > ``largest`` (x + shift stays in
    one binade), so every entry becomes an integer of at most ``bits`` bits
    times that unit."""
    exponent = torch.frexp(largest).exponent  # largest < 2**exponent
    return torch.ldexp(torch.full_like(largest, 1.5), exponent + (FLOAT32_MANTISSA_BITS - 1 - bits))
