"""packnet-share materialisation: a task's structured filter mask over the trained backbone, plus its head.

A packnet-share task is computable from its own parts and the backbone version it was published
with; no other task's parts are needed, even though the task reuses earlier tasks' subnetworks:

- `filter_mask` holds, for every masked weight NAME of the network (hidden layers and the head),
  `NAME.out`: bool [out features / channels], the filters of that layer the task uses, i.e. its own
  subnetwork S_t together with the frozen filters of every earlier subnetwork it shares (already
  closed over dependencies: sharing a filter shares the filters it depends on); and `NAME.in`:
  bool [in features / channels], the inputs of that layer the task uses (all inputs for the first
  layer; otherwise the previous layer's `out`, repeated per position after a conv -> linear
  flatten). The `in` vectors repeat what the `out` vectors already say, at a few hundred bits per
  task, so the materialiser needs neither the layer order nor the architecture.
- `head`: the task's own output layer (a float tensor under the name of the network's last masked
  weight, the backbone's shape); its output units are never shared.

Effective weight of layer NAME: `W[NAME] * out[:, None] * in[None, :]` (kernels broadcast), with
W the head for the head layer and the backbone weight otherwise. So a task's forward uses only the
weights between filters it uses: a filter it does not use, pruned or omitted, has its row and its
outgoing weights in the next layer zeroed.

Why sharing stays exact: when task j freezes its subnetwork S_j, the trainer zeroes, in the
backbone it publishes, every weight of an S_j row whose input task j did not use. A frozen row then
computes the same function in every task that shares it (whatever else that task uses), frozen rows
never change again, and (any later backbone version) masked by task j's filter mask equals (task j's
own version) masked the same way, bit for bit.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import InvalidArtifact
from .materialize import Tensors, check_head, register_materializer

METHOD = "packnet-share"


def out_key(name: str) -> str:
    """The filter_mask entry with the filters (output units / channels) of weight `name` a task uses."""
    return f"{name}.out"


def in_key(name: str) -> str:
    """The filter_mask entry with the inputs (input units / channels) of weight `name` a task uses."""
    return f"{name}.in"


def check_filter_mask(filter_mask: Tensors, head: Tensors, backbone: Tensors) -> None:
    """Raise InvalidArtifact unless the filter mask and head fit the backbone (expected vs actual)."""
    expected = {key(name) for name in backbone for key in (out_key, in_key)}
    if set(filter_mask) != expected:
        missing, extra = sorted(expected - set(filter_mask)), sorted(set(filter_mask) - expected)
        raise InvalidArtifact(f"{METHOD} filter_mask must have '.out' and '.in' entries for every backbone weight "
                              f"{sorted(backbone)}: missing {missing}, unexpected {extra}")
    for name, weight in backbone.items():
        for key, dim in ((out_key(name), 0), (in_key(name), 1)):
            mask = filter_mask[key]
            if mask.dtype != torch.bool or tuple(mask.shape) != (weight.shape[dim],):
                raise InvalidArtifact(f"{METHOD} filter_mask '{key}' must be bool [{weight.shape[dim]}], "
                                      f"got {mask.dtype} {list(mask.shape)}")
    check_head(METHOD, head, backbone)


def filter_masked(weight: torch.Tensor, out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in, *kernel] with the rows outside `out` and the columns outside `inputs` zeroed."""
    extra = (1,) * (weight.dim() - 2)
    return weight * out.to(weight.dtype).view(-1, 1, *extra) * inputs.to(weight.dtype).view(1, -1, *extra)


@register_materializer(METHOD, parts=("filter_mask", "head"))
def _packnet_share(backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors]) -> dict[str, torch.Tensor]:
    masks, head = parts["filter_mask"], parts["head"]
    check_filter_mask(masks, head, backbone)
    return {name: filter_masked(head.get(name, weight), masks[out_key(name)], masks[in_key(name)])
            for name, weight in backbone.items()}
