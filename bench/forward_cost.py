"""Where a served forward pass spends its time, in-process (no gRPC): a plain module holding the
task's effective weights, torch.func.functional_call, registry.forward (eval switch + BatchNorm
counters + functional_call), Snapshot.forward (serving's BoundModule: slots found once) and
Snapshot.logits (Snapshot.forward plus the effective-weight cache lookup); and, to see what the
server adds around the forward, the whole ModelInfer handler called directly on a parsed request
(maskbank's servicer: model lookup, validation, task selection, batcher, response with two outputs
and four parameters, statistics) beside the protocol floor's handler (bench/oip_floor.py: decode,
a dense forward, encode). No gRPC: that layer is the same for both.

One SupSup task on MLP 64-512-512-10 (1 epoch: the weights' values do not matter here), batch 1,
8 and 32, torch.set_num_threads(1); each measurement is a loop of calls, alternated A B C D and
repeated; medians (min-max) of the per-call time and of the ratio to the plain module.
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import numpy as np

from registry import Registry, build_architecture, forward
from serving._proto import pb
from serving.server import InferenceServer, ServerConfig
from trainer import train

from ._command import run_benchmark
from .oip_floor import FloorServicer

THREADS, CALLS, REPEATS = 1, 300, 7
ARCHITECTURE = {"arch": "mlp", "sizes": [64, 512, 512, 10]}
RESULTS = Path(__file__).parent / "results" / "forward_cost.json"


def per_call_us(fn) -> float:
    began = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - began) / CALLS * 1e6


def infer_request(batch: int) -> pb.ModelInferRequest:
    """A parsed GG request for task 0 of model m, raw FP32 input, as a client sends it."""
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="FP32", shape=[batch, ARCHITECTURE["sizes"][0]])
    request.raw_input_contents.append(np.random.default_rng(0).random((batch, ARCHITECTURE["sizes"][0]),
                                                                      dtype=np.float32).tobytes())
    request.parameters["task_id"].int64_param = 0
    return pb.ModelInferRequest.FromString(request.SerializeToString())


def measure(server: InferenceServer, batch: int) -> dict[str, dict[str, float]]:
    repository, servicer, floor = server.repository, server.servicer, FloorServicer(ARCHITECTURE["sizes"])
    request = infer_request(batch)
    snapshot = repository.get("m")
    task = snapshot.task(0)
    params = snapshot.parameters(task)
    module = build_architecture(snapshot.manifest.architecture).eval()
    plain = copy.deepcopy(module)
    plain.load_state_dict(dict(params))
    x = torch.rand(batch, 64, generator=torch.Generator().manual_seed(0))
    loop = asyncio.new_event_loop()
    runs = {
        "plain module": lambda: plain(x),
        "functional_call": lambda: torch.func.functional_call(module, params, (x,)),
        "registry.forward": lambda: forward(module, params, x),
        "Snapshot.forward": lambda: snapshot.forward(params, x),
        "Snapshot.logits": lambda: snapshot.logits(task, x),
        "ModelInfer handler, floor": lambda: floor.ModelInfer(request, None),
        # a coroutine under grpc.aio: run on a loop of its own, as the server's loop runs it
        "ModelInfer handler, maskbank": lambda: loop.run_until_complete(servicer.ModelInfer(request, None)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up
            per_call_us(run)
        for _ in range(REPEATS):
            for name, run in runs.items():
                times[name].append(per_call_us(run))
    loop.close()
    return {name: {"median_us": statistics.median(t),
                   "ratio": statistics.median(a / b for a, b in zip(t, times["plain module"])),
                   "ratio_min": min(a / b for a, b in zip(t, times["plain module"])),
                   "ratio_max": max(a / b for a, b in zip(t, times["plain module"]))} for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        train(registry, "m", 1, {"method": "supsup", "stream": "permuted-digits", "architecture": ARCHITECTURE,
                                 "method_config": {"epochs": 1}}, log=lambda _: None)
        server = InferenceServer(ServerConfig(registry=root, port=0, metrics_port=-1, torch_threads=THREADS))
        server.repository.refresh()
        results = {f"batch {b}": measure(server, b) for b in (1, 8, 32)}
        server.repository.close()
    print(f"In-process cost of one forward, MLP 64-512-512-10, torch.set_num_threads({THREADS}); "
          f"{REPEATS} alternating repetitions of {CALLS} calls\n")
    print("| batch | path | µs per call (median) | / plain module (median, min-max) |\n|---|---|---|---|")
    for batch, rows in results.items():
        for name, row in rows.items():
            print(f"| {batch} | {name} | {row['median_us']:.1f} | {row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "forward_cost", "threads": THREADS, "architecture": ARCHITECTURE,
                                   "results": results}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
