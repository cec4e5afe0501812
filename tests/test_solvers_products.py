"""Accurate products (``solvers/products.py``) against float64 references."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mergekit_wudi.solvers import products


def scaled_error(actual: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error against float64 ``a @ b``, relative to ``|a| @ |b|`` entry by entry."""
    exact = a.double() @ b.double()
    return float(((actual.double() - exact).abs() / (a.double().abs() @ b.double().abs())).max())


@pytest.mark.parametrize("inner", [64, 28672])
def test_split_products_are_far_below_float32_rounding(inner):
    generator = torch.Generator().manual_seed(inner)
    a = torch.randn(16, inner, generator=generator, dtype=torch.float64) * 1e-3
    b = torch.randn(inner, 256, generator=generator)
    plain = scaled_error(a.float() @ b, a, b)
    split = scaled_error(products.exact_matmul(a, b, float64_matmuls=False), a, b)
    # 6 bits per operand at most inner sizes: 1/64 of float32's error, here at
    # least 1/8; a float64 left operand keeps the digits float32 cannot hold.
    assert split < 2e-9 and split < plain / 8, (split, plain)
    assert scaled_error(products.exact_matmul(a, b, float64_matmuls=True), a, b) < 1e-15


def test_leading_parts_multiply_exactly_in_float32():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(8, products.EXACT_CHUNK, generator=generator) * 1e5
    b = torch.rand(products.EXACT_CHUNK, 8, generator=generator) * 1e-7
    bits = products._split_bits(products.EXACT_CHUNK)
    lead_a = products._leading_part(a, bits, dim=1)
    lead_b = products._right_lead(b)
    assert bits == 6 and not torch.equal(lead_a, a) and not torch.equal(lead_b, b)
    assert torch.equal((lead_a @ lead_b).double(), lead_a.double() @ lead_b.double())


@pytest.mark.parametrize("float64_matmuls", [True, False])
def test_accurate_matrix_sums_beyond_float32(float64_matmuls):
    # 1 + 1e-11 * (1 + ... + 39) is 1.0 in float32; the sum must keep the rest.
    matrix = products.AccurateMatrix(64, 64, torch.float32, "cpu", float64_matmuls)
    eye = torch.eye(64, dtype=torch.float64)
    for rows in matrix.row_blocks():
        matrix.add_rows(rows, eye[rows])
    for step in range(1, 40):
        for rows in matrix.row_blocks():
            matrix.add_rows(rows, 1e-11 * step * eye[rows])
    matrix.finish()
    assert torch.equal(matrix.high, torch.eye(64))  # the float32 rounding, for the steps
    left = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    extra = 1e-11 * sum(range(1, 40))
    # The part float32 would lose, as found by each kind of product: split
    # products carry about 2**-6 of float32's rounding error (products.py).
    kept = matrix.times(left) - left.double()
    error = float((kept - left.double() * extra).norm() / (left.double() * extra).norm())
    assert error < (1e-6 if float64_matmuls else 0.05), error


@pytest.mark.parametrize("capability,fast", [
    ((9, 0), True), ((8, 0), True), ((7, 0), True), ((10, 0), True),  # H100/H200, A100, V100, B200
    ((8, 6), False), ((8, 9), False), ((7, 5), False), ((12, 0), False),  # A10, L4, T4, RTX 50
])
def test_float64_speed_is_decided_by_compute_capability(monkeypatch, capability, fast):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert products.float64_matmuls_are_fast(torch.device("cuda", 0)) is fast
    assert products.float64_matmuls_are_fast(torch.device("cpu"))
    assert not products.float64_matmuls_are_fast(torch.device("mps"))


def test_split_products_run_in_full_float32_whatever_the_global_setting():
    # TF32 ("high") would round the rest terms to 10 bits: 2**-17 instead of 2**-30.
    class MatmulPrecisions(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default):
                self.seen.add(torch.get_float32_matmul_precision())
            return func(*args, **(kwargs or {}))

    a, b = torch.randn(8, 32), torch.randn(32, 8)
    torch.set_float32_matmul_precision("high")
    try:
        with MatmulPrecisions() as precisions:
            products.exact_matmul(a, b, float64_matmuls=False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert precisions.seen == {"highest"}
