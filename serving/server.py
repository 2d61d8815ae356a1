"""The maskbank gRPC server: Open Inference Protocol, health, reflection, following the registry."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from registry import Registry

from ._proto import POOL, pb, pb_grpc
from ._proto import maskbank_pb2 as mb
from ._proto import maskbank_pb2_grpc as mb_grpc
from .maskbank_servicer import MaskbankServicer
from .repository import ModelRepository
from .servicer import InferenceServicer
from .statistics import Statistics
from .status import ErrorInterceptor
from .task_inference import mode_names

log = logging.getLogger("maskbank.serving")
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MASKBANK_SERVICE = mb.DESCRIPTOR.services_by_name["Maskbank"].full_name


@dataclass
class ServerConfig:
    registry: str
    host: str = "127.0.0.1"
    port: int = 8001  # 0 picks a free port
    poll_interval: float = 1.0  # seconds between registry checks for new generations
    task_inference: str = "exhaustive"  # default GN mode when a request names no task
    cache_bytes: int = 256 << 20  # bound of the effective-weight LRU cache
    workers: int = 8  # gRPC handler threads
    torch_threads: int | None = None  # intra-op threads for inference (default: torch's)
    max_batch_size: int = 1024  # rows per request (and per batched execution)
    max_queue_delay_us: int = 0  # how long the batcher waits to fill a batch (0: no batching delay)
    max_message_bytes: int = 64 << 20
    grace_seconds: float = 5.0

    def __post_init__(self):
        if self.task_inference not in mode_names():
            raise ValueError(f"unknown task inference mode '{self.task_inference}' (known: {', '.join(mode_names())})")


def package_version() -> str:
    try:
        return version("maskbank")
    except PackageNotFoundError:
        return "unknown"


class InferenceServer:
    """Owns the gRPC server, the model repository and the follower thread."""

    def __init__(self, config: ServerConfig):
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.repository = ModelRepository(Registry(config.registry), config.cache_bytes)
        self.statistics = Statistics()
        self.servicer = InferenceServicer(
            self.repository, self.statistics, version=package_version(), default_mode=config.task_inference,
            max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
        )
        self.health = health.HealthServicer()
        limits = [("grpc.max_receive_message_length", config.max_message_bytes),
                  ("grpc.max_send_message_length", config.max_message_bytes)]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="maskbank-rpc"),
            interceptors=[ErrorInterceptor()], options=limits,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        mb_grpc.add_MaskbankServicer_to_server(MaskbankServicer(self.repository, self.servicer), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for module in (health_pb2, reflection_pb2):  # reflection answers from maskbank's pool
            _add_to_pool(module.DESCRIPTOR)
        services = (INFERENCE_SERVICE, MASKBANK_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server, pool=POOL)
        self.port: int | None = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Load the registry's models, bind, start serving and following; return the bound port."""
        self.repository.refresh()
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        self.server.start()
        self.repository.follow(self.config.poll_interval)
        self.servicer.ready = True
        for service in ("", INFERENCE_SERVICE, MASKBANK_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("models: %s", ", ".join(self.repository.models()) or "none yet")
        return self.port

    def stop(self) -> None:
        """Graceful stop: report NOT_SERVING, let running calls finish (up to the grace period), stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.servicer.ready = False
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.grace_seconds).wait()
        self.repository.close()
        log.info("stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def _add_to_pool(file_descriptor) -> None:
    try:
        POOL.FindFileByName(file_descriptor.name)
    except KeyError:
        POOL.AddSerializedFile(file_descriptor.serialized_pb)


def serve_forever(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully. Prints the address once listening."""
    server = InferenceServer(config)
    port = server.start()
    print(f"maskbank serving {config.registry} on {config.host}:{port} (pid {os.getpid()})", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
