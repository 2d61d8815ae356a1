"""Architecture specs: small JSON-able dicts from which a plain torch.nn.Module is built.

The modules know nothing of continual-learning methods: masks and per-task weights are applied
from outside (parametrize while training, functional_call while serving).

    build_architecture({"arch": "mlp", "sizes": [64, 300, 100, 10]})
    build_architecture({"arch": "resnet18", "input_shape": [3, 32, 32], "num_classes": 5, "width": 20})

Conventions every architecture keeps:

- The input is flat, `[N, features]`, because that is what the inference protocol carries; image
  networks start with `nn.Unflatten(1, input_shape)` and `features = prod(input_shape)`
  (`input_features(spec)`).
- The last layer has `num_classes` outputs (the largest class count of any task; a task with fewer
  classes uses the first ones).
- Layers are bias-free and BatchNorm is non-affine (`bn: "nonaffine"`), so every parameter is a
  weight matrix or kernel: exactly what `maskable_parameters` returns and masks apply to. A
  non-affine BatchNorm has buffers only (running statistics); `batchnorm_buffers(module)` lists
  them with their default values, because `functional_call(..., strict=True)` needs them beside the
  parameters (methods such as SupSup keep per-task running statistics in their artifacts).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import InvalidArtifact, unknown

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_BN_MODES = ("none", "nonaffine")
_CIFAR = (3, 32, 32)


def register_architecture(name: str):
    """Decorator: make a module builder available as `{"arch": name, ...its keyword arguments}`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHITECTURES[name] = builder
        return builder

    return decorate


def _resolve(spec: Mapping[str, Any]) -> tuple[str, Callable[..., nn.Module], dict[str, Any]]:
    """(name, builder, every keyword argument with defaults filled in); unknown names or keys raise."""
    spec = dict(spec)
    name = spec.pop("arch", None)
    if name not in _ARCHITECTURES:
        raise unknown("architecture", str(name), _ARCHITECTURES)
    builder = _ARCHITECTURES[name]
    signature = inspect.signature(builder)
    accepted = set(signature.parameters)
    if extra := set(spec) - accepted:
        raise InvalidArtifact(f"architecture '{name}' takes {sorted(accepted)}, not {sorted(extra)}")
    try:
        bound = signature.bind(**spec)
    except TypeError as error:  # a required key is missing
        raise InvalidArtifact(f"architecture '{name}': {error}") from None
    bound.apply_defaults()
    return name, builder, dict(bound.arguments)


def build_architecture(spec: Mapping[str, Any]) -> nn.Module:
    """Build the module a spec describes; unknown architectures or keys raise with the known ones, and one
    too large for this machine's memory says so (torch's allocator error was a traceback)."""
    _, builder, arguments = _resolve(spec)
    try:
        return builder(**arguments)
    except (RuntimeError, MemoryError) as error:
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        raise InvalidArtifact(f"architecture {dict(spec)} is too large to build in this machine's memory: "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def architecture_names() -> list[str]:
    return sorted(_ARCHITECTURES)


def resolved_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with every default filled in, JSON-able: what to store beside a trained model so
    that a later change of a builder's defaults cannot change how the stored model is rebuilt."""
    name, _, arguments = _resolve(spec)
    as_json = {key: list(value) if isinstance(value, tuple) else value for key, value in arguments.items()}
    return {"arch": name, **as_json}


def input_features(spec: Mapping[str, Any]) -> int:
    """The number of input features (the flat `[N, features]` width) a spec's module expects.

    Read from the spec without building the module: `prod(input_shape)` for image networks,
    `in_features` for LeNet, `sizes[0]` for an MLP.
    """
    name, _, arguments = _resolve(spec)
    if "input_shape" in arguments:
        return math.prod(_image_shape(name, arguments["input_shape"]))
    if "in_features" in arguments:
        return int(arguments["in_features"])
    if "sizes" in arguments:
        return int(arguments["sizes"][0])
    raise InvalidArtifact(f"architecture '{name}' does not say how many input features it takes")


def maskable_parameters(module: nn.Module) -> list[str]:
    """Names of the weights that masks and signed-constant init apply to (matrices and kernels)."""
    return [name for name, p in module.named_parameters() if p.dim() >= 2]


_BN_DEFAULTS = {"running_mean": torch.zeros_like, "running_var": torch.ones_like, "num_batches_tracked": torch.zeros_like}


def batchnorm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm buffer of `module`, by its full name, at its default value.

    Returns:
        `{"layer1.0.bn1.running_mean": zeros(C), "...running_var": ones(C),
        "...num_batches_tracked": tensor(0)}` for each BatchNorm layer (fresh tensors, never the
        module's own, and the defaults even if the module's statistics have been updated).
        Empty for networks without BatchNorm.

    Note:
        A non-affine BatchNorm has no parameters, only these buffers, and in eval mode it
        normalises with them. `torch.func.functional_call(module, {**params, **buffers}, (x,),
        strict=True)` refuses a dict without them, so a method that stores per-task running
        statistics (SupSup with BN) passes its own values under these names, and a materialiser
        of a method that stores none fills them in from here.
    """
    buffers = {}
    for prefix, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for name, value in layer.named_buffers(recurse=False):
                default = _BN_DEFAULTS.get(name, torch.clone)
                buffers[f"{prefix}.{name}" if prefix else name] = default(value)
    return buffers


# ---------------------------------------------------------------- checks shared by the builders


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArtifact(f"{name} {key} must be a positive integer, got {value!r}")
    return value


def _image_shape(name: str, value: Any) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise InvalidArtifact(f"{name} input_shape must be [channels, height, width], got {value!r}")
    for v in value:
        _positive_int(name, "input_shape", v)
    return tuple(value)  # type: ignore[return-value]


def _norm(name: str, bn: Any) -> Callable[[int], nn.Module]:
    """The 2-D normalisation layer `bn` names: non-affine BatchNorm (buffers only) or none."""
    if bn == "nonaffine":
        return functools.partial(nn.BatchNorm2d, affine=False)
    if bn == "none":
        return lambda channels: nn.Identity()
    raise InvalidArtifact(f"{name} bn must be one of {list(_BN_MODES)}, got {bn!r}")


def _conv_layers(name: str, input_shape, layers: Sequence[int | str], bn: str):
    """Unflatten, then per entry a bias-free 3x3 conv (+ BN) + ReLU, or a 2x2 max-pool for "M".

    Returns the layers and the (channels, height, width) they output.
    """
    channels, height, width = _image_shape(name, input_shape)
    norm = _norm(name, bn)
    modules: OrderedDict[str, nn.Module] = OrderedDict(unflatten=nn.Unflatten(1, (channels, height, width)))
    for i, entry in enumerate(layers):
        if entry == "M":
            if height < 2 or width < 2:
                raise InvalidArtifact(
                    f"{name}: max-pool {i} gets a {height}x{width} feature map from input {list(input_shape)}; "
                    "use a larger input or fewer 'M' entries"
                )
            modules[f"pool{i}"] = nn.MaxPool2d(2)
            height, width = height // 2, width // 2
            continue
        if isinstance(entry, bool) or not isinstance(entry, int) or entry < 1:
            raise InvalidArtifact(f"{name} layers must be positive conv widths or 'M' (max-pool), got {entry!r} at {i}")
        out = entry
        modules[f"conv{i}"] = nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False)
        if bn != "none":
            modules[f"bn{i}"] = norm(out)
        modules[f"relu{i}"] = nn.ReLU()
        channels = out
    return modules, (channels, height, width)


# ---------------------------------------------------------------- the architectures


@register_architecture("mlp")
def mlp(sizes: list[int]) -> nn.Sequential:
    """Bias-free fully connected layers `sizes[0] -> ... -> sizes[-1]` with ReLU between them."""
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise InvalidArtifact(f"mlp sizes must be at least two positive integers, got {sizes!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers[f"relu{i}"] = nn.ReLU()
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out, bias=False)
    return nn.Sequential(layers)


@register_architecture("lenet300-100")
def lenet300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """LeNet 300-100: the MLP `in_features -> 300 -> 100 -> num_classes` (bias-free, ReLU).

    The SupSup / ImpressLearn reference network on permuted MNIST (266,200 weights at 784 inputs).
    """
    return mlp([_positive_int("lenet300-100", "in_features", in_features), 300, 100,
                _positive_int("lenet300-100", "num_classes", num_classes)])


@register_architecture("cnn")
def cnn(input_shape: Sequence[int] = _CIFAR, num_classes: int = 10, width: int = 32, bn: str = "none") -> nn.Sequential:
    """A small conv net: two bias-free 3x3 convs (`width`, `2 * width` channels), each followed by
    optional non-affine BN, ReLU and a 2x2 max-pool, then a bias-free linear head over the
    flattened `2 * width x H/4 x W/4` map. Inputs must be at least 4x4.
    """
    width = _positive_int("cnn", "width", width)
    modules, (c, h, w) = _conv_layers("cnn", input_shape, [width, "M", 2 * width, "M"], bn)
    modules["flatten"] = nn.Flatten()
    modules["fc"] = nn.Linear(c * h * w, _positive_int("cnn", "num_classes", num_classes), bias=False)
    return nn.Sequential(modules)


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_architecture("vgg")
def vgg(input_shape: Sequence[int] = _CIFAR, num_classes: int = 10, layers: Sequence[int | str] = _VGG11,
        bn: str = "none") -> nn.Sequential:
    """A VGG-style net: `layers` lists conv widths (bias-free 3x3, padding 1, + optional non-affine
    BN, + ReLU) and "M" for a 2x2 max-pool; then a bias-free linear head over the flattened map.

    The default is VGG-11's feature stack (configuration "A"), which takes 32x32 down to 1x1.
    """
    if not isinstance(layers, (list, tuple)) or not any(entry != "M" for entry in layers):
        raise InvalidArtifact(f"vgg layers must list at least one conv width (and 'M' for max-pool), got {layers!r}")
    modules, (c, h, w) = _conv_layers("vgg", input_shape, layers, bn)
    modules["flatten"] = nn.Flatten()
    modules["fc"] = nn.Linear(c * h * w, _positive_int("vgg", "num_classes", num_classes), bias=False)
    return nn.Sequential(modules)


@register_architecture("resnet18")
def resnet18(input_shape: Sequence[int] = _CIFAR, num_classes: int = 10, width: int = 20,
             bn: str = "nonaffine") -> nn.Sequential:
    """ResNet-18 for small images with a width parameter: the reduced ResNet-18 of GEM that SupSup
    and ExSSNeT use on CIFAR (width 20: stages of 20-40-80-160 channels, about 1.1M weights).

    Layout: a bias-free 3x3 stride-1 stem conv with `width` channels (no max-pool), four stages of
    two torchvision `BasicBlock`s with `width`, `2w`, `4w`, `8w` channels (strides 1, 2, 2, 2;
    1x1 conv shortcuts where the shape changes), global average pooling, a bias-free linear head.
    Module names follow torchvision's ResNet (conv1, bn1, layer1.0.conv1, ..., fc).

    Note:
        The blocks are torchvision's `BasicBlock` (bias-free convs, `norm_layer` hook), but the
        network around them is assembled here, not with `torchvision.models.resnet.ResNet`: that
        class hard-codes 64-128-256-512 channels and an ImageNet stem (7x7 stride-2 conv and
        max-pool, which leaves 1x1 maps of a 32x32 image), gives its head a bias, and
        initialises every BatchNorm's weight, which a non-affine BatchNorm does not have.
    """
    from torchvision.models.resnet import BasicBlock  # imported here: torchvision is slow to import

    channels, height, width_px = _image_shape("resnet18", input_shape)
    width = _positive_int("resnet18", "width", width)
    norm = _norm("resnet18", bn)
    modules: OrderedDict[str, nn.Module] = OrderedDict(
        unflatten=nn.Unflatten(1, (channels, height, width_px)),
        conv1=nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False),
        bn1=norm(width),
        relu=nn.ReLU(inplace=True),
    )
    inplanes = width
    for stage, (planes, stride) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), (1, 2, 2, 2)), start=1):
        blocks = []
        for block in range(2):
            s = stride if block == 0 else 1
            downsample = None
            if s != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=s, bias=False), norm(planes))
            blocks.append(BasicBlock(inplanes, planes, stride=s, downsample=downsample, norm_layer=norm))
            inplanes = planes
        modules[f"layer{stage}"] = nn.Sequential(*blocks)
    modules["avgpool"] = nn.AdaptiveAvgPool2d(1)
    modules["flatten"] = nn.Flatten()
    modules["fc"] = nn.Linear(inplanes, _positive_int("resnet18", "num_classes", num_classes), bias=False)
    return nn.Sequential(modules)
