"""Independent references the tests compare against.

``authors_wudi`` is the authors' formulation (their ``lamassu.py``): N batched
``[out, out]`` products, autograd, ``torch.optim.Adam``. The spectral references
(``gradient_flow``, ``spectral_reference`` and the rank rules) write the OptMerge
formulas out literally, in float64. None shares code with ``mergekit_wudi.solvers``;
each is deliberately the slow, obvious way.
"""

import math
import statistics
from typing import List, Sequence, Tuple

import torch

CLAMP = 1e-8  # the authors' floor on C's eigenvalues


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
    return sum(eq21_term(merged, tau) for tau in task_vectors if tau.any())


def eq21_term(merged: torch.Tensor, tau: torch.Tensor) -> float:
    """One expert's term of Eq. 21, ||(x - tau) tau^T||_F^2 / ||tau||_F^2, in float64."""
    merged, tau = merged.double(), tau.double()
    return float(((merged - tau) @ tau.T).square().sum() / tau.square().sum())


def normal_equations_wudi_cfs(task_vectors: Sequence[torch.Tensor], omega: float) -> torch.Tensor:
    """Paper Eq. 20 written literally, in float64, with an explicit inverse."""
    taus = [tau.double() for tau in task_vectors]
    eye = torch.eye(taus[0].shape[1], dtype=torch.float64)
    left = sum(tau @ (tau.T @ tau + omega * eye) / tau.pow(2).sum() for tau in taus)
    right = sum((tau.T @ tau + omega * eye) / tau.pow(2).sum() for tau in taus)
    return left @ torch.linalg.inv(right)


def exact_minimiser(task_vectors) -> torch.Tensor:
    """argmin of Eq. 21 as one least-squares problem, float64, minimum-norm.

    sum_i ||X tau_i^T - tau_i tau_i^T||^2 / ||tau_i||^2 = ||X A - B||^2 with
    A = [tau_i^T / ||tau_i||]_i and B = [tau_i tau_i^T / ||tau_i||]_i side by side.
    """
    taus = [tau.double() for tau in task_vectors]
    inputs = torch.cat([tau.T / tau.norm() for tau in taus], dim=1)
    targets = torch.cat([tau @ tau.T / tau.norm() for tau in taus], dim=1)
    return torch.linalg.lstsq(inputs.T, targets.T, driver="gelsd").solution.T


def literal_gram_and_target(task_vectors) -> Tuple[torch.Tensor, torch.Tensor]:
    """C = sum_i tau_i^T tau_i / ||tau_i||^2 and D = sum_i tau_i tau_i^T tau_i / ||tau_i||^2."""
    taus = [tau.double() for tau in task_vectors if tau.abs().sum() > 0]
    gram = sum(tau.T @ tau / tau.pow(2).sum() for tau in taus)
    target = sum(tau @ tau.T @ tau / tau.pow(2).sum() for tau in taus)
    return gram, target


def half_eq21_gradient_descent(task_vectors, step: float, steps: int) -> torch.Tensor:
    """Plain gradient descent on half of Eq. 21 from the sum, float64.

    d/dX (1/2) ||(X - tau_i) tau_i^T||^2 / ||tau_i||^2 = (X - tau_i) tau_i^T tau_i / ||tau_i||^2.
    """
    taus = [tau.double() for tau in task_vectors]
    grams = [tau.T @ tau / tau.pow(2).sum() for tau in taus]
    merged = sum(taus)
    for _ in range(steps):
        merged = merged - step * sum((merged - tau) @ gram for tau, gram in zip(taus, grams))
    return merged


def gradient_flow(task_vectors, flow_time: float) -> torch.Tensor:
    """The flow d X/dt = -(X C - D) from the sum at time t, float64, with no eigh.

    X(t) = X(0) exp(-C t) + D int_0^t exp(-C s) ds, and both matrices are blocks of
    exp(M t), M = [[-C, I], [0, 0]]: its top-left block is exp(-C t), its top-right
    the integral.
    """
    gram, target = literal_gram_and_target(task_vectors)
    size = gram.shape[0]
    block = torch.zeros(2 * size, 2 * size, dtype=torch.float64)
    block[:size, :size] = -gram
    block[:size, size:] = torch.eye(size, dtype=torch.float64)
    exponential = torch.linalg.matrix_exp(block * flow_time)
    start = sum(tau.double() for tau in task_vectors)
    return start @ exponential[:size, :size] + target @ exponential[:size, size:]


def spectral_reference(task_vectors, flow_time: float, kept: int) -> torch.Tensor:
    """OptMerge's formula written out: float64 eigh of the in x in C, eigenvalues
    clamped at 1e-8, filter f = 1 - exp(-lam t) on the ``kept`` largest, 0 elsewhere.

    theta0 - theta0 V diag(f) V^T + D V diag(f / lam) V^T.
    """
    gram, target = literal_gram_and_target(task_vectors)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = torch.clamp(eigenvalues, min=CLAMP)
    flow = torch.ones_like(eigenvalues) if math.isinf(flow_time) else 1 - torch.exp(
        -eigenvalues * flow_time)
    order = torch.argsort(eigenvalues, descending=True)
    flow[order[kept:]] = 0
    start = sum(tau.double() for tau in task_vectors)
    return (start - start @ vectors @ torch.diag(flow) @ vectors.T
            + target @ vectors @ torch.diag(flow / eigenvalues) @ vectors.T)


def clamped_spectrum(task_vectors) -> List[float]:
    """C's eigenvalues (float64 eigh of the literal C), floored at 1e-8, as floats."""
    gram, _ = literal_gram_and_target(task_vectors)
    return [max(value, CLAMP) for value in torch.linalg.eigvalsh(gram).tolist()]


def participation_sqrt_rank(spectrum: Sequence[float]) -> int:
    """ceil((sum_j sqrt(lam_j))^2 / sum_j lam_j)."""
    return math.ceil(sum(math.sqrt(value) for value in spectrum) ** 2 / sum(spectrum))


def gavish_donoho_rank(spectrum: Sequence[float], shape: Tuple[int, int]) -> int:
    """How many sqrt(lam) exceed omega(beta) times their (lower) median, at least 1.

    Gavish and Donoho (IEEE Trans. Inf. Theory 60(8), 2014), unknown noise level:
    omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43, beta = min/max of
    the weight's [out, in].
    """
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    singular = [math.sqrt(value) for value in spectrum]
    threshold = omega * statistics.median_low(singular)
    return max(1, sum(value > threshold for value in singular))


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
