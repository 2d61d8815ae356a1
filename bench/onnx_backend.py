"""ONNX Runtime vs PyTorch backend: requests/s of `maskbank serve --backend onnxruntime` against
`--backend pytorch` over the same registry, for one task and for a random task of MIX_TASKS, plus the
in-process measurement that chose how the ONNX Runtime backend supplies a task's weights.

Two networks, each SupSup with one trained task (one epoch: the values do not matter here) and
synthetic tasks up to MIX_TASKS (random supermasks at density 0.5; a BatchNorm net's synthetic tasks
reuse task 0's statistics), as bench/serving.py builds them: the serving benchmark's MLP
64-512-512-10, and a small conv net with non-affine BatchNorm (per-task statistics).

Serving: both servers are real child processes on loopback (`--threads 1`: one intra-op thread for
torch and for ONNX Runtime); the load comes from one separate load-generator process (bench.loadgen,
4 clients, batch 32, raw gRPC); every phase is warmed up, then the phases alternate A B A B ... for
bench.serving.REPEATS rounds; ratios per round, quoted as median (min-max). After the timed rounds,
an untimed phase checks every ONNX Runtime answer of the task mix against in-process PyTorch logits.

Decision (in-process, 1 thread, alternating, REPEATS rounds): microseconds per forward of (a) the
shared graph with the task's weights fed as graph inputs on every run, (b) a session per task with the
weights as initializers (what the backend does), (c) PyTorch's Snapshot.logits; and the time to
create one task's session (what a cold task costs (b)).

Run: python -m bench onnx_backend. Prints Markdown tables and writes bench/results/onnx_backend.json.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from maskbank.process import ServerProcess
from registry import Registry
from registry.onnx_export import architecture_graph, onnx_weights, self_contained, weights_as_inputs
from serving import ModelRepository
from serving.onnx_backend import OnnxRuntimeBackend
from trainer import train

from ._command import run_benchmark
from .loadgen import LoadProcess
from .serving import BATCH, MODEL, REPEATS, add_synthetic_tasks, alternate, context, fmt, ratios, reference_logits, spec

THREADS = 1
MIX_TASKS = 100
CALLS = 200  # per in-process measurement
CHECK_SECONDS = 2.0
ARCHITECTURES = {
    "MLP 64-512-512-10": {"arch": "mlp", "sizes": [64, 512, 512, 10]},
    "CNN 32-64 + BN": {"arch": "cnn", "input_shape": [1, 8, 8], "width": 32, "bn": "nonaffine"},
}
BACKENDS = ("pytorch", "onnxruntime")
RESULTS = Path(__file__).parent / "results" / "onnx_backend.json"


def build_registry(root: Path, architecture: dict) -> Registry:
    """One trained SupSup task, then synthetic ones up to MIX_TASKS (task 0's other parts reused)."""
    registry = Registry(root)
    train(registry, MODEL, 1, {"method": "supsup", "stream": "permuted-digits", "architecture": architecture,
                               "method_config": {"epochs": 1}}, log=lambda _: None)
    add_synthetic_tasks(registry, MIX_TASKS, seed=MIX_TASKS)
    return registry


# ---------------------------------------------------------------- in-process: inputs vs initializers

def per_call_us(fn) -> float:
    began = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - began) / CALLS * 1e6


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return options


def decision(registry: Registry, batch: int) -> dict:
    """µs per forward of weights-as-inputs, per-task session and PyTorch; ms to create a session."""
    repository = ModelRepository(registry)
    repository.refresh()
    snapshot = repository.get(MODEL)
    task = snapshot.task(0)
    graph = architecture_graph(snapshot.manifest.architecture)
    weights = onnx_weights(graph, snapshot.parameters(task))
    shared = ort.InferenceSession(weights_as_inputs(graph).SerializeToString(), session_options())
    model = self_contained(graph, weights, task.entry.num_classes).SerializeToString()
    backend = OnnxRuntimeBackend(threads=THREADS)
    x = torch.rand(batch, graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value,
                   generator=torch.Generator().manual_seed(0))
    feeds = {"input": x.numpy(), **weights}
    runs = {"weights as inputs": lambda: shared.run(None, feeds),
            "session per task": lambda: backend.logits(snapshot, task, x),
            "pytorch": lambda: snapshot.logits(task, x)}
    times: dict[str, list[float]] = {name: [] for name in [*runs, "session creation"]}
    for run in runs.values():  # warm-up
        per_call_us(run)
    for _ in range(REPEATS):
        for name, run in runs.items():
            times[name].append(per_call_us(run))
        began = time.perf_counter()
        ort.InferenceSession(model, session_options())
        times["session creation"].append((time.perf_counter() - began) * 1e6)
    return {"us_median": {name: statistics.median(t) for name, t in times.items()},
            "inputs_vs_session": _ratio_summary(times["weights as inputs"], times["session per task"]),
            "pytorch_vs_session": _ratio_summary(times["pytorch"], times["session per task"])}


def _ratio_summary(a: list[float], b: list[float]) -> dict:
    values = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


# ---------------------------------------------------------------- serving: requests/s

def serving(load: LoadProcess, root: Path) -> dict:
    """Both backends on the registry at `root`: single task and task mix, alternating. Every network
    here takes bench.serving's input (64 features) and answers its 10 classes."""
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(root, "--threads", str(THREADS), "--backend", name))
                   for name in BACKENDS}
        phases = {}
        for name, server in servers.items():
            load.run(spec(server.url, tasks=list(range(MIX_TASKS))))  # every task's weights (or session) cached
            phases[f"{name} single"] = spec(server.url)
            phases[f"{name} mix"] = spec(server.url, tasks=list(range(MIX_TASKS)))
        runs = alternate(load, phases)
        registry = Registry(root)
        references = reference_logits(registry, registry.manifest(MODEL).tasks, BATCH)
        checked = load.run(spec(servers["onnxruntime"].url, tasks=list(range(MIX_TASKS)), seconds=CHECK_SECONDS,
                                check=True, references=references))
    return {"single": ratios(runs, "onnxruntime single", "pytorch single"),
            "mix": ratios(runs, "onnxruntime mix", "pytorch mix"), "context": context(runs),
            "correctness": {key: checked[key] for key in ("requests", "wrong", "failures")}}


# ---------------------------------------------------------------- report

def tables(results: dict) -> str:
    lines = ["| network | load | ONNX Runtime / PyTorch requests/s: median (min-max) | ONNX Runtime req/s | PyTorch req/s |",
             "|---|---|---|---|---|"]
    for network, r in results["serving"].items():
        ctx = r["context"]
        for key, label in (("single", "one task"), ("mix", f"random task of {MIX_TASKS}")):
            lines.append(f"| {network} | {label}, batch {BATCH}, 4 clients | {fmt(r[key])} | "
                         f"{ctx[f'onnxruntime {key}']['rps_median']:.0f} | {ctx[f'pytorch {key}']['rps_median']:.0f} |")
    lines += ["", "| network | answers checked (ONNX Runtime, task mix) | off by more than 1e-4 | failed |", "|---|---|---|---|"]
    for network, r in results["serving"].items():
        c = r["correctness"]
        lines.append(f"| {network} | {c['requests']} | {c['wrong']} | {c['failures']} |")
    lines += ["", "| network | batch | weights as inputs µs | session per task µs | PyTorch µs | inputs / session "
              "(median, min-max) | PyTorch / session | session creation ms |", "|---|---|---|---|---|---|---|---|"]
    for network, batches in results["decision"].items():
        for batch, d in batches.items():
            us = d["us_median"]
            lines.append(f"| {network} | {batch} | {us['weights as inputs']:.0f} | {us['session per task']:.0f} | "
                         f"{us['pytorch']:.0f} | {fmt(d['inputs_vs_session'])} | {fmt(d['pytorch_vs_session'])} | "
                         f"{us['session creation'] / 1e3:.1f} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    started = time.monotonic()
    results: dict = {"decision": {}, "serving": {}}
    with tempfile.TemporaryDirectory(prefix="maskbank-bench-onnx-") as tmp, LoadProcess(lifetime=900) as load:
        for network, architecture in ARCHITECTURES.items():
            root = Path(tmp) / network.split()[0].lower()
            registry = build_registry(root, architecture)
            results["decision"][network] = {str(batch): decision(registry, batch) for batch in (1, BATCH)}
            results["serving"][network] = serving(load, root)
            shutil.rmtree(root)
    total = time.monotonic() - started
    print(f"ONNX Runtime vs PyTorch backend (SupSup, 1 trained + {MIX_TASKS - 1} synthetic tasks); 1 intra-op thread "
          f"(torch.set_num_threads and ORT intra_op_num_threads); {REPEATS} alternating rounds; {total:.0f} s in all\n")
    print(tables(results) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "onnx_backend", "threads": THREADS, "repeats": REPEATS,
                                   "mix_tasks": MIX_TASKS, "architectures": ARCHITECTURES, "total_seconds": round(total, 1),
                                   **results}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
