"""The test helpers' counts (tests/measure.py): every matrix product is counted, in its dtype."""

import pytest
import torch

from tests.measure import MatmulFlops


def test_every_product_family_and_overload_is_counted_in_its_dtype():
    a = torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    with MatmulFlops() as counted:
        a @ b  # mm
        a @ v  # mv
        v @ v  # dot
        torch.bmm(a[None], b[None], out=torch.empty(1, 4, 3, dtype=torch.float64))  # bmm.out
        torch.addmm(torch.zeros(4, 3, dtype=torch.float64), a, b)
        torch.zeros(4, 3, dtype=torch.float64).addmm_(a, b)
        torch.baddbmm(torch.zeros(2, 4, 3, dtype=torch.float64), a.expand(2, 4, 5), b.expand(2, 5, 3))
        torch.addmv(torch.zeros(4, dtype=torch.float64), a, v)
        a.float() @ b.float()
    product = 2 * 4 * 5 * 3
    assert counted.flops[torch.float64] == (
        product + 2 * 4 * 5 + 2 * 5 + product + 2 * product + 2 * product + 2 * 4 * 5)
    assert counted.flops[torch.float32] == product


def test_an_uncounted_matrix_product_is_an_error():
    a = torch.randint(-3, 3, (32, 32), dtype=torch.int8)
    with pytest.raises(NotImplementedError, match="does not count the FLOPs of aten._int_mm"):
        with MatmulFlops():
            torch._int_mm(a, a)
