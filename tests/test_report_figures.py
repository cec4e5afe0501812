"""The report's per-tensor figures against direct float64 computations written here."""

import math

import pytest
import torch

from mergekit_wudi.report.figures import (
    Figures,
    figures_working_bytes,
    interference_figures,
    mean_matrix,
    overall,
    summarise,
)
from tests.measure import LiveTensorBytes
from tests.oracle import eq21_term


def structured(out_features: int, in_features: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(out_features, rank, generator=generator) @ torch.randn(
        rank, in_features, generator=generator)
    return (low_rank + 0.3 * torch.randn(out_features, in_features, generator=generator)) * 1e-2



def participation_ratio(eigenvalues: torch.Tensor) -> float:
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


def direct_effective_rank(task_vectors) -> float:
    gram = sum(t.double().T @ t.double() / (t.double() ** 2).sum() for t in task_vectors)
    return participation_ratio(torch.linalg.eigvalsh(gram))


# Gram form (out >= in/2), stacked form (in > 2 out), and out >> in.
SHAPES = [(24, 16), (6, 40), (40, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_figure_equals_the_direct_computation(shape):
    task_vectors = [structured(*shape, rank=2 + i, seed=i) for i in range(3)]
    solution = structured(*shape, rank=3, seed=9)
    lam = 0.6
    summary = summarise(interference_figures(task_vectors, solution, lam))

    total = sum(t.double() for t in task_vectors)
    points = {"zero": torch.zeros_like(total), "sum": total, "average": total / 3,
              "solution": solution.double(), "merged": lam * solution.double()}
    for point, merged in points.items():
        terms = [eq21_term(merged, tau) for tau in task_vectors]
        assert summary.expert_loss[point] == pytest.approx(terms, rel=1e-10)
        assert summary.loss[point] == pytest.approx(sum(terms), rel=1e-10)
        assert summary.expert_share[point] == pytest.approx([t / sum(terms) for t in terms], rel=1e-10)
        zero = sum(eq21_term(points["zero"], tau) for tau in task_vectors)
        assert summary.relative[point] == pytest.approx(sum(terms) / zero, rel=1e-10)
    assert summary.removed == pytest.approx(1 - summary.loss["solution"] / summary.loss["sum"])
    norms = [float(torch.linalg.vector_norm(t.double())) for t in task_vectors]
    assert summary.norms == pytest.approx(norms, rel=1e-12)
    for i, a in enumerate(task_vectors):
        for j, b in enumerate(task_vectors):
            cosine = float((a.double() * b.double()).sum()) / (norms[i] * norms[j])
            assert summary.cosine[i][j] == pytest.approx(cosine, rel=1e-10, abs=1e-12)
    assert summary.effective_rank == pytest.approx(direct_effective_rank(task_vectors), rel=1e-9)
    for tau, rank in zip(task_vectors, summary.expert_effective_rank):
        singular = torch.linalg.svdvals(tau.double())
        assert rank == pytest.approx(participation_ratio(singular**2), rel=1e-9)


def test_without_a_solution_only_the_unsolved_points():
    summary = summarise(interference_figures([structured(8, 8, 2, 0), structured(8, 8, 2, 1)]))
    assert set(summary.loss) == {"zero", "sum", "average"}
    assert summary.removed is None


def test_identical_experts_cosine_one_and_no_interference_at_their_common_update():
    tau = structured(12, 20, 3, 0)
    summary = summarise(interference_figures([tau, tau.clone(), tau.clone()], solution=tau))
    assert all(value == pytest.approx(1.0, abs=1e-12) for line in summary.cosine for value in line)
    # Each term is evaluated on its residual, so zero residual is exactly zero loss.
    assert summary.loss["solution"] == 0.0 and summary.loss["average"] == pytest.approx(0.0, abs=1e-20)
    # The sum is 3 tau: each expert sees an error 2 tau on its own subspace, (3-1)^2 its energy.
    assert summary.relative["sum"] == pytest.approx(4.0, rel=1e-12)
    assert summary.removed == 1.0
    # C = 3 G: the same participation ratio as one expert's.
    assert summary.effective_rank == pytest.approx(summary.expert_effective_rank[0], rel=1e-12)


def test_an_all_zero_task_vector_contributes_nothing_and_gets_no_share():
    taus = [structured(10, 10, 2, 0), torch.zeros(10, 10), structured(10, 10, 2, 1)]
    summary = summarise(interference_figures(taus, solution=taus[0] + taus[2]))
    assert summary.contributing == [True, False, True]
    assert summary.expert_loss["sum"][1] == 0.0
    assert summary.expert_share["sum"][1] is None and summary.expert_effective_rank[1] is None
    assert summary.cosine[1] == [None, None, None]
    alone = summarise(interference_figures([taus[0], taus[2]], solution=taus[0] + taus[2]))
    assert summary.loss == pytest.approx(alone.loss, rel=1e-12)
    assert summary.effective_rank == pytest.approx(alone.effective_rank, rel=1e-12)


def test_placed_figures_put_each_expert_in_its_recipe_position():
    a, b = structured(6, 6, 2, 0), structured(6, 6, 2, 1)
    placed = summarise(interference_figures([a, b], solution=a).placed([2, 0], experts=3))
    direct = summarise(interference_figures([b, torch.zeros(6, 6), a], solution=a))
    assert placed.norms == pytest.approx(direct.norms, rel=1e-12)
    for point, losses in direct.expert_loss.items():
        assert placed.expert_loss[point] == pytest.approx(losses, rel=1e-12)
    assert placed.cosine[0][2] == pytest.approx(direct.cosine[0][2], rel=1e-12)
    assert placed.contributing == [True, False, True]


def test_slices_add_up_to_the_block_diagonal_problem():
    """A stacked tensor's figures: the sum of its slices', C block-diagonal."""
    slices = [[structured(8, 6, 2, 10 * s + i) for i in range(2)] for s in range(3)]
    solutions = [sum(pair) * 0.7 for pair in slices]
    added = None
    for pair, solution in zip(slices, solutions):
        figures = interference_figures(pair, solution)
        added = figures if added is None else added + figures
    assert isinstance(added, Figures) and added.problems == 3
    summary = summarise(added)
    losses = [sum(eq21_term(x, tau) for tau in pair) for pair, x in zip(slices, solutions)]
    assert summary.loss["solution"] == pytest.approx(sum(losses), rel=1e-10)
    eigenvalues = torch.cat([
        torch.linalg.eigvalsh(sum(t.double().T @ t.double() / (t.double() ** 2).sum() for t in pair))
        for pair in slices
    ])
    assert summary.effective_rank == pytest.approx(participation_ratio(eigenvalues), rel=1e-9)
    whole = [torch.cat([pair[i] for pair in slices]) for i in range(2)]
    cosine = float((whole[0].double() * whole[1].double()).sum() / (
        torch.linalg.vector_norm(whole[0].double()) * torch.linalg.vector_norm(whole[1].double())))
    assert summary.cosine[0][1] == pytest.approx(cosine, rel=1e-10)


def test_overall_adds_losses_and_averages_defined_cosines():
    first = summarise(interference_figures([structured(6, 6, 2, 0), structured(6, 6, 2, 1)],
                                           solution=structured(6, 6, 2, 2)))
    second = summarise(interference_figures([structured(6, 6, 2, 3), torch.zeros(6, 6)],
                                            solution=structured(6, 6, 2, 4)))
    combined = overall([first, second])
    assert combined["loss"]["sum"] == pytest.approx(first.loss["sum"] + second.loss["sum"])
    assert combined["removed"] == pytest.approx(
        1 - (first.loss["solution"] + second.loss["solution"]) / (first.loss["sum"] + second.loss["sum"]))
    share = (first.expert_loss["sum"][0] + second.expert_loss["sum"][0]) / combined["loss"]["sum"]
    assert combined["expert_share"]["sum"][0] == pytest.approx(share)
    # Expert 2 is absent from the second tensor: its cosines come from the first alone.
    assert combined["cosine"][0][1] == pytest.approx(first.cosine[0][1])
    assert combined["cosine"][0][0] == pytest.approx(1.0)


def test_mean_matrix_skips_undefined_entries():
    mean = mean_matrix([[[1.0, None], [None, 2.0]], [[3.0, None], [None, None]]])
    assert mean == [[2.0, None], [None, 2.0]]
    assert math.isclose(mean_matrix([[[0.5]], [[None]], [[1.5]]])[0][0], 1.0)


# Gram form, and stacked ([16, 512] with 3 or 6 task vectors: in > 2 N out).
@pytest.mark.parametrize("shape, count", [((512, 128), 3), ((128, 128), 3), ((16, 512), 3), ((16, 512), 6)])
def test_figures_working_memory_is_within_its_estimate(shape, count):
    taus = [structured(*shape, 2, seed).double() for seed in range(count)]
    with LiveTensorBytes() as memory:
        interference_figures(taus, sum(taus), 0.5)
    bound = figures_working_bytes(*shape, count)
    # An upper bound, not a loose one (the 1 MiB of small ones aside): the
    # report's device fit moves a problem by it.
    assert memory.peak <= bound <= 2 * memory.peak + 2**20
