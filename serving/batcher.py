"""Dynamic batching: concurrent requests for the same (snapshot, task) run as one forward pass.

Like Triton's dynamic batcher, with two knobs: `max_batch_size` (rows in one execution) and
`max_queue_delay` (how long the first request of a batch waits for others to join). It needs no
thread of its own: the first request of a batch leads it: waits up to the delay, takes the
queued requests (up to max_batch_size rows), runs them, hands each its rows, then passes the
lead to the next queued request, if any. With a delay of 0 requests still merge whenever they
queue up behind a running execution.

Note: merging rows into one matrix product can change the last bits of a row's logits (the
floating-point summation order of the BLAS kernel may depend on the batch shape); requests that
run alone are computed exactly as the trainer computed them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from .statistics import Statistics


@dataclass
class _Pending:
    x: torch.Tensor
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set when this request is handed the lead of the next batch
    result: torch.Tensor | None = None
    error: BaseException | None = None


class DynamicBatcher:
    def __init__(self, statistics: Statistics, max_batch_size: int = 1024, max_queue_delay_us: int = 0):
        self.statistics = statistics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self._queues: dict[Hashable, list[_Pending]] = {}
        self._led: set[Hashable] = set()  # keys whose queue has a leader
        self._cond = threading.Condition()

    def run(self, model: str, key: Hashable, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`compute(x)` for this request, possibly batched with concurrent ones of the same `key`."""
        item = _Pending(x)
        with self._cond:
            self._queues.setdefault(key, []).append(item)
            leads = key not in self._led
            if leads:
                self._led.add(key)
            self._cond.notify_all()
        while True:
            if leads or item.lead:
                self._lead_one_batch(model, key, compute, wait=leads)
                leads = False
            item.done.wait()
            if item.lead and item.result is None and item.error is None:
                continue  # handed the lead before its own rows ran
            break
        if item.error is not None:
            raise item.error
        return item.result

    def _lead_one_batch(self, model: str, key: Hashable, compute, wait: bool) -> None:
        deadline = time.monotonic() + (self.max_queue_delay_s if wait else 0.0)
        with self._cond:
            while self._rows(key) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            batch = self._take(key)
        started = time.perf_counter_ns()
        try:
            outputs = compute(torch.cat([p.x for p in batch])) if len(batch) > 1 else compute(batch[0].x)
            for pending, rows in zip(batch, outputs.split([len(p.x) for p in batch])):
                pending.result = rows
        except BaseException as error:  # every request of the batch gets the error
            for pending in batch:
                pending.error = error
        finished = time.perf_counter_ns()
        queue_ns = sum(started - p.enqueued_ns for p in batch)
        self.statistics.execution(model, sum(len(p.x) for p in batch), len(batch), queue_ns, (finished - started) * len(batch))
        with self._cond:
            waiting = self._queues.get(key)
            if waiting:
                waiting[0].lead = True  # the next batch is led by the oldest waiting request
                waiting[0].done.set()
            else:
                self._queues.pop(key, None)
                self._led.discard(key)
        for pending in batch:
            pending.done.set()

    def _rows(self, key: Hashable) -> int:
        return sum(len(p.x) for p in self._queues.get(key, []))

    def _take(self, key: Hashable) -> list[_Pending]:
        """Queued requests up to max_batch_size rows (at least one), oldest first."""
        queue, batch, rows = self._queues[key], [], 0
        while queue and (not batch or rows + len(queue[0].x) <= self.max_batch_size):
            item = queue.pop(0)
            item.lead = False
            item.done.clear()
            batch.append(item)
            rows += len(item.x)
        return batch
