"""The plugin that runs CPU tests on another device (``tests.on_device``), checked on
torch's ``meta`` device, which every machine has."""

import torch

from tests.on_device import TensorsOn


def test_tensors_made_without_a_device_go_to_the_device():
    with TensorsOn("meta"):
        made = [torch.zeros(3), torch.ones(2, 2), torch.randn(4), torch.tensor([1.0]), torch.eye(3)]
        named = torch.zeros(3, device="cpu")
    assert all(tensor.device.type == "meta" for tensor in made)
    assert named.device.type == "cpu"


def test_draws_from_a_cpu_generator_are_the_cpu_draws_moved():
    generator = torch.Generator().manual_seed(7)
    with TensorsOn("meta"):
        first = torch.randn(5, generator=generator)
    assert first.device.type == "meta" and first.shape == (5,)
    # The draw used the CPU generator: its next draw is the CPU sequence's second.
    reference = torch.Generator().manual_seed(7)
    torch.randn(5, generator=reference)
    assert torch.equal(torch.randn(5, generator=generator), torch.randn(5, generator=reference))


def test_draws_are_the_cpu_values_when_the_device_is_the_cpu():
    with TensorsOn("cpu"):
        drawn = torch.randn(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randn(6, generator=torch.Generator().manual_seed(3)))
