import copy
import itertools

import pytest
import torch

from mergekit_wudi.align.matching import assign, assign_heads, assign_in_blocks, match
from mergekit_wudi.align.permute import permute_model
from mergekit_wudi.align.statistics import activation_correlations
from mergekit_wudi.align.structure import read_structure
from tests.align_models import FAMILIES, VOCAB, random_permutation, shapes, tiny_model


def _brute_force(similarity):
    n = similarity.shape[0]
    return max(itertools.permutations(range(n)), key=lambda p: float(similarity[range(n), list(p)].sum()))


def test_assign_is_the_best_permutation():
    similarity = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert assign(similarity).tolist() == list(_brute_force(similarity))


def test_assign_in_blocks_keeps_units_in_their_block():
    similarity = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    found = assign_in_blocks(similarity, 3)
    assert found[:3].tolist() == list(_brute_force(similarity[:3, :3]))
    assert (found[3:] - 3).tolist() == list(_brute_force(similarity[3:, 3:]))


def test_assign_heads_pairs_heads_by_their_mean_matched_dims():
    generator = torch.Generator().manual_seed(2)
    heads, size = 3, 3
    similarity = torch.randn(heads * size, heads * size, dtype=torch.float64, generator=generator)
    found = assign_heads(similarity, size)
    # Reference: best dims per head pair by brute force, then best head pairing by brute force.
    blocks = {(a, b): similarity[a * size:(a + 1) * size, b * size:(b + 1) * size]
              for a in range(heads) for b in range(heads)}
    inner = {k: _brute_force(v) for k, v in blocks.items()}
    value = torch.tensor([[float(blocks[a, b][range(size), list(inner[a, b])].mean()) for b in range(heads)]
                          for a in range(heads)])
    pairs = _brute_force(value)
    expected = [b * size + t for a, b in enumerate(pairs) for t in inner[a, b]]
    assert found.tolist() == expected


def _planted(family):
    """(model, copy of it with random permutations of every group, structure, correlations)."""
    model = tiny_model(family)
    structure = read_structure(model.config, shapes(model))
    generator = torch.Generator().manual_seed(3)
    permuted = copy.deepcopy(model)
    permute_model(structure, permuted, [random_permutation(g, generator) for g in structure.groups])
    documents = [torch.randint(0, VOCAB, (16,), generator=generator) for _ in range(8)]
    correlations = activation_correlations(model, [permuted], structure.statistics, documents, "cpu")[0]
    return model, permuted, structure, correlations


# Every family at MuDSC's alpha; the two ends (activation only, weight only) on one
# RoPE family and one fused-qkv family.
@pytest.mark.parametrize("family, alpha", [(f, 0.5) for f in FAMILIES]
                         + [(f, a) for f in ("llama", "gpt2") for a in (0.0, 1.0, "weights only")])
def test_planted_permutation_is_recovered_exactly(family, alpha):
    model, permuted, structure, correlations = _planted(family)
    if alpha == "weights only":  # plain weight matching from the identity, no activations
        alpha, correlations = 1.0, None
    assert any(not torch.equal(permuted.state_dict()[n], t) for n, t in model.state_dict().items())
    permutations, _ = match(structure, model.state_dict(), permuted.state_dict(), correlations, alpha)
    permute_model(structure, permuted, permutations)
    for name, tensor in model.state_dict().items():
        assert torch.equal(permuted.state_dict()[name], tensor), name


def test_a_model_aligned_to_itself_is_the_identity():
    model = tiny_model("llama")
    structure = read_structure(model.config, shapes(model))
    documents = [torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(4))]
    correlations = activation_correlations(model, [model], structure.statistics, documents, "cpu")[0]
    permutations, score = match(structure, model.state_dict(), model.state_dict(), correlations, 0.5)
    for permutation, identity in zip(permutations, structure.identity()):
        assert torch.equal(permutation, identity)


def test_alpha_out_of_range_is_refused():
    model = tiny_model("gpt2")
    structure = read_structure(model.config, shapes(model))
    with pytest.raises(ValueError, match="alpha must be in"):
        match(structure, model.state_dict(), model.state_dict(), None, 1.5)
    with pytest.raises(ValueError, match="alpha 0.5 needs activation correlations"):
        match(structure, model.state_dict(), model.state_dict(), None, 0.5)
