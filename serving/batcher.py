"""Dynamic batching: concurrent requests for the same (snapshot, task) run as one forward pass.

Like Triton's dynamic batcher, with two knobs: `max_batch_size` (rows in one execution) and
`max_queue_delay` (how long the first request of a batch waits for others to join); and, like
Triton's instance count, `instances`: how many batches of one key may run at once (on a
multi-core CPU one execution at a time leaves cores idle while requests queue; a request joins a
batch still gathering company rather than start another). It needs no
thread of its own: the first request of a batch leads it: waits up to the delay, takes the
queued requests (up to max_batch_size rows), runs them, hands each its rows, then passes the
lead to the oldest request still queued, if any. With a delay of 0 requests still merge whenever they
queue up behind a running execution.

A batch stops waiting before the delay ends once it holds as many requests as the last batch of its
key that waited the whole delay (`Expected`): clients that wait for their answer before sending
again (most callers, and every benchmark's load) cannot send more, so waiting longer only added
latency. A request alone learns nothing, so the next one waits the delay, as Triton's does.

Note: merging rows into one matrix product can change the last bits of a row's logits (the
floating-point summation order of the BLAS kernel may depend on the batch shape); requests that
run alone are computed exactly as the trainer computed them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from .statistics import Statistics, Timing


@dataclass
class _Pending:
    x: torch.Tensor
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    timing: Timing = field(default_factory=Timing)  # set by its execution: its queue wait and the execution's time
    done: threading.Event | None = None  # only a request that waits gets one
    joined: asyncio.Future | None = None  # LoopBatcher: set when a request that joined a batch has its rows
    lead: bool = False  # set when this request is handed the lead of the next batch
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Expected:
    """Per key, how many requests a batch can expect to gather within the queue delay: the count of
    the last batch of the key that waited the whole delay, raised whenever a batch ends up larger
    (the leader wakes after more joined). Kept for the `keys` most recently batched keys.

    A count below 2 is forgotten: a lone request cannot tell whether company would have come, so
    the next batch of its key waits the delay again."""

    def __init__(self, keys: int = 4096):
        self._counts: OrderedDict[Hashable, int] = OrderedDict()
        self._keys = keys

    def reached(self, key: Hashable, requests: int) -> bool:
        """Whether a batch of `requests` requests of `key` has all it can expect (stop waiting)."""
        target = self._counts.get(key)
        return target is not None and requests >= target

    def record(self, key: Hashable, requests: int, waited_out: bool) -> None:
        """A batch of `key` runs with `requests` requests, after waiting the whole delay or not."""
        count = requests if waited_out else max(requests, self._counts.get(key, 0))
        if count < 2:
            self._counts.pop(key, None)
            return
        self._counts[key] = count
        self._counts.move_to_end(key)
        if len(self._counts) > self._keys:
            self._counts.popitem(last=False)


@dataclass
class _Key:
    """DynamicBatcher's state of one key, present exactly while at least one batch of it runs."""

    running: int = 0  # batches of the key led now (gathering or computing)
    gathering: bool = False  # one of them waits for company: a new request joins it rather than lead another
    queue: list[_Pending] = field(default_factory=list)  # requests waiting for a batch


class DynamicBatcher:
    def __init__(self, statistics: Statistics, max_batch_size: int = 1024, max_queue_delay_us: int = 0,
                 instances: int = 1):
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        self.statistics = statistics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.instances = instances
        self._keys: dict[Hashable, _Key] = {}
        self._cond = threading.Condition()
        self._expected = Expected()

    def run(self, model: str, key: Hashable, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
            arrived_ns: int | None = None, timing: Timing | None = None) -> torch.Tensor:
        """`compute(x)` for this request, possibly batched with concurrent ones of the same `key`; its
        queue time counts from `arrived_ns` (time.perf_counter_ns(); default now), so that a wait
        before this call (for the compute pool) is queue time too. `timing`, where given, receives
        the request's queue and compute time, for its statistics once it is answered.

        A request that finds fewer than `instances` batches of its key running, none of them
        gathering company, leads one at once (no Event, no hand-off: the uncontended path costs two
        lock round trips); the others queue and wait."""
        item = _Pending(x, time.perf_counter_ns() if arrived_ns is None else arrived_ns, timing or Timing())
        with self._cond:
            state = self._keys.setdefault(key, _Key())
            leads = state.running < self.instances and not state.gathering
            if leads:
                state.running += 1
                state.gathering = self.max_queue_delay_s > 0  # from now (same lock) until its wait ends
            else:
                item.done = threading.Event()
                state.queue.append(item)
                if self.max_queue_delay_s:
                    self._cond.notify_all()  # a leader may be waiting for company
        if leads:
            self._lead_one_batch(model, key, item, compute, wait=True)
        else:
            item.done.wait()
            if item.lead:  # handed the lead before its own rows ran
                self._lead_one_batch(model, key, item, compute, wait=False)
        if item.error is not None:
            raise item.error
        return item.result

    def _lead_one_batch(self, model: str, key: Hashable, leader: _Pending, compute, wait: bool) -> None:
        """Run `leader` with the requests queued behind it (after waiting up to the delay for more
        when `wait`), hand each its rows, then pass the lead to the oldest request still queued."""
        with self._cond:
            state = self._keys[key]
            if wait and self.max_queue_delay_s:
                waited_out = False
                deadline = time.monotonic() + self.max_queue_delay_s
                while self._rows(leader, state) < self.max_batch_size and not self._expected.reached(key, 1 + len(state.queue)):
                    if (remaining := deadline - time.monotonic()) <= 0:
                        waited_out = True
                        break
                    self._cond.wait(remaining)
                state.gathering = False
                self._expected.record(key, 1 + len(state.queue), waited_out)
            batch = take([leader], state.queue, self.max_batch_size)
        execute(self.statistics, model, batch, compute)
        with self._cond:
            if state.queue:
                successor = state.queue.pop(0)  # the next batch is led by the oldest waiting request
                successor.lead = True
                successor.done.set()
            elif state.running == 1:
                del self._keys[key]
            else:
                state.running -= 1
        for pending in batch[1:]:
            pending.done.set()

    @staticmethod
    def _rows(leader: _Pending, state: _Key) -> int:
        return leader.x.shape[0] + sum(p.x.shape[0] for p in state.queue)


class LoopBatcher:
    """The same batching for requests served on an asyncio event loop (the grpc.aio front end runs
    small task-given forwards inline there): the first request of a key waits up to the delay (or
    until `Expected` says the batch has all it can get), without blocking the loop, for others of the
    key to join, then runs them and hands each its rows. Only the loop's own thread calls it, so it
    needs no lock and one batch of a key runs at a time.

    A key's requests run in batches of at most `max_rows` rows (the caller's bound on how long one
    forward may hold the loop) and `max_batch_size`; when they need several, each further batch is a
    callback of its own, so the loop serves other requests between them."""

    def __init__(self, statistics: Statistics, max_batch_size: int = 1024, max_queue_delay_us: int = 0):
        self.statistics = statistics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self._queues: dict[Hashable, tuple[list[_Pending], asyncio.Event, int]] = {}  # key -> (queued, full, rows)
        self._expected = Expected()

    async def run(self, model: str, key: Hashable, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                  max_rows: int | None = None, timing: Timing | None = None) -> torch.Tensor:
        """`compute(x)` for this request, possibly batched with concurrent ones of the same `key`, in
        batches of at most `max_rows` rows (default and upper bound: max_batch_size). A request of
        more rows than that runs alone. `timing`, where given, receives its queue and compute time."""
        item = _Pending(x, timing=timing or Timing())
        if key in self._queues:
            queue, full, rows = self._queues[key]
            item.joined = asyncio.get_running_loop().create_future()
            queue.append(item)
            if sum(p.x.shape[0] for p in queue) >= rows or self._expected.reached(key, len(queue)):
                full.set()
            await item.joined
        else:
            rows = min(self.max_batch_size, max_rows or self.max_batch_size)
            await self._lead(model, key, item, compute, rows)
        if item.error is not None:
            raise item.error
        return item.result

    async def _lead(self, model: str, key: Hashable, leader: _Pending, compute, rows: int) -> None:
        """Wait up to the delay for company (not at all without one), then run the batches; they run
        even when the leader's call is cancelled meanwhile, since the requests that joined wait on them."""
        queue = [leader]
        if self.max_queue_delay_s:
            full = asyncio.Event()
            self._queues[key] = (queue, full, rows)
            waited_out = False
            try:
                await asyncio.wait_for(full.wait(), self.max_queue_delay_s)
            except TimeoutError:
                waited_out = True
            finally:
                del self._queues[key]
                self._expected.record(key, len(queue), waited_out)
                self._run_queued(model, queue, compute, rows)
        else:
            self._run_queued(model, queue, compute, rows)

    def _run_queued(self, model: str, queue: list[_Pending], compute, rows: int) -> None:
        """Run the first batch of at most `rows` rows of `queue`, wake the requests in it that joined
        (one whose caller gave up meanwhile has nobody to wake), and leave the rest to a callback."""
        batch = take([], queue, rows)
        execute(self.statistics, model, batch, compute)
        for pending in batch:
            if pending.joined is not None and not pending.joined.done():
                pending.joined.set_result(None)
        if queue:
            asyncio.get_running_loop().call_soon(self._run_queued, model, queue, compute, rows)


def take(batch: list[_Pending], queue: list[_Pending], max_rows: int) -> list[_Pending]:
    """`batch` with the requests at the head of `queue` moved onto it, oldest first, up to
    `max_rows` rows (the first request always, whatever its size)."""
    rows = sum(p.x.shape[0] for p in batch)
    while queue and (not batch or rows + queue[0].x.shape[0] <= max_rows):
        item = queue.pop(0)
        batch.append(item)
        rows += item.x.shape[0]
    return batch


def execute(statistics: Statistics, model: str, batch: list[_Pending], compute) -> None:
    """Run `batch` as one forward, hand each request its rows (or every request the error) and its
    timing (its wait, and the execution's duration: each request of a batch waited for all of it, as
    Triton counts), and record the execution (rows, duration) in `statistics`."""
    started = time.perf_counter_ns()
    try:
        if len(batch) == 1:
            batch[0].result = compute(batch[0].x)
        else:
            outputs = compute(torch.cat([p.x for p in batch]))
            for pending, rows in zip(batch, outputs.split([p.x.shape[0] for p in batch])):
                pending.result = rows
    except BaseException as error:  # every request of the batch gets the error
        for pending in batch:
            pending.error = error
    finished = time.perf_counter_ns()
    for pending in batch:
        pending.timing.queue_ns, pending.timing.compute_ns = started - pending.enqueued_ns, finished - started
    statistics.execution(model, sum(p.x.shape[0] for p in batch), finished - started)
