"""MuDSC matching: combined weight/activation similarity, Hungarian assignment per
group, coordinate descent over groups (pure torch, numpy and scipy).

A permutation ``p`` of a group maps the reference's unit u to the model's unit
``p[u]``: the aligned model takes unit ``p[u]`` into position u.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .structure import Group, Structure


def assign(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation maximising the summed similarity (rows: reference units)."""
    rows, columns = linear_sum_assignment(similarity.numpy(), maximize=True)
    return torch.as_tensor(columns[np.argsort(rows)], dtype=torch.long)


def assign_in_blocks(similarity: torch.Tensor, block: int) -> torch.Tensor:
    """Hungarian inside each diagonal block of ``block`` units (units never leave their block)."""
    parts = []
    for start in range(0, similarity.shape[0], block):
        part = similarity[start:start + block, start:start + block]
        parts.append(assign(part) + start)
    return torch.cat(parts)


def assign_heads(similarity: torch.Tensor, head_size: int) -> torch.Tensor:
    """Two-level assignment: dims within every head pair, then head pairs by the mean
    matched value of their dims. Heads move whole; dims move within a head."""
    heads = similarity.shape[0] // head_size
    blocks = similarity.reshape(heads, head_size, heads, head_size).permute(0, 2, 1, 3)
    inner = {}
    head_similarity = torch.empty(heads, heads, dtype=similarity.dtype)
    for a in range(heads):
        for b in range(heads):
            inner[a, b] = assign(blocks[a, b])
            head_similarity[a, b] = blocks[a, b][torch.arange(head_size), inner[a, b]].mean()
    pairs = assign(head_similarity)
    return torch.cat([inner[a, int(b)] + int(b) * head_size for a, b in enumerate(pairs)])


def solve(group: Group, similarity: torch.Tensor) -> torch.Tensor:
    if group.head_size:
        return assign_heads(similarity, group.head_size)
    if group.block:
        return assign_in_blocks(similarity, group.block)
    return assign(similarity)


def matched(similarity: torch.Tensor, permutation: torch.Tensor) -> float:
    return float(similarity[torch.arange(len(permutation)), permutation].mean())


def activation_similarity(
    structure: Structure, number: int, correlations: Dict[str, torch.Tensor], permutations: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Mean correlation over the group's sites and copies, the model's units taken in the
    arrangement the groups before this one left."""
    group = structure.groups[number]
    total, count = torch.zeros(group.units, group.units, dtype=torch.float64), 0
    for site in group.sites:
        arranged = structure.arrangement(permutations, site.key, before=number)[site.positions]
        correlation = correlations[site.statistic]
        for copy in range(site.positions.shape[1]):
            total += correlation[site.positions[:, copy]][:, arranged[:, copy]]
            count += 1
    return total / count


def _unit_features(tensor: torch.Tensor, axis: int, positions: torch.Tensor) -> torch.Tensor:
    """(units, features): each unit's entries at ``positions`` along ``axis``, all other axes."""
    moved = tensor.movedim(axis, 0)
    return moved[positions.flatten()].reshape(positions.shape[0], -1).to(torch.float64)


def weight_similarity(
    structure: Structure, number: int, reference: Dict[str, torch.Tensor], model: Dict[str, torch.Tensor],
    permutations: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Pearson correlation of each unit's concatenated weights (its rows, its consumers'
    columns, norm entries) between reference and model; the model's other axes are
    gathered through the current permutations of every group, this axis through the
    groups before this one. Members that move per head only are left out (their dims
    are not this group's units)."""
    group = structure.groups[number]
    units = group.units
    dot = torch.zeros(units, units, dtype=torch.float64)
    sums = [torch.zeros(units, dtype=torch.float64) for _ in range(4)]  # x, y, x^2, y^2
    size = 0
    for member in group.members:
        if member.per_head:
            continue
        name, axis = member.key
        x, y = reference[name], model[name]
        for other in range(y.ndim):
            index = structure.arrangement(permutations, (name, other), before=number if other == axis else None)
            y = y.index_select(other, index.to(y.device))
        fx, fy = _unit_features(x, axis, member.positions).cpu(), _unit_features(y, axis, member.positions).cpu()
        dot += fx @ fy.T
        for total, value in zip(sums, (fx, fy, fx * fx, fy * fy)):
            total += value.sum(1)
        size += fx.shape[1]
    mean_x, mean_y = sums[0] / size, sums[1] / size
    std_x = (sums[2] / size - mean_x**2).clamp_min(0).sqrt()
    std_y = (sums[3] / size - mean_y**2).clamp_min(0).sqrt()
    covariance = dot / size - torch.outer(mean_x, mean_y)
    scale = torch.outer(std_x, std_y)
    return torch.where(scale > 0, covariance / scale.clamp_min(1e-300), 0.0)


def match(
    structure: Structure, reference: Dict[str, torch.Tensor], model: Dict[str, torch.Tensor],
    correlations: Optional[Dict[str, torch.Tensor]], alpha: float, seed: int = 0,
    max_passes: int = 100, patience: int = 5, progress: Callable = lambda items, **_: items,
) -> Tuple[List[torch.Tensor], float]:
    """MuDSC's alignment: permutations of ``model``'s groups onto ``reference``.

    Start from activation similarity alone, as the official code does whatever
    ``alpha`` is; without ``correlations`` (``alpha`` 1 only) from the identity, which is
    plain weight matching (Git Re-Basin). Then coordinate descent: visit the chains of groups in random order,
    re-solve each group on ``alpha * weight + (1 - alpha) * activation`` with the
    current neighbours, stop after ``patience`` passes without improvement of the mean
    matched similarity, keep the best. Returns (permutations, that mean).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if correlations is None and alpha < 1:
        raise ValueError(f"alpha {alpha} needs activation correlations (only alpha 1 can do without)")
    groups = structure.groups
    permutations = structure.identity()
    activation: Dict[int, torch.Tensor] = {}

    def activation_of(number):
        # Fixed per group once the groups before it are fixed (they are, within a chain).
        activation[number] = activation_similarity(structure, number, correlations, permutations)
        return activation[number]

    chains: Dict[str, List[int]] = {}
    for number, group in enumerate(groups):
        chains.setdefault(group.chain, []).append(number)
    if correlations is not None:
        for chain in progress(list(chains.values()), desc="activation matching", unit="group"):
            for number in chain:
                permutations[number] = solve(groups[number], activation_of(number))
        if alpha == 0:
            return permutations, float(np.mean([matched(activation[n], p) for n, p in enumerate(permutations)]))
    rng = np.random.default_rng(seed)
    best, best_permutations, stale = -np.inf, None, 0
    for _ in progress(range(max_passes), desc="coordinate descent", unit="pass"):
        scores = []
        for chain_number in rng.permutation(len(chains)):
            for number in list(chains.values())[chain_number]:
                similarity = alpha * weight_similarity(structure, number, reference, model, permutations)
                if alpha < 1:
                    similarity += (1 - alpha) * activation_of(number)
                permutations[number] = solve(groups[number], similarity)
                scores.append(matched(similarity, permutations[number]))
        score = float(np.mean(scores))
        if score > best + 1e-12:
            best, best_permutations, stale = score, [p.clone() for p in permutations], 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_permutations, best
