"""Independent references the tests compare against.

``authors_wudi`` is the authors' formulation (their ``lamassu.py``): N batched
``[out, out]`` products, autograd, ``torch.optim.Adam``. It shares no code with
``mergekit_wudi.solvers`` and is deliberately the slow, obvious way.
"""

from typing import Sequence

import torch


def authors_wudi(
    task_vectors: Sequence[torch.Tensor], iterations: int = 300, learning_rate: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """float32 as in the authors' code; float64 gives the exact-arithmetic trajectory."""
    taus = torch.stack([tau.to(dtype) for tau in task_vectors])
    merged = taus.sum(dim=0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=learning_rate)
    norms_sq = taus.pow(2).sum(dim=(1, 2))
    for _ in range(iterations):
        optimizer.zero_grad()
        interference = torch.bmm(merged.unsqueeze(0) - taus, taus.transpose(1, 2))
        loss = (interference.pow(2).sum(dim=(1, 2)) / norms_sq).sum()
        loss.backward()
        optimizer.step()
    return merged.detach()


def eq21(merged: torch.Tensor, task_vectors: Sequence[torch.Tensor]) -> float:
    """sum_i ||(tau_m - tau_i) tau_i^T||^2 / ||tau_i||^2 as written, float64; zero
    task vectors (which WUDI leaves out) contribute nothing."""
    merged = merged.double()
    return sum(
        float(((merged - tau) @ tau.T).square().sum() / tau.square().sum())
        for tau in (t.double() for t in task_vectors) if tau.any()
    )


def normal_equations_wudi_cfs(task_vectors: Sequence[torch.Tensor], omega: float) -> torch.Tensor:
    """Paper Eq. 20 written literally, in float64, with an explicit inverse."""
    taus = [tau.double() for tau in task_vectors]
    eye = torch.eye(taus[0].shape[1], dtype=torch.float64)
    left = sum(tau @ (tau.T @ tau + omega * eye) / tau.pow(2).sum() for tau in taus)
    right = sum((tau.T @ tau + omega * eye) / tau.pow(2).sum() for tau in taus)
    return left @ torch.linalg.inv(right)


def low_rank_task_vectors(
    out_features: int, in_features: int, ranks: Sequence[int], seed: int = 0, scale: float = 2e-3
) -> list:
    """Exactly low-rank updates B @ A, like LoRA adapters: C is singular."""
    generator = torch.Generator().manual_seed(seed)
    return [
        scale * torch.randn(out_features, rank, generator=generator)
        @ torch.randn(rank, in_features, generator=generator) / rank**0.5
        for rank in ranks
    ]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius-norm relative difference, the measure the 1e-5 target uses."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def structured_task_vectors(
    count: int, out_features: int, in_features: int, seed: int = 0, scale: float = 1e-3,
    rank: int = 8,
) -> list:
    """Low rank plus noise, magnitude about ``scale``: what fine-tuning updates look like."""
    generator = torch.Generator().manual_seed(seed)
    taus = []
    for _ in range(count):
        low_rank = torch.randn(out_features, rank, generator=generator) @ torch.randn(
            rank, in_features, generator=generator
        )
        noise = torch.randn(out_features, in_features, generator=generator)
        taus.append(scale * (low_rank / rank**0.5 + 0.3 * noise))
    return taus
