"""The solves' float32 matmuls run in full float32 whatever the caller set, through
either of PyTorch's APIs, and the caller's setting comes back, also under threads."""

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mergekit_wudi import solvers
from mergekit_wudi.solvers.matmul_precision import (
    BACKENDS,
    full_float32_matmuls,
    has_backend_api,
    matmul_precision,
)
from tests.oracle import authors_wudi, relative_error, structured_task_vectors

pytestmark = pytest.mark.skipif(not has_backend_api(), reason="PyTorch before 2.9")


def backend_precision():
    return {backend: torch._C._get_fp32_precision_getter(backend, "matmul") for backend in BACKENDS}


def legacy_reading():
    """What the legacy getter says, or that it raises (the two APIs disagree)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError as error:
        assert "mix of the legacy and new APIs" in str(error)
        return "raises"


@pytest.fixture(autouse=True)
def pytorch_default():
    yield
    torch.set_float32_matmul_precision("highest")
    for backend in BACKENDS:
        torch._C._set_fp32_precision_setter(backend, "matmul", "none")
    torch._C._set_fp32_precision_setter("generic", "all", "none")


def new_api_tf32():
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def new_api_bf16_on_cpu():
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


def legacy_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True


def legacy_medium_then_new_tf32():
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def generic_tf32():
    torch._C._set_fp32_precision_setter("generic", "all", "tf32")


USER_SETTINGS = [
    new_api_tf32,
    new_api_bf16_on_cpu,
    legacy_tf32,
    lambda: torch.set_float32_matmul_precision("high"),
    lambda: torch.set_float32_matmul_precision("medium"),
    legacy_medium_then_new_tf32,
    generic_tf32,
]


def test_split_product_works_after_tf32_through_the_new_api():
    # The reproduction: the split product read the legacy setting,
    # which raises once TF32 was set through the new API.
    new_api_tf32()
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 30, generator=generator), torch.randn(30, 10, generator=generator)
    product = solvers.exact_matmul(a, b, float64_matmuls=False)
    exact = a.double() @ b.double()
    # Far below float32 rounding (a float32 matmul: 1.4e-7 here).
    assert float((product - exact).abs().max() / exact.abs().max()) < 1e-8
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


@pytest.mark.parametrize("user_setting", USER_SETTINGS)
def test_full_float32_inside_and_the_caller_s_setting_after(user_setting):
    user_setting()
    before = matmul_precision(), backend_precision(), legacy_reading()
    with full_float32_matmuls():
        assert backend_precision() == {backend: "ieee" for backend in BACKENDS}
        # Both APIs agree: CUDA's TF32 check and the legacy getter do not raise.
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    assert (matmul_precision(), backend_precision(), legacy_reading()) == before


def test_the_last_solve_to_leave_restores_under_threads():
    # Solve A enters, solve B enters, A leaves while B still runs: B's matmuls
    # must stay in full float32; the caller's TF32 comes back when B leaves.
    new_api_tf32()
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen_in_b = []

    def solve_a():
        with full_float32_matmuls():
            a_entered.set()
            b_entered.wait(10)
        a_left.set()

    def solve_b():
        a_entered.wait(10)
        with full_float32_matmuls():
            b_entered.set()
            a_left.wait(10)
            seen_in_b.append(torch.backends.cuda.matmul.fp32_precision)

    threads = [threading.Thread(target=solve_a), threading.Thread(target=solve_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen_in_b == ["ieee"]
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


class MatmulPrecisionSeen(TorchDispatchMode):
    """The backends' float32 matmul precision at each float32 matrix product."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "mv", "dot", "addmv")

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.rstrip("_") in self.PRODUCTS and args[-1].dtype == torch.float32:
            self.seen.add(tuple(backend_precision().values()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("float64_matmuls", [True, False])
def test_adam_steps_run_in_full_float32_whatever_the_user_set(float64_matmuls):
    torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bfloat16 on CPUs
    taus = structured_task_vectors(3, 24, 16, scale=1e-2)
    with MatmulPrecisionSeen() as watch:
        merged = solvers.wudi_adam(taus, iterations=20, float64_matmuls=float64_matmuls)
    assert watch.seen == {("ieee", "ieee")}
    assert relative_error(merged, authors_wudi(taus, iterations=20)) < 1e-5
    assert backend_precision() == {"cuda": "tf32", "mkldnn": "bf16"}
