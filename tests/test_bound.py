"""serving's BoundModule: the served forward pass, bit-identical to registry.forward on every
architecture, strict about the tensors it is given, and holding no task's weights afterwards."""

import pytest
import torch

from registry import build_architecture, forward
from registry.architectures import batchnorm_buffers, input_features
from registry.errors import InvalidArtifact
from serving.bound import BoundModule

from .test_architectures import IDS, SPECS


def task_tensors(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Masked weights and shifted BatchNorm statistics, as a task's effective parameters look."""
    generator = torch.Generator().manual_seed(seed)
    params = {n: p * (torch.rand(p.shape, generator=generator) < 0.5) for n, p in module.named_parameters()}
    buffers = {n: b + torch.rand(b.shape, generator=generator) if b.is_floating_point() else b
               for n, b in batchnorm_buffers(module).items()}
    return {**params, **buffers}


@pytest.mark.parametrize(("spec", "classes"), SPECS, ids=IDS)
def test_outputs_equal_registry_forward_bit_for_bit(spec, classes):
    template = build_architecture(spec).eval()
    bound = BoundModule(template)
    x = torch.rand(3, input_features(spec), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for seed in (0, 1, 0):  # alternate tasks on one copy: nothing of the previous task stays
            tensors = task_tensors(template, seed)
            assert torch.equal(bound(tensors, x), forward(template, tensors, x))
    held = [t for sub in bound.module.modules() for t in (*sub._parameters.values(), *sub._buffers.values())
            if t is not None and t.is_floating_point()]
    assert held == []  # the copy keeps no task's weights (nor its own initial ones) between calls


def test_gradients_flow_through_the_bound_tensors():
    template = build_architecture({"arch": "mlp", "sizes": [4, 3, 2]})
    weights = {n: p.detach().clone().requires_grad_() for n, p in template.named_parameters()}
    BoundModule(template)(weights, torch.ones(2, 4)).sum().backward()
    assert all(w.grad is not None for w in weights.values())


def test_missing_or_unexpected_tensors_are_an_error_naming_them():
    template = build_architecture({"arch": "mlp", "sizes": [4, 3, 2]})
    params = dict(template.named_parameters())
    with pytest.raises(InvalidArtifact, match=r"missing \['fc1.weight'\], unexpected \['extra'\]"):
        BoundModule(template)({"fc0.weight": params["fc0.weight"], "extra": torch.ones(1)}, torch.ones(1, 4))
