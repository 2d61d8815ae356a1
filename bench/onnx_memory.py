"""What a cached task costs in memory, against what the weight cache charges for it (--cache-bytes),
per backend: PyTorch's effective weights, or an ONNX Runtime session (serve --backend onnxruntime).

The cache is bounded by the bytes it charges its entries: a task's effective weights (PyTorch) or, for
an ONNX Runtime session, the bytes of the weights it was built from. A session also holds ONNX Runtime's
own structures, and building one passes through transient copies (the serialized model) that the
allocator may keep. This measures both, so --cache-bytes can be sized with the right margin.

SupSup over an MLP SIZES (signed-constant backbone; one trained task and synthetic ones up to TASKS,
as bench/serving.py builds them). Per backend, a fresh child process (so that its resident memory
is its own) loads the registry as a server does (serving.ModelRepository, a cache that holds every
task), runs one batch-BATCH forward of task 0 to warm up, then one of each other task in turn, back
to back, each a cache miss, timing it and reading its resident set size (RSS, /proc/self/statm) and
the cache's charged bytes after each; then stays idle a little longer than the ONNX Runtime
backend's interval between handing freed memory back, and reads the RSS again. Reported per task: the charge, the median RSS growth during the burst, the growth
once settled (over all the tasks), and the median time of a cold task's first forward (its build
included). torch and ONNX Runtime on THREADS thread(s).

Run: python -m bench onnx_memory. Prints a Markdown table and writes bench/results/onnx_memory.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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
    """In this process: per cold task, the time of its first forward (the build included), the RSS
    growth and the cache's charge (bytes); and the growth per task once a pause has let the ONNX
    Runtime backend hand freed memory back (serving.onnx_backend.TRIM_INTERVAL_SECONDS)."""
    from serving import ModelRepository
    from serving.onnx_backend import TRIM_INTERVAL_SECONDS, OnnxRuntimeBackend

    torch.set_num_threads(THREADS)
    repository = ModelRepository(Registry(root))
    repository.refresh()
    snapshot = repository.get(MODEL)
    backend = OnnxRuntimeBackend(threads=THREADS) if backend_name == "onnxruntime" else None
    x = torch.rand(BATCH, SIZES[0], generator=torch.Generator().manual_seed(0))

    def forward(task_id: int) -> float:
        task = snapshot.task(task_id)
        began = time.perf_counter()
        with torch.no_grad():
            snapshot.logits(task, x) if backend is None else backend.logits(snapshot, task, x)
        return (time.perf_counter() - began) * 1e3

    forward(0)
    rss, charged, cold_ms = [_rss_bytes()], [snapshot.cache.stats().bytes], []
    for task_id in range(1, TASKS):
        cold_ms.append(forward(task_id))
        rss.append(_rss_bytes())
        charged.append(snapshot.cache.stats().bytes)
    time.sleep(TRIM_INTERVAL_SECONDS + 0.5)  # an idle pause: memory as it settles, with no build after the burst
    growth = [b - a for a, b in zip(rss, rss[1:])]
    charge = [b - a for a, b in zip(charged, charged[1:])]
    settled = (_rss_bytes() - rss[0]) / (TASKS - 1)
    return {"rss_growth_per_task": growth, "charged_per_task": charge, "cold_ms": cold_ms,
            "median_rss_growth": statistics.median(growth), "median_charged": statistics.median(charge),
            "settled_rss_growth": settled, "median_cold_ms": statistics.median(cold_ms)}


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        build_registry(Path(root))
        results = {}
        for backend in BACKENDS:  # a child process each: its RSS is its own
            out = subprocess.run([sys.executable, "-m", "bench.onnx_memory", "--child", backend, root],
                                 check=True, capture_output=True, text=True).stdout
            results[backend] = json.loads(out.splitlines()[-1])
    lines = [f"SupSup, MLP {'-'.join(map(str, SIZES))}, {TASKS - 1} cold tasks, batch {BATCH}, {THREADS} thread(s):", "",
             "| backend | charged per task | RSS growth per task during the burst, median | the same once settled | "
             "first forward of a cold task, median |", "|---|---|---|---|---|"]
    for backend, r in results.items():
        charge = r["median_charged"]
        lines.append(f"| {backend} | {charge / 1e6:.1f} MB | {r['median_rss_growth'] / 1e6:.1f} MB "
                     f"({r['median_rss_growth'] / charge:.2f}x) | {r['settled_rss_growth'] / 1e6:.1f} MB "
                     f"({r['settled_rss_growth'] / charge:.2f}x) | {r['median_cold_ms']:.1f} ms |")
    print("\n".join(lines))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "onnx_memory", "sizes": SIZES, "tasks": TASKS, "batch": BATCH,
                                   "threads": THREADS, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(sys.argv[3], sys.argv[2])))
    else:
        run_benchmark(main, __doc__)
