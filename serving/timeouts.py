"""Triton's per-request `timeout` on the compute pool: what waited longer than it allows is not computed.

A request handed to the compute pool may wait there behind others. Its `timeout` parameter (in
microseconds; tritonclient's `infer(timeout=...)`) bounds that wait, as Triton's queue policy does:
when its turn comes too late, it is answered DEADLINE_EXCEEDED without being computed. (A caller's
own gRPC deadline needs nothing here: gRPC cancels the call when it passes, and the pool never
starts a job whose call was cancelled.)
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from .errors import RequestTimeout
from .logs import FloodLog

log = logging.getLogger("maskbank.serving")
T = TypeVar("T")


class QueueTimeouts:
    """Runs pool jobs unless they start past their request's timeout; counts those it drops."""

    def __init__(self):
        self._drops = FloodLog(log)

    @property
    def dropped(self) -> int:
        """Requests answered DEADLINE_EXCEEDED when their turn came, never computed."""
        return self._drops.count

    def run(self, job: Callable[[], T], arrived: float, timeout: float | None) -> T:
        """`job()` on this (pool) thread; RequestTimeout instead, computing nothing, when it starts later
        than `timeout` seconds after `arrived` (a time.monotonic() value)."""
        if timeout is not None and (late := time.monotonic() - arrived - timeout) > 0:
            self._drops.record("dropped %d request(s) {since} that waited for the compute pool past their timeout "
                               "parameter; clients got DEADLINE_EXCEEDED")
            raise RequestTimeout(f"the request waited {1e6 * (timeout + late):.0f} µs for the compute pool, more than "
                                 f"its timeout ({1e6 * timeout:.0f} µs), and was not computed; retry later, or with a "
                                 "longer timeout")
        return job()
