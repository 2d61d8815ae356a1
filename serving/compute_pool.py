"""The compute pool: the threads that run forwards the event loop hands off, by priority level, then in
adaptive-LIFO order.

Requests wait here oldest first, as in any thread pool, while the queue moves. Once its oldest
request has waited longer than `lifo_after` seconds, the queue is standing (the server is offered
more than it computes) and the pool takes the newest request first until the queue drains (adaptive
LIFO, as in Facebook's "Fail at Scale", ACM Queue 2015). Under sustained overload first-in first-out
hands every thread a request that has already waited the longest, so with client deadlines the
server computes answers nobody waits for any more, and each request waits longer than the last.
Newest first serves the requests whose callers still wait; the old ones expire at their callers, and
gRPC cancels them, which takes them out of the queue uncomputed. Without client deadlines the old ones
wait until the overload passes: a shorter median wait for a longer tail (python -m bench overload
measures both).

The requests of one stream are answered in their order, so among themselves they are taken oldest
first: newest first, the newest request's stream gives its oldest one.

Work is queued at a priority level (Triton's request `priority`, level 0 first here): a thread takes
from the first level that has work, so lower levels wait while higher ones have any.

Written by hand rather than taken from concurrent.futures: its ThreadPoolExecutor takes work in
arrival order only. This is one: a `concurrent.futures.Executor`, and cancelling a future (as
cancelling the coroutine that awaits it through asyncio.wrap_future does) takes work that has not
started out of the queue.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .logs import FloodLog

log = logging.getLogger("maskbank.serving")


@dataclass
class _Work:
    future: Future
    fn: Callable[[], Any]
    expires: float | None  # time.monotonic() after which the work only answers that it came too late
    group: object | None = None  # work answered in order (one stream's requests): taken oldest first among its own
    queued: float = field(default_factory=time.monotonic)


class ComputePool(Executor):
    """`workers` threads taking submitted work from the first of `levels` priority levels that has
    any, oldest first, or newest first while that level's oldest has waited more than `lifo_after`
    seconds (None: always oldest first); each runs `initializer` first, if given."""

    def __init__(self, workers: int, lifo_after: float | None = None, levels: int = 1, name: str = "maskbank-compute",
                 initializer: Callable[[], None] | None = None):
        if workers < 1:
            raise ValueError(f"a compute pool needs at least one thread, got {workers}")
        if lifo_after is not None and lifo_after < 0:
            raise ValueError(f"lifo_after must be 0 or more seconds, or None, got {lifo_after}")
        if levels < 1:
            raise ValueError(f"a compute pool needs at least one priority level, got {levels}")
        self.lifo_after = lifo_after
        self.initializer = initializer  # run first in each thread (torch's per-thread settings)
        self._levels: list[deque[_Work]] = [deque() for _ in range(levels)]
        self._cond = threading.Condition()
        self._shutdown = False
        self._newest_first = FloodLog(log)
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        """Its threads: how much work runs at once."""
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Work waiting for a thread now, at every level (including work cancelled since, not yet taken out)."""
        return sum(len(level) for level in self._levels)

    @property
    def newest_first(self) -> int:
        """How many times a thread took the newest work rather than the oldest (the queue stood)."""
        return self._newest_first.count

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self.submit_at(0, None, functools.partial(fn, *args, **kwargs))

    def submit_at(self, level: int, expires: float | None, fn: Callable[[], Any], group: object | None = None) -> Future:
        """`fn()` at priority `level` (0 first). Work that, once `expires` (a time.monotonic() value) has
        passed, answers at once without computing (serving.timeouts.QueueTimeouts) is taken before any
        other when it is the oldest of its level, so that it answers when it expires, not when
        newest-first order or the higher levels let it. Work of one `group` (the requests of a stream,
        answered in their order) is never taken before older work of its group: newest first, the
        newest work's group gives its oldest, as a stream's first answer holds back the others."""
        if not 0 <= level < len(self._levels):
            raise ValueError(f"priority level {level} is not one of this pool's 0-{len(self._levels) - 1}")
        future: Future = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._levels[level].append(_Work(future, fn, expires, group))
            self._cond.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; the threads finish what is queued (unless `cancel_futures`) and stop."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for level in self._levels:
                    for work in level:
                        work.future.cancel()
                    level.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()

    def refuse_waiting(self, error: BaseException) -> int:
        """Fail the work still waiting for a thread with `error` (the server's grace period is over: its
        callers get that answer rather than a cancelled call); work running goes on. Returns how many."""
        with self._cond:
            waiting = [work for level in self._levels for work in level]
            for level in self._levels:
                level.clear()
        refused = 0
        for work in waiting:
            if work.future.set_running_or_notify_cancel():  # not cancelled by its caller meanwhile
                work.future.set_exception(error)
                refused += 1
        return refused

    def _next(self) -> _Work | None:
        """The work to run next (the lock held), or None when nothing live is queued."""
        now = time.monotonic()
        for level in self._levels:
            while level and level[0].future.cancelled():  # expired at the head: they must not keep the queue "standing"
                level.popleft()
            if level and level[0].expires is not None and now > level[0].expires:
                return level.popleft()
        level = next((level for level in self._levels if level), None)
        if level is None:
            return None
        if self.lifo_after is None or len(level) < 2 or now - level[0].queued <= self.lifo_after:
            return level.popleft()
        newest = level[-1]
        index = len(level) - 1 if newest.group is None else next(
            i for i, work in enumerate(level) if work.group is newest.group)
        if index == 0:  # the newest work's group holds the oldest: arrival order
            return level.popleft()
        self._newest_first.record("the compute pool took %d request(s) {since} newest first (adaptive LIFO): its "
                                  "queue stands, its oldest request having waited over %.0f ms, so the callers "
                                  "still waiting are served first; %d request(s) wait now", 1000 * self.lifo_after,
                                  self.queued)
        work = level[index]
        del level[index]
        return work

    def _work(self) -> None:
        if self.initializer is not None:
            self.initializer()
        while True:
            with self._cond:
                while (work := self._next()) is None:
                    if self._shutdown:
                        return
                    self._cond.wait()
            if not work.future.set_running_or_notify_cancel():  # cancelled while queued: never computed
                continue
            try:
                result = work.fn()
            except BaseException as error:  # as ThreadPoolExecutor: the caller gets every error
                work.future.set_exception(error)
            else:
                work.future.set_result(result)
            del work  # drop the request's tensors before waiting for the next one
