"""Architectures: every registered spec builds, takes flat input, and keeps the masking conventions
(bias-free, non-affine BatchNorm whose buffers functional_call can be given)."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from registry import build_architecture, forward, maskable_parameters
from registry.architectures import architecture_names, batchnorm_buffers, input_features, resolved_spec
from registry.errors import InvalidArtifact, UnknownName

# Small variants of every architecture (fast), with the output width they must have.
SPECS = [
    ({"arch": "mlp", "sizes": [64, 16, 10]}, 10),
    ({"arch": "lenet300-100"}, 10),
    ({"arch": "lenet300-100", "in_features": 64, "num_classes": 2}, 2),
    ({"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "width": 4}, 10),
    ({"arch": "cnn", "input_shape": [3, 32, 32], "num_classes": 5, "width": 4, "bn": "nonaffine"}, 5),
    ({"arch": "vgg", "input_shape": [1, 8, 8], "num_classes": 3, "layers": [4, "M", 8, 8, "M"]}, 3),
    ({"arch": "vgg", "input_shape": [3, 16, 12], "num_classes": 4, "layers": [4, "M", 8], "bn": "nonaffine"}, 4),
    ({"arch": "resnet18", "input_shape": [3, 32, 32], "num_classes": 5, "width": 4}, 5),
    ({"arch": "resnet18", "input_shape": [1, 8, 8], "num_classes": 10, "width": 2, "bn": "none"}, 10),
]
IDS = [json.dumps({k: v for k, v in spec.items()}) for spec, _ in SPECS]


def test_every_architecture_is_registered():
    assert {"mlp", "lenet300-100", "cnn", "vgg", "resnet18"} <= set(architecture_names())


@pytest.mark.parametrize(("spec", "classes"), SPECS, ids=IDS)
def test_builds_and_maps_flat_input_to_classes(spec, classes):
    module = build_architecture(spec).eval()
    features = input_features(spec)
    assert module(torch.rand(3, features)).shape == (3, classes)
    # bias-free everywhere: every parameter is a weight a mask applies to
    assert maskable_parameters(module) == [name for name, _ in module.named_parameters()]
    assert [p.shape[0] for p in module.parameters()][-1] == classes


@pytest.mark.parametrize(("spec", "classes"), SPECS, ids=IDS)
def test_functional_call_with_batchnorm_buffers_in_eval_mode(spec, classes):
    module = build_architecture(spec).eval()
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            assert not layer.affine and layer.track_running_stats
    buffers = batchnorm_buffers(module)
    assert set(buffers) == {name for name, _ in module.named_buffers()}
    generator = torch.Generator().manual_seed(0)
    params = {name: p * (torch.rand(p.shape, generator=generator) < 0.5) for name, p in module.named_parameters()}
    x = torch.rand(4, input_features(spec), generator=generator)
    with torch.no_grad():
        served = forward(module, {**params, **buffers}, x)
        for name, value in params.items():
            module.get_parameter(name).copy_(value)
        assert torch.equal(served, module(x))
    if buffers:
        with pytest.raises(RuntimeError, match="Missing key"):
            forward(module, params, x)


def test_batchnorm_buffers_are_defaults_not_the_modules_own():
    module = build_architecture({"arch": "cnn", "input_shape": [1, 8, 8], "width": 4, "bn": "nonaffine"})
    module.train()(torch.rand(8, 64) * 5)  # updates the running statistics
    buffers = batchnorm_buffers(module)
    assert set(buffers) == {f"bn{i}.{b}" for i in (0, 2) for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert torch.equal(buffers["bn0.running_mean"], torch.zeros(4))
    assert torch.equal(buffers["bn2.running_var"], torch.ones(8))
    assert buffers["bn0.num_batches_tracked"].dtype == torch.int64 and int(buffers["bn0.num_batches_tracked"]) == 0
    assert int(module.bn0.num_batches_tracked) == 1 and not torch.equal(module.bn0.running_mean, torch.zeros(4))
    assert batchnorm_buffers(build_architecture({"arch": "lenet300-100"})) == {}


def test_per_task_running_statistics_change_the_output():
    torch.manual_seed(0)  # a width-2 ResNet outputs all zeros for about one draw in 50: not this one
    module = build_architecture({"arch": "resnet18", "input_shape": [1, 8, 8], "num_classes": 3, "width": 2}).eval()
    params, buffers = dict(module.named_parameters()), batchnorm_buffers(module)
    x = torch.rand(2, 64)
    shifted = {**buffers, "bn1.running_mean": torch.full((2,), 0.5)}
    with torch.no_grad():
        assert not torch.equal(forward(module, {**params, **buffers}, x), forward(module, {**params, **shifted}, x))


def test_default_specs_have_the_documented_sizes():
    def count(spec):
        return sum(p.numel() for p in build_architecture(spec).parameters())

    assert count({"arch": "lenet300-100"}) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert count({"arch": "cnn"}) == 3 * 32 * 9 + 32 * 64 * 9 + 64 * 8 * 8 * 10
    assert count({"arch": "resnet18"}) == 1_091_740  # width 20 on CIFAR: SupSup's / ExSSNeT's network


@pytest.mark.parametrize("width", [2, 5, 20])
def test_resnet18_width_scales_the_parameter_count(width):
    # 2724 w^2 from the 3x3 / 1x1 convs of the four stages, 9 C w from the stem, 8 w K from the head
    module = build_architecture({"arch": "resnet18", "input_shape": [3, 32, 32], "num_classes": 7, "width": width})
    assert sum(p.numel() for p in module.parameters()) == 2724 * width**2 + (9 * 3 + 8 * 7) * width
    assert [module.get_submodule(f"layer{i}")[1].conv2.out_channels for i in range(1, 5)] == [width, 2 * width, 4 * width, 8 * width]
    assert module.get_parameter("layer2.0.downsample.0.weight").shape == (2 * width, width, 1, 1)
    assert module.get_parameter("fc.weight").shape == (7, 8 * width)


def test_conv_nets_start_by_unflattening_the_flat_input():
    spec = {"arch": "cnn", "input_shape": [3, 6, 4], "width": 2}
    module = build_architecture(spec)
    assert isinstance(module[0], nn.Unflatten) and module[0].unflattened_size == (3, 6, 4)
    assert input_features(spec) == 72
    assert input_features({"arch": "resnet18"}) == 3 * 32 * 32
    assert input_features({"arch": "lenet300-100"}) == 784 and input_features({"arch": "mlp", "sizes": [5, 2]}) == 5


def test_masks_attach_to_nested_conv_kernels_with_parametrize():
    module = build_architecture({"arch": "resnet18", "input_shape": [1, 8, 8], "num_classes": 2, "width": 2})
    mask = (torch.rand(module.layer3[0].conv1.weight.shape) < 0.5).float()

    class Mask(nn.Module):
        def forward(self, weight):
            return weight * mask

    parametrize.register_parametrization(module.layer3[0].conv1, "weight", Mask())
    assert torch.equal(module.layer3[0].conv1.weight, module.layer3[0].conv1.parametrizations.weight.original * mask)
    module(torch.rand(2, 64)).sum().backward()


def test_resolved_spec_fills_the_defaults_and_is_json():
    spec = resolved_spec({"arch": "vgg", "layers": (4, "M"), "input_shape": [1, 4, 4]})
    assert spec == {"arch": "vgg", "input_shape": [1, 4, 4], "num_classes": 10, "layers": [4, "M"], "bn": "none"}
    assert json.loads(json.dumps(spec)) == spec
    assert resolved_spec({"arch": "resnet18"}) == {"arch": "resnet18", "input_shape": [3, 32, 32], "num_classes": 10,
                                                   "width": 20, "bn": "nonaffine"}


@pytest.mark.parametrize(("spec", "message"), [
    ({"arch": "cnn", "depth": 3}, r"architecture 'cnn' takes \['bn', 'input_shape', 'num_classes', 'width'\], not \['depth'\]"),
    ({"arch": "resnet18", "norm": "bn"}, r"architecture 'resnet18' takes .* not \['norm'\]"),
    ({"arch": "lenet300-100", "sizes": [1, 2]}, r"not \['sizes'\]"),
    ({"arch": "resnet18", "bn": "affine"}, r"resnet18 bn must be one of \['none', 'nonaffine'\], got 'affine'"),
    ({"arch": "cnn", "input_shape": [32, 32]}, r"cnn input_shape must be \[channels, height, width\], got \[32, 32\]"),
    ({"arch": "cnn", "input_shape": [1, 2, 2]}, r"cnn: max-pool 3 gets a 1x1 feature map"),
    ({"arch": "resnet18", "width": 0}, r"resnet18 width must be a positive integer, got 0"),
    ({"arch": "vgg", "layers": [8, "X"]}, r"vgg layers must be positive conv widths or 'M' \(max-pool\), got 'X' at 1"),
    ({"arch": "vgg", "layers": ["M"]}, r"vgg layers must list at least one conv width"),
    ({"arch": "lenet300-100", "num_classes": True}, r"lenet300-100 num_classes must be a positive integer"),
    ({"arch": "mlp", "sizes": [64, True, 10]}, r"mlp sizes must be at least two positive integers, got \[64, True, 10\]"),
    ({"arch": "mlp", "sizes": [64, 10**11, 10]}, r"architecture .* is too large to build in this machine's memory: "
                                                 r".*can't allocate memory"),  # tracebacks, both
])
def test_bad_specs_are_refused_with_a_message(spec, message):
    with pytest.raises(InvalidArtifact, match=message):
        build_architecture(spec)


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(UnknownName, match=r"Unknown architecture 'vit' \(known: cnn, lenet300-100, mlp, resnet18, vgg"):
        build_architecture({"arch": "vit"})
    with pytest.raises(InvalidArtifact, match="missing a required argument: 'sizes'"):
        input_features({"arch": "mlp"})


def test_input_features_matches_the_module_for_every_default_spec():
    for name in ("lenet300-100", "cnn", "resnet18"):
        module = build_architecture({"arch": name}).eval()
        assert module(torch.rand(1, input_features({"arch": name}))).shape == (1, 10)
    assert math.prod((3, 32, 32)) == input_features({"arch": "vgg"})
