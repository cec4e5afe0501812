"""Apply a model's permutations to its state dict (exact: only gathers)."""

from typing import Dict, Sequence

import torch

from .structure import Structure


def permute_state_dict(
    structure: Structure, state: Dict[str, torch.Tensor], permutations: Sequence[torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Every tensor of ``state`` with each of its axes gathered through all groups.

    Tensors that are tied (one storage under two names) are moved the same way,
    since their names are given the same members; the result keeps them equal.
    """
    permuted = {}
    for name, tensor in state.items():
        for axis in range(tensor.ndim):
            if (name, axis) in structure.touching:
                index = structure.arrangement(permutations, (name, axis)).to(tensor.device)
                tensor = tensor.index_select(axis, index)
        permuted[name] = tensor
    return permuted


def permute_model(structure: Structure, model: torch.nn.Module, permutations: Sequence[torch.Tensor]) -> None:
    """Permute ``model``'s parameters in place; a tied parameter is moved once."""
    state = model.state_dict()
    permuted = permute_state_dict(structure, state, permutations)
    done = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if id(parameter) in done:
                if not torch.equal(done[id(parameter)], permuted[name]):
                    raise RuntimeError(f"tied parameter {name} would be permuted two different ways")
                continue
            parameter.copy_(permuted[name])
            done[id(parameter)] = permuted[name]
