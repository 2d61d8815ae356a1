"""Per-model inference statistics, as Triton's ModelStatistics reports them (and metrics export)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class Timing:
    """One request's wait in a queue and the duration of the execution that computed it (Triton's
    queue and compute_infer). The request keeps them until it is answered: as in Triton, they count
    in its model's statistics only if it succeeds (a request that fails after its execution, say
    on non-finite outputs, counts as a failure alone)."""

    queue_ns: int = 0
    compute_ns: int = 0


@dataclass
class ModelStats:
    """Counters of one model. `inference_count` counts rows; `execution_count` counts model runs
    (a batched run of several requests counts once); `cancelled` counts the failed requests whose
    caller cancelled or whose deadline passed before the answer."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))
    cancelled: int = 0


class Statistics:
    """Thread-safe statistics of every model the server has answered for."""

    def __init__(self):
        self._models: dict[str, ModelStats] = defaultdict(ModelStats)
        self._lock = threading.Lock()
        self.unserved_failures = 0  # requests naming a model not served: one count, not one entry per name

    def unserved(self) -> None:
        """A request named a model this server does not serve (its name is not kept: clients choose it)."""
        with self._lock:
            self.unserved_failures += 1

    def request(self, model: str, rows: int, total_ns: int, ok: bool, cancelled: bool = False,
                timing: Timing | None = None) -> None:
        """One request finished (successfully or not; `cancelled`: failed because its caller went away)
        after `total_ns` nanoseconds; `timing`, that of a successful one, counts in queue and compute."""
        with self._lock:
            stats = self._models[model]
            if ok:
                stats.success.add(total_ns)
                stats.inference_count += rows
                stats.last_inference_ms = time.time_ns() // 1_000_000
                if timing is not None:
                    stats.queue.add(timing.queue_ns)
                    stats.compute.add(timing.compute_ns)
            else:
                stats.fail.add(total_ns)
                stats.cancelled += cancelled

    def execution(self, model: str, batch_rows: int, compute_ns: int) -> None:
        """One model run of `batch_rows` rows in all (one request's or several merged), whether its
        requests then succeed or not, as Triton counts executions and batch statistics."""
        with self._lock:
            stats = self._models[model]
            stats.execution_count += 1
            stats.batches[batch_rows].add(compute_ns)

    def snapshot(self) -> dict[str, ModelStats]:
        """A consistent copy of every model's counters."""
        with self._lock:
            return {
                model: ModelStats(s.inference_count, s.execution_count, s.last_inference_ms, Duration(**vars(s.success)),
                                  Duration(**vars(s.fail)), Duration(**vars(s.queue)), Duration(**vars(s.compute)),
                                  {k: Duration(**vars(v)) for k, v in s.batches.items()}, s.cancelled)
                for model, s in self._models.items()
            }
