"""Every task's masks laid out for SupSup's superposition (task inference by gradient).

The one-shot signal of serving/task_inference.py is g_i = dH/dalpha_i, H the mean output entropy
with the effective weights W_eff = W * sum_i alpha_i M_i at uniform alpha. By the chain rule

    g_i = sum over masked weights e of  M_i[e] * W[e] * G[e],     G = dH/dW_eff,

so one backward pass to the effective weights gives G, and the signal of all T tasks is then one
product of the [T, E] matrix of flattened masks with (W * G). Differentiating with respect to alpha
instead (autograd through sum_i alpha_i M_i) copied the candidates' masks and built that sum on
every request, and its backward did the same product again. The mean mask of all tasks, the forward
of `oneshot`, `oneshot-input` and binary's first round, is computed once.

Memory: the masks stay bitpacked as the snapshot holds them (1 bit per weight). The [T, E] float
matrix (32 bits per weight: 1.2 GB for 1,000 tasks of MLP 64-512-512-10) is an accelerator kept in
the server's byte-bounded cache (--cache-bytes) like any derived weights; where the cache does not
admit it, the product is computed from the packed masks a few rows at a time, in a small buffer
(python -m bench snapshot_memory measures both).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Mapping, NamedTuple, Sequence

import torch

from registry import PackedMasks

from .cache import CacheView, LRUCache

log = logging.getLogger("maskbank.serving")
Tensors = dict[str, torch.Tensor]
CHUNK_BYTES = 4 << 20  # a thread's float buffer for blocks of mask rows: filled and multiplied while in the CPU cache
# (1 MiB, this machine's L2 per core, measured 5-10% slower at 1,000 tasks of MLP 64-512-512-10)


class Superposed(NamedTuple):
    """Some tasks' masks superposed with equal weights."""

    rows: list[int] | None  # their rows of the MaskStack (None: all of them)
    dense: torch.Tensor | None  # the MaskStack's float matrix of all tasks, where the cache holds it
    parameters: Tensors  # the backbone with each masked weight times their mean mask
    classes: int  # the most classes of any of them: the logits their entropy is taken over


@dataclass(eq=False)
class MaskStack:
    """The masks of T tasks on one backbone, one row per task, and their uniform superposition.
    Made by `build` and not changed afterwards (only the cache entry of its float matrix comes and goes).

    Attributes:
        ids: the task ids, by row.
        row: each task id's row.
        classes: each task's class count, by row.
        columns: each masked layer's columns in a flattened row (layers in the backbone's order).
        masks: each row's masks, bitpacked (the snapshot's own objects, not copies).
        backbone: the shared weights (a tensor without a mask passes through unchanged).
        superposed: the backbone with each masked weight times the mean mask of all T tasks.
        sums: [E] how many tasks keep each weight (the mean mask times T), so that the stack of a
            later generation, with tasks appended, only adds the new tasks' masks.
        cache: where the [T, E] float matrix of the masks is kept when it is admitted, under `key`.
        model: the model's name, for messages.
    """

    ids: list[int]
    row: dict[int, int]
    classes: list[int]
    columns: dict[str, slice]
    masks: list[PackedMasks]
    backbone: dict[str, torch.Tensor]
    superposed: dict[str, torch.Tensor]
    sums: torch.Tensor
    cache: LRUCache | CacheView
    key: Hashable
    model: str = ""  # the model's name, for messages
    _buffers: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    _retired: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _building: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _too_big: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @classmethod
    def build(cls, ids: list[int], classes: list[int], masks: list[Mapping[str, torch.Tensor]], backbone: Tensors,
              cache: LRUCache | CacheView, key: Hashable, previous: "MaskStack | None" = None, model: str = "") -> "MaskStack":
        """Stack `masks` (one dict per task, a mask per masked backbone tensor; bool or PackedMasks) over
        `backbone`; its float matrix is cached in `cache` under `key` (unique to these masks).

        previous: the stack of an earlier generation. Where its tasks are this one's first (the same
        masks and backbone objects: tasks are immutable and a snapshot reuses what it loaded), only the
        tasks after them are summed: a hot add costs its own masks, not every task's again."""
        packed = [PackedMasks.pack(task) for task in masks]
        names = [n for n in backbone if n in packed[0].shapes]
        stops = torch.tensor([backbone[n].numel() for n in names]).cumsum(0).tolist()
        columns = {n: slice(stop - backbone[n].numel(), stop) for n, stop in zip(names, stops)}
        stack = cls(ids, {i: r for r, i in enumerate(ids)}, classes, columns, packed, backbone, {}, torch.zeros(0),
                    cache, key, model)
        known = len(previous.ids) if previous is not None and previous.is_prefix_of(stack) else 0
        stack.sums = stack.column_sums(range(known, len(ids)), None if known else stack.dense())
        if known:
            stack.sums += previous.sums  # integers below 2^24: exact, as summing every task again
        stack.superposed = stack._superpose(stack.sums / len(ids))
        return stack

    def is_prefix_of(self, other: "MaskStack") -> bool:
        """Whether `other` holds this stack's tasks first, with the very same masks over the same backbone."""
        count = len(self.ids)
        return (other.backbone is self.backbone and other.columns == self.columns and other.ids[:count] == self.ids
                and all(a is b for a, b in zip(self.masks, other.masks[:count])))

    def retire(self) -> None:
        """This stack's snapshot was replaced: drop its float matrix from the cache and never cache it
        again (requests still running on it compute from the packed masks), so the next generation's
        matrix is not refused room by an entry nobody will look up."""
        self._retired.set()
        self.cache.evict(self.key)

    @property
    def width(self) -> int:
        """E: the masked weights of one task."""
        return max((s.stop for s in self.columns.values()), default=0)

    def subset(self, rows: list[int] | None = None) -> Superposed:
        """The tasks of `rows` superposed (None: all of them, whose superposition is precomputed).
        Looks the float matrix up in the cache once (a hit or a miss in its statistics)."""
        dense = self.dense()
        if rows is None:
            return Superposed(None, dense, self.superposed, max(self.classes))
        mean = self.column_sums(rows, dense) / len(rows)
        return Superposed(rows, dense, self._superpose(mean), max(self.classes[r] for r in rows))

    def gradient(self, tasks: Superposed, weight_gradients: Tensors) -> torch.Tensor:
        """[k] dH/dalpha of the k tasks of `tasks` (from `subset`), given dH/dW_eff of some masked layers
        at their superposition; the other layers contribute nothing.

        One product over the columns from the first given layer to the last (layers in between
        that are not given count as zeros): per layer, the strided products cost 1.5x as much.
        All tasks: one product with the cached float matrix where there is one (at 1,000 tasks of
        MLP 64-512-512-10, 2-3x faster than unpacking); else, and for a subset, block by block."""
        spans = [self.columns[n] for n in weight_gradients]
        start, stop = min(s.start for s in spans), max(s.stop for s in spans)
        pieces = [(weight_gradients[n] * self.backbone[n]).flatten() if n in weight_gradients
                  else torch.zeros(self.backbone[n].numel()) for n, s in self.columns.items()
                  if start <= s.start and s.stop <= stop]
        signal = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if tasks.rows is None and tasks.dense is not None:
            return tasks.dense[:, start:stop] @ signal
        rows = range(len(self.ids)) if tasks.rows is None else tasks.rows
        return torch.cat([block @ signal for block in self._blocks(rows, start, stop, tasks.dense)])

    def column_sums(self, rows: Sequence[int], dense: torch.Tensor | None) -> torch.Tensor:
        """[E]: how many of `rows`' masks keep each weight (exact in float32 below 2^24 rows), from the
        float matrix `dense` where given, else from the packed masks."""
        total = torch.zeros(self.width)
        for chunk in self._blocks(rows, 0, self.width, dense):
            total += torch.ones(len(chunk)) @ chunk
        return total

    def dense(self) -> torch.Tensor | None:
        """[T, E] float32 0/1, row i the masks of task ids[i] flattened, layers side by side: from the
        cache, built and kept there if it admits the T x E x 4 bytes. None where it does not, once the
        stack is retired, and while another thread builds it (callers use the packed masks meanwhile
        rather than wait, or build a second copy)."""
        if self._retired.is_set():
            return None
        matrix = self.cache.get(self.key)
        if matrix is not None or not self._building.acquire(blocking=False):
            return matrix
        try:
            if self.key in self.cache:  # built by the thread that held the lock just before
                return self.cache.get(self.key)
            size = len(self.ids) * self.width * 4
            if size > self.cache.capacity_bytes and not self._too_big.is_set():
                self._too_big.set()  # once per stack: an operator can act on it, a log line per request is noise
                log.warning("model '%s': the gradient task-inference modes' float mask matrix (%d tasks, %.1f MB) "
                            "exceeds --cache-bytes (%.1f MB), so they compute from the bitpacked masks (2-3x "
                            "slower at 1,000 tasks); raise --cache-bytes above %d MB to keep it",
                            self.model, len(self.ids), size / 1e6, self.cache.capacity_bytes / 1e6,
                            math.ceil((size + self.cache.stats().bytes) / 1e6))  # rounded up: "above 0 MB" said nothing
            if not self.cache.admits(self.key, size):
                return None
            matrix = torch.empty(len(self.ids), self.width)
            for row, task in zip(matrix, self.masks):
                self._unpack_into(row, task, self.columns)
            self.cache.put(self.key, matrix, size)
            if self._retired.is_set():  # retired while building: the entry must not outlive the stack's use
                self.cache.evict(self.key)
            return matrix
        finally:
            self._building.release()

    def _blocks(self, rows: Sequence[int], start: int, stop: int, dense: torch.Tensor | None
                ) -> Iterator[torch.Tensor]:
        """The masks of `rows` over the columns [start, stop) (whole layers) as float32 0/1, in blocks
        of CHUNK_BYTES in this thread's buffer (each block valid until the next): copied from the float
        matrix `dense` where given, else unpacked from the packed masks. (Copying a subset's rows whole from
        the matrix, a fresh 600 MB a round, made binary at 1,000 tasks 2.8x as slow as blocks; unpacking
        where the matrix is cached made bench/gn.py's binary at T=100 about 3x as slow as copying.)"""
        layers = {n: slice(s.start - start, s.stop - start) for n, s in self.columns.items()
                  if start <= s.start and s.stop <= stop}
        per_block = max(1, CHUNK_BYTES // (4 * (stop - start)))
        buffer = self._buffer(per_block * (stop - start)).view(per_block, stop - start)
        for first in range(0, len(rows), per_block):
            some = rows[first : first + per_block]
            block = buffer[: len(some)]
            if dense is not None:
                torch.index_select(dense[:, start:stop], 0, torch.tensor(some), out=block)
            else:
                for row, r in zip(block, some):
                    self._unpack_into(row, self.masks[r], layers)
            yield block

    def _buffer(self, elements: int) -> torch.Tensor:
        """This thread's float32 buffer of at least `elements` (working memory, like activations)."""
        buffer = getattr(self._buffers, "tensor", None)
        if buffer is None or buffer.numel() < elements:
            buffer = self._buffers.tensor = torch.empty(elements)
        return buffer[:elements]

    def _unpack_into(self, row: torch.Tensor, masks: PackedMasks, layers: Mapping[str, slice]) -> None:
        for name, columns in layers.items():
            masks.as_float(name, out=row[columns].view(self.backbone[name].shape))

    def _superpose(self, mean: torch.Tensor) -> Tensors:
        """The backbone with each masked weight times its columns of the flat mean mask `mean` [E]."""
        return {n: w * mean[self.columns[n]].view_as(w) if n in self.columns else w for n, w in self.backbone.items()}

