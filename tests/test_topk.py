"""The fast top-k mask (bucketed selection) equals torch.topk's mask exactly, ties included."""

import math

import pytest
import torch

from trainer.supsup import _TopK


def topk_reference(m: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, round(density * m.numel()))
    mask = torch.zeros_like(m)
    mask.view(-1)[m.flatten().topk(k, sorted=False).indices] = 1.0
    return mask


@pytest.mark.parametrize("density", [1e-6, 0.05, 0.1, 0.5, 0.999, 1.0])
def test_topk_mask_equals_torch_topk(density, monkeypatch):
    monkeypatch.setattr(_TopK, "SELECTION_MIN_NUMEL", 1)  # the selection path at every size
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in [(512, 512), (300, 784), (10, 512), (64, 3, 3, 3)]:
        s = torch.empty(shape)
        torch.nn.init.kaiming_uniform_(s, a=math.sqrt(5), generator=g)
        cases += [s.abs(), s.half().float().abs(), torch.randint(0, 7, shape, generator=g).float(), torch.zeros(shape)]
    x = torch.rand(512, 512, generator=g)
    x.view(-1)[::997] = float("nan")
    cases.append(x)
    for m in cases:
        assert torch.equal(_TopK.apply(m, density), topk_reference(m, density))


def test_a_tie_at_the_threshold_falls_back_to_topk():
    x = torch.rand(256, 256, generator=torch.Generator().manual_seed(1))
    k = 6554
    order = x.flatten().argsort(descending=True)
    x.view(-1)[order[k]] = x.view(-1)[order[k - 1]]
    assert _TopK._by_selection(x, k) is None
