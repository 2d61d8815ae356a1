"""Head-based methods (spg, finetune, ewc): the whole network trains, each task keeps its own head.

A task's effective parameters are the backbone with its output layer replaced by the task's `head`
part. The backbone is the model's **newest** version, not the one the task was published with:
these methods share one network that every task keeps training (SPG and EWC slow the change down,
fine-tuning does not), so an earlier task is served as the method intends, with whatever later
tasks did to the shared weights; the trainer measures exactly this as backward transfer (BWT).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import InvalidArtifact
from .materialize import Tensors, check_head, register_materializer

HEAD_METHODS = ("spg", "finetune", "ewc")


@register_materializer(*HEAD_METHODS, parts=("head",), backbone="latest", head_only=True)
def _head_over_backbone(backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors]) -> dict[str, torch.Tensor]:
    if set(parts) != {"head"}:
        raise InvalidArtifact(f"a head-based task has exactly one part, 'head'; got {sorted(parts)}")
    check_head("head-based task's", parts["head"], backbone)
    return {**backbone, **parts["head"]}
