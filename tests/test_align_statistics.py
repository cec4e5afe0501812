import numpy as np
import torch

from mergekit_wudi.align.statistics import CrossMoments, activation_correlations
from tests.align_models import VOCAB, tiny_model


def test_correlation_matches_numpy_over_batches():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=generator) * 3 + 7
    y = x[:, [2, 0, 4, 1, 3]] + 0.5 * torch.randn(300, 5, generator=generator)
    moments = CrossMoments(5, "cpu")
    for start in range(0, 300, 70):  # uneven batches
        moments.add(x[start:start + 70], y[start:start + 70])
    expected = np.corrcoef(x.numpy().T.astype(np.float64), y.numpy().T.astype(np.float64))[:5, 5:]
    np.testing.assert_allclose(moments.correlation().numpy(), expected, atol=1e-10)


def test_a_constant_unit_has_zero_correlation_not_nan():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 1] = 4.0
    moments = CrossMoments(3, "cpu")
    moments.add(x, y)
    correlation = moments.correlation()
    assert torch.isfinite(correlation).all()
    assert correlation[:, 1].abs().max() == 0
    assert torch.isclose(correlation[0, 0], torch.tensor(1.0, dtype=torch.float64))


def test_hooks_see_the_mlp_input_and_are_removed():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(2))
    sites = {"mlp": [("model.layers.0.mlp.down_proj", "input")]}
    correlation = activation_correlations(model, [model], sites, [ids], "cpu")[0]["mlp"]
    # The same model against itself: every unit correlates 1 with itself.
    torch.testing.assert_close(correlation.diagonal(), torch.ones(48, dtype=torch.float64))
    assert not model.model.layers[0].mlp.down_proj._forward_hooks
