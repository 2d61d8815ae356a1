"""Prometheus metrics on their own HTTP port, read from the live server at scrape time.

Triton's per-model names (`nv_inference_*`, labelled `model` and `version`) so that dashboards and
alerts written for Triton work unchanged, plus maskbank's own: the effective-weight cache, and per
model the served generation, its task count and the tasks kept out of service.

Nothing is counted twice: `MaskbankCollector.collect()` reads `Statistics.snapshot()`, the cache's
`stats()` and the repository's snapshots when Prometheus scrapes, so there is no second set of
counters to keep in step. The collector is registered in its own `CollectorRegistry`, never in
prometheus_client's global one, so several servers can live in one process (tests) without clashing.

Naming: Triton's exposition has no `_total` suffix (`nv_inference_request_success{...} 3`), and
prometheus_client always appends `_total` to a counter's name. To keep Triton's exact names, the
`nv_inference_*` families are exposed untyped; they are cumulative counters all the same (use
`rate()`). maskbank's own counters follow the Prometheus convention and end in `_total`.

The Triton counters are cumulative per model since the server started (that is how `Statistics`
keeps them, and what ModelStatistics reports too); the `version` label is the generation served at
scrape time, so publishing a new generation starts a new series that carries the model's running
total on. Sum over `version` (or aggregate `by (model)`) for per-model rates across publishes.
Requests naming a model that is not served are not labelled by that client-supplied name (which
would let any client create series); they are counted in one unlabelled counter instead.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily

from registry import MaskbankError

from .address import host_port
from .admission import Admission
from .compute_pool import ComputePool
from .repository import ModelRepository
from .statistics import ModelStats, Statistics
from .timeouts import QueueTimeouts

log = logging.getLogger("maskbank.serving")

# Triton metric name, help text, and how to read it from a model's statistics.
TRITON_METRICS: tuple[tuple[str, str, object], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (rows; does not include cached requests)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (a batched run of several requests counts once)",
     lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative duration of successful inference requests in microseconds",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative time requests waited in the dynamic batcher's queue in microseconds",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     lambda s: s.compute.ns // 1000),
)


class MaskbankCollector:
    """Reads the server's live numbers every time Prometheus scrapes."""

    def __init__(self, repository: ModelRepository, statistics: Statistics, backend: str = "pytorch",
                 admission: Admission | None = None, timeouts: QueueTimeouts | None = None,
                 pool: ComputePool | None = None):
        self.repository = repository
        self.statistics = statistics
        self.backend = backend
        self.admission = admission or Admission()
        self.timeouts = timeouts or QueueTimeouts()
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        served = {}  # model -> its snapshot now; a model unloaded meanwhile is skipped
        for model in self.repository.models():
            try:
                served[model] = self.repository.get(model)
            except MaskbankError:
                continue
        counters = self.statistics.snapshot()
        yield from self._triton(served, counters)
        unserved = CounterMetricFamily(
            "maskbank_unserved_model_request_failure",
            "Inference requests that named a model (or version) this server does not serve (not labelled by the requested name)")
        unserved.add_metric([], self.statistics.unserved_failures)
        yield unserved
        yield from self._models(served, counters)
        failing = GaugeMetricFamily("maskbank_model_load_failing", "1 while the model's newest generation in the "
                                    "registry cannot be loaded (an older one, or none, is served: RepositoryIndex "
                                    "says why)", labels=["model"])
        broken = set(self.repository.failing())
        for model in sorted(broken | set(served)):  # 0 for the others: a series per model, as the other gauges
            failing.add_metric([model], int(model in broken))
        yield failing
        yield from self._admission(served)
        yield from self._pool()
        yield from self._cache()
        yield from self._gpu()
        info = GaugeMetricFamily("maskbank_server_info", "Always 1; the labels say where this server runs its "
                                 "forwards (--device) and with what (--backend)", labels=["device", "backend"])
        info.add_metric([str(self.repository.device), self.backend], 1)
        yield info

    def _triton(self, served, counters: dict[str, ModelStats]) -> Iterator[Metric]:
        empty = ModelStats()
        for name, documentation, read in TRITON_METRICS:
            family = UnknownMetricFamily(name, documentation, labels=["model", "version"])
            for model, snapshot in sorted(served.items()):
                family.add_metric([model, str(snapshot.generation)], read(counters.get(model, empty)))
            yield family

    def _models(self, served, counters: dict[str, ModelStats]) -> Iterator[Metric]:
        generation = GaugeMetricFamily("maskbank_model_generation", "Registry generation served now", labels=["model"])
        tasks = GaugeMetricFamily("maskbank_model_tasks", "Tasks in the served generation", labels=["model"])
        cancelled = CounterMetricFamily("maskbank_model_requests_cancelled",
                                        "Inference requests whose caller cancelled or whose deadline passed before "
                                        "the answer (also counted in nv_inference_request_failure)", labels=["model"])
        broken = GaugeMetricFamily("maskbank_model_tasks_out_of_service",
                                   "Tasks of the served generation kept out of service (their blobs failed to load "
                                   "or verify; requests for them get DATA_LOSS)", labels=["model"])
        for model, snapshot in sorted(served.items()):
            generation.add_metric([model], snapshot.generation)
            tasks.add_metric([model], len(snapshot.tasks))
            broken.add_metric([model], len(snapshot.out_of_service()))
            cancelled.add_metric([model], counters[model].cancelled if model in counters else 0)
        yield from (generation, tasks, broken, cancelled)

    def _admission(self, served) -> Iterator[Metric]:
        pending = GaugeMetricFamily("maskbank_model_requests_pending", "Inference requests for the model in the "
                                    "server now, waiting or computing (at most --max-queue-size where that is set)",
                                    labels=["model"])
        refused = CounterMetricFamily("maskbank_model_requests_refused", "Inference requests for the model refused "
                                      "with UNAVAILABLE because it held --max-queue-size already (also counted as "
                                      "failures)", labels=["model"])
        held, rejected = self.admission.pending(), self.admission.rejected()
        for model in sorted(served):
            pending.add_metric([model], held.get(model, 0))
            refused.add_metric([model], rejected.get(model, 0))
        yield from (pending, refused)
        yield CounterMetricFamily("maskbank_requests_dropped", "Inference requests answered DEADLINE_EXCEEDED without "
                                  "being computed: they waited for the compute pool past their timeout parameter "
                                  "(also counted as failures)", value=self.timeouts.dropped)

    def _pool(self) -> Iterator[Metric]:
        if self.pool is None:
            return
        yield GaugeMetricFamily("maskbank_compute_queue_requests", "Requests waiting for a compute pool thread now "
                                "(forwards too big to run on the event loop, and task inference)", value=self.pool.queued)
        yield CounterMetricFamily("maskbank_compute_newest_first", "Times the compute pool took its newest request "
                                  "first because its queue stood longer than --lifo-after-ms (adaptive LIFO)",
                                  value=self.pool.newest_first)

    def _cache(self) -> Iterator[Metric]:
        stats = self.repository.cache.stats()
        for name, documentation, value in (
            ("maskbank_cache_hits", "Effective-weight cache lookups that found the task's weights", stats.hits),
            ("maskbank_cache_misses", "Effective-weight cache lookups that had to materialise the task's weights",
             stats.misses),
            ("maskbank_cache_evictions", "Entries evicted from the effective-weight cache to stay under its bound",
             stats.evictions),
            ("maskbank_cache_rejections", "Misses whose weights the full cache did not keep (used no more often "
             "than the entries they would evict); computed in per-thread buffers instead", stats.rejections),
        ):
            yield CounterMetricFamily(name, documentation, value=value)
        for name, documentation, value in (
            ("maskbank_cache_bytes", "Bytes held by the effective-weight cache", stats.bytes),
            ("maskbank_cache_capacity_bytes", "Bound of the effective-weight cache in bytes (--cache-bytes)",
             stats.capacity_bytes),
            ("maskbank_cache_entries", "Entries (task weights) in the effective-weight cache", stats.entries),
        ):
            yield GaugeMetricFamily(name, documentation, value=value)

    def _gpu(self) -> Iterator[Metric]:
        """On a CUDA device (--device cuda): its memory, and how much of it this server's PyTorch holds
        (the backbones, the tasks' packed masks and the cached weights). Nothing on the CPU."""
        device = self.repository.device
        if device.type != "cuda":
            return
        index = 0 if device.index is None else device.index  # plain `cuda` is the first GPU
        free, total = torch.cuda.mem_get_info(index)
        for name, documentation, value in (
            ("maskbank_gpu_memory_total_bytes", "Memory of the GPU this server runs on", total),
            ("maskbank_gpu_memory_used_bytes", "Memory in use on that GPU, by any process (total minus free)",
             total - free),
            ("maskbank_gpu_memory_allocated_bytes", "GPU memory held by this server's tensors",
             torch.cuda.memory_allocated(index)),
            ("maskbank_gpu_memory_reserved_bytes", "GPU memory PyTorch's caching allocator holds for this server "
             "(allocated, plus freed blocks kept for reuse)", torch.cuda.memory_reserved(index)),
        ):
            family = GaugeMetricFamily(name, documentation, labels=["device"])
            family.add_metric([f"cuda:{index}"], value)
            yield family


class MetricsServer:
    """The metrics HTTP endpoint (`GET /metrics`, Prometheus text format) in a daemon thread."""

    def __init__(self, repository: ModelRepository, statistics: Statistics, backend: str = "pytorch",
                 admission: Admission | None = None, timeouts: QueueTimeouts | None = None,
                 pool: ComputePool | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MaskbankCollector(repository, statistics, backend, admission, timeouts, pool))
        self._httpd = None
        self._thread = None
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        """Listen on `host`:`port` (0: a free port); return the bound port."""
        try:
            # an IPv6 literal may come bracketed (--host '[::1]', as gRPC takes it); the HTTP server wants it bare
            self._httpd, self._thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host_port(host, port)} ({error.strerror or error}): pick another "
                          "--metrics-port, 0 for a free one, or -1 to turn metrics off") from error
        self.port = self._httpd.server_port
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None
