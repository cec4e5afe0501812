"""pytest plugin: run tests written for the CPU with their tensors on another device.

    python -m pytest -p tests.on_device --tensor-device cuda tests/test_solvers_adam.py

Inside each test, a tensor made without naming a device (``torch.randn``,
``torch.zeros``, ...) is made on ``--tensor-device``, so the code under test
computes there. Random tensors drawn from a CPU ``torch.Generator`` (those of
``tests.oracle``) are drawn on the CPU and then moved: the values, and with them
the references' tolerances, are those of a CPU run. The GPU check
(``benchmarks/gpu_check.py``) runs the solver tests so.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors


class TensorsOn(TorchFunctionMode):
    """Factory functions without a ``device`` make their tensor on ``device``."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and kwargs.get("device") is None:
            generator = kwargs.get("generator")
            if generator is not None:
                kwargs["device"] = generator.device
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def pytest_addoption(parser):
    parser.addoption("--tensor-device", help="make the tests' tensors on this device (e.g. cuda)")


@pytest.fixture(autouse=True)
def _tensors_on_the_device(request):
    device = request.config.getoption("--tensor-device")
    if device is None:
        yield
        return
    with TensorsOn(device):
        yield
