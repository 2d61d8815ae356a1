"""What a cached task costs in memory, against what the weight cache charges for it (--cache-bytes),
per backend: PyTorch's effective weights, or an ONNX Runtime session (serve --backend onnxruntime).

The cache is bounded by the bytes it charges its entries: a task's effective weights (PyTorch) or, for
an ONNX Runtime session, the bytes of the weights it was built from. A session also holds ONNX Runtime's
own structures, and building one passes through transient copies (the serialized model) that the
allocator may keep. This measures both, so --cache-bytes can be sized with the right margin.

SupSup over an MLP SIZES (signed-constant backbone; one trained task and synthetic ones up to TASKS,
as bench/serving.py builds them). Per backend, a fresh child process (so that its resident memory
is its own) loads the registry as a server does (serving.ModelRepository, a cache that holds every
task), runs one batch-BATCH forward of task 0 to warm up, then one of each other task in turn, each
a cache miss, reading its resident set size (RSS, /proc/self/statm) and the cache's charged bytes
after each. Reported per task: the median RSS growth, the median charge, and their ratio. torch and
ONNX Runtime on THREADS thread(s).

Run: python -m bench onnx_memory. Prints a Markdown table and writes bench/results/onnx_memory.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from registry import Registry
from trainer import train

from ._command import run_benchmark

SIZES = [64, 1024, 1024, 10]
TASKS = 12
BATCH = 32
THREADS = 1
MODEL = "bench"
BACKENDS = ("pytorch", "onnxruntime")
RESULTS = Path(__file__).parent / "results" / "onnx_memory.json"


def build_registry(root: Path) -> None:
    from .serving import add_synthetic_tasks

    registry = Registry(root)
    train(registry, MODEL, 1, {"method": "supsup", "stream": "permuted-digits", "architecture": {"arch": "mlp", "sizes": SIZES},
                               "method_config": {"epochs": 1}}, log=lambda _: None)
    add_synthetic_tasks(registry, TASKS, seed=TASKS)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(root: str, backend_name: str) -> dict:
    """In this process: per cold task, the RSS growth and the cache's charge (bytes)."""
    from serving import ModelRepository
    from serving.onnx_backend import OnnxRuntimeBackend

    torch.set_num_threads(THREADS)
    repository = ModelRepository(Registry(root))
    repository.refresh()
    snapshot = repository.get(MODEL)
    backend = OnnxRuntimeBackend(threads=THREADS) if backend_name == "onnxruntime" else None
    x = torch.rand(BATCH, SIZES[0], generator=torch.Generator().manual_seed(0))

    def forward(task_id: int) -> None:
        task = snapshot.task(task_id)
        with torch.no_grad():
            snapshot.logits(task, x) if backend is None else backend.logits(snapshot, task, x)

    forward(0)
    rss, charged = [_rss_bytes()], [snapshot.cache.stats().bytes]
    for task_id in range(1, TASKS):
        forward(task_id)
        rss.append(_rss_bytes())
        charged.append(snapshot.cache.stats().bytes)
    growth = [b - a for a, b in zip(rss, rss[1:])]
    charge = [b - a for a, b in zip(charged, charged[1:])]
    return {"rss_growth_per_task": growth, "charged_per_task": charge,
            "median_rss_growth": statistics.median(growth), "median_charged": statistics.median(charge)}


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        build_registry(Path(root))
        results = {}
        for backend in BACKENDS:  # a child process each: its RSS is its own
            out = subprocess.run([sys.executable, "-m", "bench.onnx_memory", "--child", backend, root],
                                 check=True, capture_output=True, text=True).stdout
            results[backend] = json.loads(out.splitlines()[-1])
    lines = [f"SupSup, MLP {'-'.join(map(str, SIZES))}, {TASKS - 1} cold tasks, batch {BATCH}, {THREADS} thread(s):", "",
             "| backend | RSS growth per task, median | charged to --cache-bytes | growth / charge |", "|---|---|---|---|"]
    for backend, r in results.items():
        lines.append(f"| {backend} | {r['median_rss_growth'] / 1e6:.1f} MB | {r['median_charged'] / 1e6:.1f} MB | "
                     f"{r['median_rss_growth'] / r['median_charged']:.2f}x |")
    print("\n".join(lines))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "onnx_memory", "sizes": SIZES, "tasks": TASKS, "batch": BATCH,
                                   "threads": THREADS, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(sys.argv[3], sys.argv[2])))
    else:
        run_benchmark(main, __doc__)
