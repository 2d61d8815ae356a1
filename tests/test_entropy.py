"""The entropy gradient of the gradient GN modes: closed form on plain MLPs, autograd otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from registry import build_architecture
from serving.bound import BoundModule
from serving.entropy import (autograd_gradients, chain_forward, chain_gradients, linear_chain, mean_entropy,
                             mean_entropy_gradient)

MLP = {"arch": "mlp", "sizes": [12, 9, 7, 5]}


def test_plain_mlps_are_recognised_and_other_networks_are_not():
    assert linear_chain(build_architecture(MLP)) == ["fc0.weight", "fc1.weight", "fc2.weight"]
    assert linear_chain(build_architecture({"arch": "lenet300-100"})) == ["fc0.weight", "fc1.weight", "fc2.weight"]
    assert linear_chain(build_architecture({"arch": "cnn", "input_shape": [1, 8, 8], "width": 4})) is None
    assert linear_chain(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=True))) is None
    assert linear_chain(nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False))) is None
    assert linear_chain(nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU())) is None


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("spec", [MLP, {"arch": "mlp", "sizes": [12, 5]}, {"arch": "lenet300-100"}], ids=["mlp", "one layer", "lenet"])
def test_a_plain_mlp_written_out_is_bit_identical_to_the_module(spec, rows):
    """What Snapshot.logits runs for plain MLPs instead of the module: the same bits."""
    module = build_architecture(spec)
    weights = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in module.named_parameters()}
    x = torch.randn(rows, module[0].in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(chain_forward([weights[n] for n in linear_chain(module)], x), BoundModule(module)(weights, x))


@pytest.mark.parametrize("classes", [5, 3, 1])
def test_entropy_gradient_in_closed_form_equals_autograd(classes):
    logits = torch.randn(6, classes, generator=torch.Generator().manual_seed(classes), requires_grad=True)
    (expected,) = torch.autograd.grad(mean_entropy(logits), logits)
    assert torch.allclose(mean_entropy_gradient(logits.detach()), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wanted", [[0, 1, 2], [0], [1, 2]], ids=["all layers", "input layer", "deeper layers"])
@pytest.mark.parametrize("classes", [5, 3])
def test_mlp_weight_gradients_in_closed_form_equal_autograd(wanted, classes):
    module = build_architecture(MLP)
    generator = torch.Generator().manual_seed(0)
    params = {n: torch.randn(p.shape, generator=generator) for n, p in module.named_parameters()}
    x = torch.randn(8, 12, generator=generator)
    names = [linear_chain(module)[i] for i in wanted]
    expected = autograd_gradients(BoundModule(module), params, x, classes, names)
    gradients = chain_gradients([params[n] for n in linear_chain(module)], x, classes, wanted)
    assert sorted(gradients) == wanted
    for i, name in zip(wanted, names):
        assert torch.allclose(gradients[i], expected[name], rtol=1e-4, atol=1e-7), name
