"""Pearson correlations between two models' unit activations, from forward hooks.

One pass over the calibration tokens; per hooked vector of n units, float64 sums,
sums of squares and the n x n cross products: memory independent of the token count.
"""

from contextlib import contextmanager
from typing import Dict, Iterable, List, Tuple

import torch


class CrossMoments:
    """Running first and second moments of paired vectors (x from one model, y from another)."""

    def __init__(self, size: int, device):
        kwargs = dict(dtype=torch.float64, device=device)
        self.count = 0
        self.sum_x, self.sum_y = torch.zeros(size, **kwargs), torch.zeros(size, **kwargs)
        self.square_x, self.square_y = torch.zeros(size, **kwargs), torch.zeros(size, **kwargs)
        self.cross = torch.zeros(size, size, **kwargs)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x, y: (tokens, size), the same tokens in the same order."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.square_x += (x * x).sum(0)
        self.square_y += (y * y).sum(0)
        self.cross += x.T @ y

    def correlation(self) -> torch.Tensor:
        """(size, size) float64 on the CPU: [i, j] = corr(x_i, y_j); 0 where a unit is constant."""
        n = self.count
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        covariance = self.cross / n - torch.outer(mean_x, mean_y)
        std_x = (self.square_x / n - mean_x**2).clamp_min(0).sqrt()
        std_y = (self.square_y / n - mean_y**2).clamp_min(0).sqrt()
        scale = torch.outer(std_x, std_y)
        # Relative to the largest scale: a unit whose variance is rounding noise is constant.
        constant = scale <= 1e-12 * scale.max().clamp_min(1e-300)
        return torch.where(constant, 0.0, covariance / torch.where(constant, 1.0, scale)).clamp(-1, 1).cpu()


@contextmanager
def _recording(model: torch.nn.Module, sites: Dict[str, List[Tuple[str, str]]], into: Dict[str, List[torch.Tensor]]):
    modules = dict(model.named_modules())
    handles = []

    def hook(statistic, where):
        def record(module, args, output):
            value = args[0] if where == "input" else output
            value = value[0] if isinstance(value, tuple) else value
            into[statistic].append(value.detach().reshape(-1, value.shape[-1]))
        return record

    for statistic, places in sites.items():
        for module_name, where in places:
            if module_name not in modules:
                raise KeyError(f"module {module_name!r} not found for activation statistic {statistic!r}")
            handles.append(modules[module_name].register_forward_hook(hook(statistic, where)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_correlations(
    reference: torch.nn.Module, models: List[torch.nn.Module], sites: Dict[str, List[Tuple[str, str]]],
    documents: Iterable[torch.Tensor], device,
) -> List[Dict[str, torch.Tensor]]:
    """For each model, {statistic: corr(reference unit i, model unit j)} over every token
    of ``documents`` (1-D token id tensors, run one at a time: no padding)."""
    moments = [{} for _ in models]
    with torch.no_grad():
        for document in documents:
            ids = document.to(device)[None]
            recorded = [{name: [] for name in sites} for _ in range(len(models) + 1)]
            for model, into in zip([reference, *models], recorded):
                with _recording(model, sites, into):
                    model(input_ids=ids)
            for number, into in enumerate(recorded[1:]):
                for name in sites:
                    x, y = torch.cat(recorded[0][name]), torch.cat(into[name])
                    if name not in moments[number]:
                        moments[number][name] = CrossMoments(x.shape[1], device)
                    moments[number][name].add(x, y)
    return [{name: m.correlation() for name, m in per_model.items()} for per_model in moments]
