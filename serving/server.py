"""The maskbank gRPC server: Open Inference Protocol, health, reflection, following the registry."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import ssl
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from registry import MaskbankError, Registry
from registry.names import check_name

from ._proto import POOL, pb, pb_grpc
from ._proto import maskbank_pb2 as mb
from ._proto import maskbank_pb2_grpc as mb_grpc
from .address import host_port, listen_problem
from .admission import Admission
from .auth import AdminAuthInterceptor
from .backends import BACKENDS, create_backend
from .compute_pool import ComputePool
from .errors import ShuttingDown
from .logs import flush_flood_logs, quiet_answers_not_sent
from .maskbank_servicer import MaskbankServicer
from .memory import DEFAULT_CACHE_SHARE, check_cache_setting, resolve_cache_bytes
from .metrics import MetricsServer
from .repository import ModelRepository
from .servicer import InferenceServicer
from .statistics import Statistics
from .status import ErrorInterceptor
from .task_inference import MAX_SHORTLIST, mode_names, needs_gradients

log = logging.getLogger("maskbank.serving")
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MASKBANK_SERVICE = mb.DESCRIPTOR.services_by_name["Maskbank"].full_name
DEFAULT_METRICS_PORT = 8002  # as Triton
INT32_MAX = 2**31 - 1  # gRPC's integer options are signed 32-bit
MAX_MESSAGE_BYTES = INT32_MAX
# Below this a server refuses most of what it is asked (a row of 1,024 float features is 4 KiB; a model's
# metadata, config and task list take hundreds of bytes): a limit so low is a missing unit ("64" for 64MiB).
MIN_MESSAGE_BYTES = 4 << 10
MAX_THREADS = 1024  # --threads: 100,000 made OpenMP run out of memory; beyond, torch's C integer overflowed
LIFO_AFTER_MS = 100.0  # a compute pool queue whose oldest request waited this long stands: newest first
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1  # protobuf's unsigned integer fields (INT32_MAX above: the signed)
MAX_PRIORITY_LEVELS = 1000  # --priority-levels: a queue each, looked through for work (Triton's configs use a few)
MAX_QUEUE_DELAY_US = 1_000_000  # --max-queue-delay-us: beyond, every request waits longer than clients do
MIN_POLL_SECONDS, MAX_POLL_SECONDS = 0.01, 86400.0  # --poll-interval: shorter keeps a core busy; longer is no follow


@dataclass
class ServerConfig:
    registry: str
    host: str = "127.0.0.1"
    port: int = 8001  # 0 picks a free port
    poll_interval: float = 1.0  # seconds between registry checks for new generations
    task_inference: str = "exhaustive"  # default GN mode when a request names no task
    task_shortlist: int = 1  # default `task_shortlist` of the gradient GN modes (candidates checked by entropy)
    # bound of the effective-weight LRU cache: bytes, or a share of the memory the weights live in (serving/memory.py)
    cache_bytes: int | str = DEFAULT_CACHE_SHARE
    workers: int = 8  # threads for the RPCs that are not coroutines (gRPC's migration thread pool)
    torch_threads: int | None = None  # intra-op threads for inference, torch's and ONNX Runtime's (default: theirs)
    backend: str = "pytorch"  # what runs forwards: pytorch or onnxruntime (gradient-based GN always runs on pytorch)
    device: str = "cpu"  # where PyTorch runs: cpu, cuda or cuda:N (backbones and cached weights live there)
    max_batch_size: int = 1024  # rows per request (and per batched execution)
    max_queue_delay_us: int = 0  # how long the batcher waits to fill a batch (0: no batching delay)
    instances: int = 2  # batches of one (model, task) that may run at once (Triton's instance count)
    max_queue_size: int = 0  # per model: inference requests held at once, waiting or computing; more get UNAVAILABLE
    default_timeout_us: int = 0  # the longest a request may wait for the compute pool unless its `timeout` says (0: none)
    # the compute pool takes its newest request first once its oldest waited this long (0: never; None: 100 ms
    # without --max-queue-size, never with it: see `lifo_after`)
    lifo_after_ms: float | None = None
    priority_levels: int = 0  # Triton's: requests' `priority` 1..N orders the compute pool (0: one level, priority ignored)
    default_priority_level: int = 0  # the level of requests without a priority (0: the lowest, N)
    max_message_bytes: int = 64 << 20  # largest request and response, in bytes (gRPC's own default: 4 MiB in)
    grace_seconds: float = 5.0  # how long a graceful stop lets running calls finish
    # how long a graceful stop keeps serving with health NOT_SERVING first, so that readiness checks (a
    # Kubernetes readinessProbe) take the replica out of rotation before it refuses new calls
    drain_seconds: float = 0.0
    max_connection_age: float = 0.0  # seconds before a client connection is closed (GOAWAY) to rebalance; 0: never
    max_concurrent_streams: int = 0  # calls one client connection may have open at once (HTTP/2); 0: gRPC's default
    models: list[str] | None = None  # serve only these models of the registry (None: all, and those published later)
    # Prometheus metrics port: None = 8002 (Triton's), or a free port when `port` is 0; 0 = a free port;
    # negative = no metrics endpoint. Bound on `host`, like gRPC.
    metrics_port: int | None = None
    admin_token: str | None = None  # bearer token for load/unload; None or "": admin calls are refused (blank: an error)
    tls_cert: str | None = None  # PEM certificate (chain) file; with tls_key, gRPC is served over TLS
    tls_key: str | None = None  # PEM private key file (unencrypted)

    def __post_init__(self):
        if self.task_inference not in mode_names():
            raise ValueError(f"unknown task inference mode '{self.task_inference}' (known: {', '.join(mode_names())})")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be from 0 (a free port) to 65535, got {self.port}")
        if self.metrics_port is not None and self.metrics_port > 65535:
            raise ValueError(f"--metrics-port must be at most 65535 (0: a free port; negative: no metrics endpoint), "
                             f"got {self.metrics_port}")
        if not 1 <= self.task_shortlist <= MAX_SHORTLIST:
            raise ValueError(f"--task-shortlist must be from 1 to {MAX_SHORTLIST}, got {self.task_shortlist}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend '{self.backend}' (known: {', '.join(BACKENDS)})")
        check_device(self.device)
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_cert else ("--tls-key", "--tls-cert")
            raise ValueError(f"{given} was given without {missing}: TLS needs both the certificate and its private key "
                             "(or neither, for plaintext)")
        if not MIN_MESSAGE_BYTES <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            hint = " (a number without a unit is bytes: 16MiB, not 16)" if self.max_message_bytes < MIN_MESSAGE_BYTES else ""
            raise ValueError(f"--max-message-bytes must be from {MIN_MESSAGE_BYTES} (4KiB) to {MAX_MESSAGE_BYTES} "
                             f"(2 GiB - 1, gRPC's limit), got {self.max_message_bytes}{hint}")
        # the most: what the field of Triton's ModelConfig that reports it holds (a larger value made every
        # ModelConfig call INTERNAL), or what the server can keep (a deque per priority level)
        for flag, value, least, most in (("--instances", self.instances, 1, INT32_MAX),
                                         ("--workers", self.workers, 1, None),
                                         ("--max-batch-size", self.max_batch_size, 1, INT32_MAX),
                                         ("--max-queue-delay-us", self.max_queue_delay_us, 0, None),
                                         ("--max-queue-size", self.max_queue_size, 0, UINT32_MAX),
                                         ("--default-timeout-us", self.default_timeout_us, 0, UINT64_MAX),
                                         ("--lifo-after-ms", self.lifo_after_ms or 0, 0, None),
                                         ("--priority-levels", self.priority_levels, 0, MAX_PRIORITY_LEVELS)):
            if value < least:
                raise ValueError(f"{flag} must be at least {least}, got {value}")
            if most is not None and value > most:
                raise ValueError(f"{flag} must be at most {most:,}, got {value:,}")
        if self.max_queue_delay_us > MAX_QUEUE_DELAY_US:  # every task-given request would wait it out
            raise ValueError(f"--max-queue-delay-us must be at most {MAX_QUEUE_DELAY_US:,} (1 s), got "
                             f"{self.max_queue_delay_us:,}: a request waits up to this long for company (Triton's "
                             "are a few hundred microseconds)")
        check_cache_setting(self.cache_bytes)
        if isinstance(self.cache_bytes, str):
            resolve_cache_bytes(self.cache_bytes, check_device(self.device))  # a share too small for anything fails here
        if not 0 <= self.default_priority_level <= self.priority_levels:
            raise ValueError(f"--default-priority-level must be from 1 to --priority-levels ({self.priority_levels}), "
                             f"got {self.default_priority_level}" if self.priority_levels else
                             "--default-priority-level needs --priority-levels: without levels every request has one")
        if self.torch_threads is not None and not 0 <= self.torch_threads <= MAX_THREADS:
            raise ValueError(f"--threads must be from 0 (torch's and ONNX Runtime's own choice) to {MAX_THREADS}, "
                             f"got {self.torch_threads}")
        if not MIN_POLL_SECONDS <= self.poll_interval <= MAX_POLL_SECONDS:  # NaN too
            raise ValueError(f"--poll-interval must be from {MIN_POLL_SECONDS:g} to {MAX_POLL_SECONDS:g} seconds (a day), "
                             f"got {self.poll_interval:g}: shorter keeps a core busy polling, and infinity stopped the "
                             "polls for good (RepositoryModelLoad loads a model at once in any case)")
        if not 0 <= self.grace_seconds <= 3600:  # `not`: NaN too; infinity would hold a stop by an idle client forever
            raise ValueError(f"--grace-seconds must be from 0 to 3600, got {self.grace_seconds}")
        if not 0 <= self.drain_seconds <= 3600:
            raise ValueError(f"--drain-seconds must be from 0 to 3600, got {self.drain_seconds}")
        if not 0 <= self.max_concurrent_streams <= INT32_MAX:
            raise ValueError(f"--max-concurrent-streams must be from 0 (gRPC's default) to {INT32_MAX}, "
                             f"got {self.max_concurrent_streams}")
        if not 0 <= self.max_connection_age <= INT32_MAX // 1000:  # gRPC takes it in milliseconds
            raise ValueError(f"--max-connection-age must be from 0 (never) to {INT32_MAX // 1000} seconds, "
                             f"got {self.max_connection_age}")
        for model in self.models or ():
            try:
                check_name("model", model)
            except MaskbankError as error:
                raise ValueError(f"--model: {error}") from None
        if self.admin_token and not self.bearer_token:
            raise ValueError("--admin-token (or MASKBANK_ADMIN_TOKEN) is only whitespace: give a token, or leave it "
                             "unset (empty) to refuse admin calls")
        if any(c.isspace() for c in self.bearer_token or ""):
            raise ValueError("--admin-token (or MASKBANK_ADMIN_TOKEN) contains whitespace, which a client cannot send "
                             "in 'authorization: Bearer TOKEN'; use a token without spaces")
        if self.tls:
            tls_key_pair(self.tls_cert, self.tls_key)  # unreadable or mismatched files fail here, clearly

    @property
    def bearer_token(self) -> str | None:
        """The admin token as clients send it ('authorization: Bearer TOKEN'): without the whitespace
        around it, such as the newline a token read from a secret file ends with, which no client could
        ever match; None (admin calls refused) when there is none."""
        return (self.admin_token or "").strip() or None

    @property
    def lifo_after(self) -> float | None:
        """Seconds after which the compute pool serves a standing queue newest first, or None: arrival order
        always. By default LIFO_AFTER_MS without --max-queue-size, and never with it: a bound keeps waits
        short in arrival order, and newest first would let the oldest requests of a full queue wait on."""
        ms = self.lifo_after_ms if self.lifo_after_ms is not None else 0 if self.max_queue_size else LIFO_AFTER_MS
        return ms / 1000 if ms else None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def metrics_listen_port(self) -> int | None:
        """The port to serve metrics on (0: a free one), or None for no metrics endpoint."""
        if self.metrics_port is None:
            return 0 if self.port == 0 else DEFAULT_METRICS_PORT
        return None if self.metrics_port < 0 else self.metrics_port


def check_device(name: str) -> torch.device:
    """The PyTorch device `name` (cpu, cuda, cuda:N), or ValueError saying why this machine cannot serve on it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device '{name}' is not a device name PyTorch knows; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device '{name}': maskbank serves on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device '{name}': PyTorch {torch.__version__} ({build}) sees no CUDA GPU on this "
                             "machine; serve with --device cpu, or install a CUDA build of PyTorch where a GPU is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device '{name}': this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    return device


def describe_device(device: torch.device) -> str:
    """`device` for a person: the GPU's name where it is one."""
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


def package_version() -> str:
    try:
        return version("maskbank")
    except PackageNotFoundError:
        return "unknown"


ANSWER_SECONDS = 0.5  # after the grace period, how long gRPC gets to send the answers of the calls refused
REGISTRY_STOP_SECONDS = 1.0  # how long a stop waits for a registry poll under way before it goes on without it
SIGNAL_POLL_SECONDS = 0.1  # how often serve_forever looks whether a signal came


class InferenceServer:
    """Owns the gRPC server, the model repository and the follower thread."""

    def __init__(self, config: ServerConfig):
        self.config = config
        quiet_answers_not_sent()  # a client gone as its answer went out is no server error
        # torch's intra-op thread count is a setting of each thread: set in every thread that runs torch
        # (the main thread's reached none of them, whose forwards then summed in another order than training)
        self._pin_threads = functools.partial(torch.set_num_threads, config.torch_threads) if config.torch_threads else None
        if self._pin_threads is not None:
            self._pin_threads()
        self.cache_bound = resolve_cache_bytes(config.cache_bytes, check_device(config.device))
        self.repository = ModelRepository(Registry(config.registry), self.cache_bound.bytes,
                                          gradients=needs_gradients(config.task_inference), device=config.device,
                                          only=config.models)
        self.statistics = Statistics()
        self.servicer = InferenceServicer(
            self.repository, self.statistics, version=package_version(), default_mode=config.task_inference,
            default_shortlist=config.task_shortlist,
            max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
            backend=create_backend(config.backend, threads=config.torch_threads),
            instances=config.instances, admission=Admission(config.max_queue_size),
            default_timeout_us=config.default_timeout_us,
            compute=ComputePool(os.cpu_count() or 1, config.lifo_after, max(1, config.priority_levels),
                                initializer=self._pin_threads),
            priority_levels=config.priority_levels, default_priority_level=config.default_priority_level,
            max_message_bytes=config.max_message_bytes,
        )
        self.health = health_aio.HealthServicer()
        self._credentials = None
        if config.tls:
            self._credentials = grpc.ssl_server_credentials([tls_key_pair(config.tls_cert, config.tls_key)])
        self.metrics = MetricsServer(self.repository, self.statistics, config.backend, self.servicer.admission,
                                     self.servicer.timeouts, self.servicer.compute)
        self.port: int | None = None
        self.metrics_port: int | None = None  # None: no metrics endpoint
        self._stopped = threading.Event()
        self._terminated = threading.Event()
        self._now = asyncio.Event()  # set by stop_now (on the loop): a graceful stop ends at once, its drain included
        # grpc.aio serves from an event loop; it runs on a thread of its own so that start, stop and
        # wait keep their blocking API for callers on ordinary threads.
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run_loop, name="maskbank-grpc", daemon=True).start()
        self.server = self._on_loop(self._build())

    def _run_loop(self) -> None:
        """The event loop's thread, where small forwards run inline."""
        if self._pin_threads is not None:
            self._pin_threads()
        self._loop.run_forever()

    def _on_loop(self, coroutine):
        """Run `coroutine` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build(self) -> grpc.aio.Server:
        """The grpc.aio server with every service registered (built on the loop that will run it)."""
        config = self.config
        limits = [("grpc.max_receive_message_length", config.max_message_bytes),
                  ("grpc.max_send_message_length", config.max_message_bytes),
                  # gRPC's default on Linux lets a second server bind a port already served and take a
                  # share of its new connections, silently: a taken --port must be an error instead
                  ("grpc.so_reuseport", 0)]
        if config.max_concurrent_streams:  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: excess calls never reach the loop
            limits.append(("grpc.max_concurrent_streams", config.max_concurrent_streams))
        if config.max_connection_age:  # GOAWAY after this long; calls under way get the graceful stop's grace
            limits += [("grpc.max_connection_age_ms", max(1, round(1000 * config.max_connection_age))),
                       ("grpc.max_connection_age_grace_ms", min(INT32_MAX, round(1000 * config.grace_seconds)))]
        server = grpc.aio.server(
            # daemon threads (concurrent.futures' are joined at exit): a call still running after the stop (a
            # sync handler waiting for the stopped loop) must not keep the process alive for ever
            ComputePool(config.workers, name="maskbank-rpc"),
            # Authorisation first: a refused admin call never reaches the servicer.
            interceptors=[AdminAuthInterceptor(config.bearer_token), ErrorInterceptor()], options=limits,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        self.maskbank = MaskbankServicer(self.repository, self.servicer)
        mb_grpc.add_MaskbankServicer_to_server(self.maskbank, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for module in (health_pb2, reflection_pb2):  # reflection answers from maskbank's pool
            _add_to_pool(module.DESCRIPTOR)
        services = (INFERENCE_SERVICE, MASKBANK_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server, pool=POOL)
        return server

    def start(self) -> int:
        """Bind, load the registry's models, start serving and following; return the bound port. The
        ports are taken first, so that one in use is an error at once, not after every model loaded."""
        config = self.config
        address = host_port(config.host, config.port)
        problem = listen_problem(config.host, config.port)
        try:
            if problem is None and self._credentials is not None:
                self.port = self.server.add_secure_port(address, self._credentials)
            elif problem is None:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio's "Failed to bind": taken since the look, say
            problem = "the port is taken, or the address is not one of this machine's: pick another --port, or 0"
        metrics_port = config.metrics_listen_port()
        try:
            if problem is not None:
                raise OSError(f"cannot listen on {address} ({problem})")
            if metrics_port is not None:
                self.metrics_port = self.metrics.start(config.host, metrics_port)
            self.repository.registry.check_location(must_exist=False)  # an S3 bucket that does not exist: never a registry
            self.repository.refresh()
        except BaseException:  # nothing served yet: release the ports and the loop's thread
            self.metrics.stop()
            self._on_loop(self.server.stop(None))
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._on_loop(self._serve())
        self.repository.follow(self.config.poll_interval, self._pin_threads)
        log.info("models: %s", ", ".join(self.repository.models()) or "none yet")
        if not self.repository.models() and not config.models:
            if failing := self.repository.failing():
                log.warning("registry %s holds no model that loads: %s could not be loaded (the errors above); a "
                            "model is served once a generation of it loads (checked every %g s)",
                            self.repository.registry.location, ", ".join(map(repr, failing)), config.poll_interval)
            else:
                log.warning("registry %s holds no loadable model (nothing published there yet, or not the "
                            "--registry meant?): a model is served once a generation of it is published there "
                            "(checked every %g s)", self.repository.registry.location, config.poll_interval)
        if waiting := sorted(set(config.models or ()) - set(self.repository.models())):
            held = ", ".join(self.repository.registry.published_models()) or "none"
            log.warning("not serving %s yet (--model): not in registry %s (it holds: %s), or not loadable (see "
                        "above); a model is served once a loadable generation of it is published, and the server is "
                        "not ready (ServerReady, health NOT_SERVING) until then",
                        ", ".join(map(repr, waiting)), self.repository.registry.location, held)
        self._log_limits()
        self._log_grpc()
        self._log_security()
        return self.port

    async def _serve(self) -> None:
        await self.server.start()
        self.servicer.ready = True
        await self._set_health()
        self.repository.add_listener(self._health_changed)

    def _health_changed(self) -> None:
        """A repository listener (any thread): health follows what is served. Not once the server stops: its
        loop no longer runs, and a poll that ends after the stop left a coroutine never awaited."""
        if not self._stopped.is_set():
            asyncio.run_coroutine_threadsafe(self._set_health(), self._loop)

    async def _set_health(self) -> None:
        """SERVING, or NOT_SERVING while a model named with --model is not served (readiness probes then
        keep traffic away from a replica that would answer NOT_FOUND), as ServerReady says. A stopping
        server's NOT_SERVING stays (the health servicer ignores changes once it is shutting down)."""
        status = health_pb2.HealthCheckResponse
        serving = status.NOT_SERVING if self.repository.awaited() else status.SERVING
        for service in ("", INFERENCE_SERVICE, MASKBANK_SERVICE):
            await self.health.set(service, serving)

    def _log_limits(self) -> None:
        """One line with the settings that shape load behaviour, so an operator can check what a replica runs."""
        config = self.config
        limits = {"max_batch_size": config.max_batch_size, "max_queue_delay_us": config.max_queue_delay_us,
                  "instances": config.instances, "max_queue_size": config.max_queue_size,
                  "default_timeout_us": config.default_timeout_us,
                  "lifo_after_ms": 1000 * config.lifo_after if config.lifo_after else 0,
                  "priority_levels": config.priority_levels,
                  "cache_bytes": self.cache_bound.bytes, "max_message_bytes": config.max_message_bytes,
                  "max_connection_age": config.max_connection_age,
                  "max_concurrent_streams": config.max_concurrent_streams, "task_inference": config.task_inference,
                  "task_shortlist": config.task_shortlist}
        log.info("limits: %s", ", ".join(f"{key} {value}" for key, value in limits.items()), extra=limits)
        bound = self.cache_bound
        log.info("weight cache: up to %s", bound.describe(), extra={
            "cache_bytes": bound.bytes, "cache_share": bound.share,
            "memory_bytes": bound.memory and bound.memory.bytes, "memory_source": bound.memory and bound.memory.source})

    @staticmethod
    def _log_grpc() -> None:
        """gRPC's version and the experiments its environment turned on or off (maskbank serve sets one)."""
        experiments = os.environ.get("GRPC_EXPERIMENTS")
        log.info("gRPC %s, experiments: %s", grpc.__version__,
                 f"GRPC_EXPERIMENTS={experiments}" if experiments else "gRPC's defaults",
                 extra={"grpc_version": grpc.__version__, "grpc_experiments": experiments})

    def _log_security(self) -> None:
        config = self.config
        if config.admin_token and config.bearer_token != config.admin_token:
            log.warning("the admin token (--admin-token or MASKBANK_ADMIN_TOKEN) has whitespace around it, such as "
                        "the newline of a secret file, which no client can send: it is used without it")
        if not config.bearer_token:
            log.info("admin calls (model load/unload) are refused: the server was started without --admin-token")
        elif not config.tls and not _loopback(config.host):
            log.warning("the admin token travels in clear text: %s is not a loopback address and TLS is off "
                        "(--tls-cert/--tls-key)", config.host)

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        return f"http://{host_port(self.config.host, self.metrics_port)}/metrics"

    def stop(self) -> None:
        """Graceful stop: report NOT_SERVING, keep serving for the drain period, let running calls finish
        (up to the grace period), stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._on_loop(self._drain())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._terminated.set()
        self.servicer.compute.shutdown()
        self.servicer.admin.shutdown(wait=False, cancel_futures=True)  # a load waiting for a hung registry
        self.repository.close(timeout=REGISTRY_STOP_SECONDS)
        self.metrics.stop()  # last: metrics stay scrapable while calls drain
        flush_flood_logs()  # the counts of refusals and error answers held back for their next summary line
        log.info("stopped")

    async def _drain(self) -> None:
        self.servicer.ready = False
        await self.health.enter_graceful_shutdown()
        if self.config.drain_seconds:  # still serving, but unready: balancers and probes move away first
            log.info("draining: health NOT_SERVING, still serving calls for %g s (--drain-seconds)", self.config.drain_seconds)
            with contextlib.suppress(TimeoutError):  # stop_now ends it early
                await asyncio.wait_for(self._now.wait(), self.config.drain_seconds)
        stopping = asyncio.ensure_future(self.server.stop(self.config.grace_seconds + ANSWER_SECONDS))
        self._close_streams()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), self.config.grace_seconds)
        if not stopping.done():
            self._refuse_waiting("its grace period (--grace-seconds) ended")
        await stopping

    def stop_now(self) -> None:
        """End a graceful stop now (a second SIGINT or SIGTERM): the calls waiting for the compute pool are
        answered UNAVAILABLE, the others cancelled. From any thread, a signal handler's included."""
        log.warning("stopping now (signalled again): calls still waiting are answered UNAVAILABLE, running ones cancelled")

        def now() -> None:
            self._now.set()
            self._close_streams()
            self._refuse_waiting("it was stopped at once")
            asyncio.ensure_future(self.server.stop(ANSWER_SECONDS))

        self._loop.call_soon_threadsafe(now)

    def _close_streams(self) -> None:
        """Streams stop reading and end with UNAVAILABLE once they answered what they hold, watches at once:
        neither holds the stop for the whole grace period, nor takes requests it may not finish."""
        self.servicer.close_streams()
        self.maskbank.close_watches()

    def _refuse_waiting(self, why: str) -> None:
        refused = self.servicer.compute.refuse_waiting(ShuttingDown(
            f"the server is shutting down and {why} before this request was computed; retry (another replica)"))
        if refused:
            log.warning("stopping: %d request(s) still waiting for the compute pool answered UNAVAILABLE (%s)",
                        refused, why)

    def wait(self) -> None:
        """Block until the server has stopped."""
        self._terminated.wait()


def tls_key_pair(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """(private key, certificate chain) PEM bytes for `grpc.ssl_server_credentials`, checked with OpenSSL
    first so that a missing file, a non-PEM file, an encrypted key or a key that does not match the
    certificate is a ValueError naming both files (gRPC itself would only fail to bind)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=lambda: b"")
        with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
            return key.read(), cert.read()
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot use --tls-cert {cert_file} with --tls-key {key_file}: {error} (both must be PEM "
                         "files, the key unencrypted and matching the certificate)") from error


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _add_to_pool(file_descriptor) -> None:
    try:
        POOL.FindFileByName(file_descriptor.name)
    except KeyError:
        POOL.AddSerializedFile(file_descriptor.serialized_pb)


def serve_forever(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully; SIGHUP polls the registry at once. Prints the
    address once listening."""
    server = InferenceServer(config)
    port = server.start()
    # The handler only appends: it takes no lock, since a second signal may interrupt it (a handler
    # that set a threading.Event deadlocked on its lock when a SIGINT came in the middle of a SIGTERM's).
    signals: list[int] = []
    polls: list[int] = []  # SIGHUPs: look at the registry now (a daemon's reload signal; its default killed the server)
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the address is printed: a caller may signal once it reads it
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    signal.signal(signal.SIGHUP, lambda signum, frame: polls.append(signum))
    details = [f"pid {os.getpid()}", describe_device(server.repository.device)] + (["TLS"] if config.tls else [])
    details.append(f"metrics on {server.metrics_url}" if server.metrics_url else "metrics off")
    # maskbank.process.ServerProcess reads this line: keep "maskbank serving ... on HOST:PORT (" intact.
    print(f"maskbank serving {config.registry} on {host_port(config.host, port)} ({'; '.join(details)})", flush=True)
    log.info("listening on %s", host_port(config.host, port),
             extra={"port": port, "metrics_port": server.metrics_port, "tls": config.tls})
    while not signals:
        if polls:
            polls.clear()
            log.info("SIGHUP: polling the registry now")
            server.repository.poll_now()
        time.sleep(SIGNAL_POLL_SECONDS)
    stopping = threading.Thread(target=server.stop, name="maskbank-stop")
    stopping.start()
    while stopping.is_alive():
        if len(signals) > 1:  # a second signal while stopping: stop now
            server.stop_now()
            break
        stopping.join(SIGNAL_POLL_SECONDS)
    stopping.join()
