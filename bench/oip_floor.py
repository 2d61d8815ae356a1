"""The protocol floor: a minimal Open Inference Protocol server that only decodes the request, runs a
plain dense network and encodes the answer.

    python -m bench.oip_floor --port 0 --sizes 64,512,512,10 [--threads 1] [--workers 8] [--aio [executor]]

It prints `oip_floor serving on 127.0.0.1:PORT (pid N)` once listening and runs until SIGINT /
SIGTERM (or `--max-seconds`). ModelInfer reads `raw_input_contents[0]` as little-endian FP32 of the
input's shape, runs a bias-free ReLU MLP of `--sizes` (the architecture of registry's `mlp`, random
weights, no masks, no task selection, no validation beyond what numpy and torch do themselves) and
answers the logits as raw FP32 (`raw_output_contents`). Any model name is accepted; parameters are
ignored. It uses maskbank's generated stubs and the synchronous gRPC server `maskbank serve` used
before its grpc.aio front end (a thread pool of `--workers`, 64 MiB message limits), so what it
costs is the protocol and the dense compute, nothing else. ServerLive/ServerReady/ModelReady answer
true.

With `--aio` it is instead a `grpc.aio` server that runs the forward inline on its event loop: the
least a Python gRPC server can spend per request (no thread hand-off at all), which blocks the loop
while it computes and so is no design for a real server; benchmarks use it as the ceiling of what
any Python gRPC front end could reach on the machine. With `--aio executor` the aio server hands
each forward to a thread pool of `--workers` (`loop.run_in_executor`), the textbook way to keep the
loop free: what that hand-off costs is why maskbank computes small requests inline.

Benchmarks start it with `FloorProcess` (a child process, like maskbank.process.ServerProcess).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch
from torch import nn

from maskbank.parent import stop_with_parent
from maskbank.process import ChildServer
from serving._proto import pb, pb_grpc

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"oip_floor serving on (\S+):(\d+) ")


def dense_mlp(sizes: list[int], seed: int = 0) -> nn.Sequential:
    """Bias-free Linear layers with ReLU between them (registry's `mlp`), random weights, eval mode."""
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out, bias=False))
    return nn.Sequential(*layers).eval()


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, sizes: list[int]):
        self.net = dense_mlp(sizes)

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(request.inputs[0].shape))
        with torch.no_grad():
            logits = self.net(torch.from_numpy(x)).numpy()
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
        response.raw_output_contents.append(logits.tobytes())
        return response


class AsyncFloorServicer(FloorServicer):
    """The same answers from coroutines, computed inline on the event loop, or with `pool` in its threads."""

    def __init__(self, sizes: list[int], pool: futures.Executor | None = None):
        super().__init__(sizes)
        self.pool = pool

    async def ServerLive(self, request, context):
        return super().ServerLive(request, context)

    async def ServerReady(self, request, context):
        return super().ServerReady(request, context)

    async def ModelReady(self, request, context):
        return super().ModelReady(request, context)

    async def ModelInfer(self, request, context):
        if self.pool is None:
            return super().ModelInfer(request, context)
        return await asyncio.get_running_loop().run_in_executor(self.pool, super().ModelInfer, request, context)


LIMITS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _announce(host: str, port: int, sizes: list[int], kind: str) -> None:
    if port == 0:
        sys.exit(f"cannot listen on {host}:{port}")
    print(f"oip_floor serving on {host}:{port} (pid {os.getpid()}) sizes {sizes} {kind} "
          f"torch threads {torch.get_num_threads()}", flush=True)


def serve(host: str, port: int, sizes: list[int], workers: int, max_seconds: float) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=LIMITS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(sizes), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    _announce(host, bound, sizes, f"sync, {workers} workers")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait(max_seconds if max_seconds > 0 else None)
    server.stop(1).wait()


async def serve_aio(host: str, port: int, sizes: list[int], max_seconds: float, workers: int | None) -> None:
    """The aio server, computing inline, or on `workers` threads when given."""
    pool = futures.ThreadPoolExecutor(max_workers=workers) if workers else None
    server = grpc.aio.server(options=LIMITS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(AsyncFloorServicer(sizes, pool), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    _announce(host, bound, sizes, f"aio, forward on {workers} executor threads" if pool else "aio, forward inline")
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, done.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), max_seconds if max_seconds > 0 else None)
    await server.stop(1)


class FloorProcess(ChildServer):
    """`python -m bench.oip_floor` as a child process on a free loopback port."""

    name = "oip_floor"

    def __init__(self, sizes: list[int], threads: int = 1, workers: int = 8, max_seconds: float = 900.0,
                 aio: str | None = None, env: dict[str, str] | None = None):
        """aio: None (the synchronous floor), "inline" or "executor" (see the module's docstring);
        env: variables for the child on top of this process's environment."""
        command = [sys.executable, "-m", "bench.oip_floor", "--port", "0", "--sizes", ",".join(map(str, sizes)),
                   "--threads", str(threads), "--workers", str(workers), "--max-seconds", str(max_seconds),
                   *(["--aio", aio] if aio else [])]
        super().__init__(command, _LISTENING, cwd=str(ROOT), env=env)


def cli(argv: list[str] | None = None) -> None:  # not `main`: `python -m bench` runs every module with a main()
    parser = argparse.ArgumentParser(prog="python -m bench.oip_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed)")
    parser.add_argument("--sizes", default="64,512,512,10", help="MLP layer sizes (default 64,512,512,10)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--workers", type=int, default=8, help="gRPC handler threads (default 8, as maskbank serve)")
    parser.add_argument("--max-seconds", type=float, default=0, help="stop by itself after this long (0: never)")
    parser.add_argument("--aio", nargs="?", const="inline", choices=["inline", "executor"],
                        help="a grpc.aio server computing inline on its event loop (the Python gRPC ceiling), or "
                        "with 'executor' on --workers threads")
    args = parser.parse_args(argv)
    stop_with_parent()  # a benchmark killed mid-run leaves no floor server behind
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only request bytes
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.aio:
        asyncio.run(serve_aio(args.host, args.port, sizes, args.max_seconds,
                              args.workers if args.aio == "executor" else None))
    else:
        serve(args.host, args.port, sizes, args.workers, args.max_seconds)


if __name__ == "__main__":
    cli()
