"""Every task's masks in one matrix, laid out for SupSup's superposition (task inference by gradient).

The one-shot signal of serving/task_inference.py is g_i = dH/dalpha_i, H the mean output entropy
with the effective weights W_eff = W * sum_i alpha_i M_i at uniform alpha. By the chain rule

    g_i = sum over masked weights e of  M_i[e] * W[e] * G[e],     G = dH/dW_eff,

so one backward pass to the effective weights gives G, and the signal of all T tasks is then one
matrix-vector product of the [T, E] matrix of flattened masks with (W * G). Differentiating with
respect to alpha instead (autograd through sum_i alpha_i M_i) copied the candidates' masks and
built that sum on every request, and its backward did the same product again. The mean mask of
all tasks, the forward of `oneshot`, `oneshot-input` and binary's first round, is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch

from registry import PackedMasks

Tensors = dict[str, torch.Tensor]


class Superposed(NamedTuple):
    """Some tasks' masks superposed with equal weights."""

    masks: torch.Tensor  # [k, E]: their rows of MaskStack.masks
    parameters: Tensors  # the backbone with each masked weight times their mean mask
    classes: int  # the most classes of any of them: the logits their entropy is taken over


@dataclass(frozen=True)
class MaskStack:
    """The masks of T tasks on one backbone, one row per task, and their uniform superposition.

    Attributes:
        ids: the task ids, by row.
        row: each task id's row.
        classes: each task's class count, by row.
        columns: each masked layer's columns in `masks` (layers in the backbone's order).
        masks: [T, E] float32 of 0/1: row i is task ids[i]'s masks flattened, layers side by side.
        backbone: the shared weights (a tensor without a mask passes through unchanged).
        superposed: the backbone with each masked weight times the mean mask of all T tasks.
    """

    ids: list[int]
    row: dict[int, int]
    classes: list[int]
    columns: dict[str, slice]
    masks: torch.Tensor
    backbone: dict[str, torch.Tensor]
    superposed: dict[str, torch.Tensor]

    @classmethod
    def build(cls, ids: list[int], classes: list[int], masks: list[Mapping[str, torch.Tensor]], backbone: Tensors
              ) -> "MaskStack":
        """Stack `masks` (one dict per task, a mask per masked backbone tensor; bool or PackedMasks) over `backbone`."""
        names = [n for n in backbone if n in masks[0]]
        stops = torch.tensor([backbone[n].numel() for n in names]).cumsum(0).tolist()
        columns = {n: slice(stop - backbone[n].numel(), stop) for n, stop in zip(names, stops)}
        matrix = torch.empty(len(masks), sum(backbone[n].numel() for n in names))
        for row, task in zip(matrix, masks):  # unpacked straight into their rows
            packed = PackedMasks.pack(task)
            for n in names:
                packed.as_float(n, out=row[columns[n]].view(backbone[n].shape))
        superposed = _superpose(backbone, columns, matrix.mean(dim=0))
        return cls(ids, {i: r for r, i in enumerate(ids)}, classes, columns, matrix, backbone, superposed)

    def subset(self, rows: list[int] | None = None) -> Superposed:
        """The tasks of `rows` superposed. All rows (None) reuse the precomputed superposition; a
        subset's masks are copied once."""
        if rows is None:
            return Superposed(self.masks, self.superposed, max(self.classes))
        masks = self.masks.index_select(0, torch.tensor(rows))  # a list index is 4x slower
        mean = torch.ones(len(rows)) @ masks / len(rows)  # sums of 0/1: exact
        return Superposed(masks, _superpose(self.backbone, self.columns, mean), max(self.classes[r] for r in rows))

    def gradient(self, masks: torch.Tensor, weight_gradients: Tensors) -> torch.Tensor:
        """[k] dH/dalpha of the k tasks whose masks are `masks` (from `subset`), given dH/dW_eff of
        some masked layers at their superposition; the other layers contribute nothing.

        One product over the columns from the first given layer to the last (layers in between
        that are not given count as zeros): per layer, the strided products cost 1.5x as much."""
        spans = [self.columns[n] for n in weight_gradients]
        start, stop = min(s.start for s in spans), max(s.stop for s in spans)
        pieces = [(weight_gradients[n] * self.backbone[n]).flatten() if n in weight_gradients
                  else torch.zeros(self.backbone[n].numel()) for n, s in self.columns.items()
                  if start <= s.start and s.stop <= stop]
        return masks[:, start:stop] @ (pieces[0] if len(pieces) == 1 else torch.cat(pieces))


def _superpose(backbone: Tensors, columns: dict[str, slice], mean: torch.Tensor) -> Tensors:
    """`backbone` with each masked weight times its columns of the flat mean mask `mean` [E]."""
    return {n: w * mean[columns[n]].view_as(w) if n in columns else w for n, w in backbone.items()}
