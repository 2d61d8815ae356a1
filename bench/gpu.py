"""GPU serving: `maskbank serve --device cuda` against `--device cpu` on the same machine and load.

Needs a CUDA GPU (prints why and writes nothing elsewhere). Served: the serving benchmark's model
(bench/serving.py: SupSup, MLP SIZES, one trained task plus synthetic ones). Three server loads,
each GPU server against a CPU server (CPU_THREADS intra-op threads each) with phases alternated
for REPEATS rounds: GG batch 32 on one task, GG batch 512 on one task, and batch 32 on a random
task of 1,000 (a cache miss builds the task's weights on the GPU from its packed masks kept there); then an
untimed phase checking every GPU answer against in-process CPU logits. In process: each
task-inference mode's latency at T = 100, batch 16, on a GPU snapshot against a CPU one.

Run: python -m bench gpu (writes bench/results/gpu.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from registry import Registry
from serving.cache import LRUCache
from serving.snapshot import Snapshot
from serving.task_inference import infer_task

from maskbank.process import ServerProcess

from ._command import run_benchmark
from .loadgen import LoadProcess
from .serving import MODEL, SIZES, add_synthetic_tasks, alternate, context, fmt, ratios, reference_logits, spec, train_base

CPU_THREADS = 4
LOADS = {"GG batch 32, one task": {"batch": 32, "tasks": [0]},
         "GG batch 512, one task": {"batch": 512, "tasks": [0]},
         "GG batch 32, random task of 1,000": {"batch": 32, "tasks": list(range(1000))}}
MIX = 1000
GPU, CPU = "cuda", "cpu"
DEVICES = (GPU, CPU)
GN_TASKS, GN_BATCH, GN_REPEATS = 100, 16, 7
GN_MODES = ("given", "exhaustive", "oneshot", "oneshot-input", "binary")
REPEATS, PHASE_SECONDS = 5, 2.0
CHECK_SECONDS = 2.0
RESULTS = Path(__file__).parent / "results" / "gpu.json"
# The servers' --cache-bytes: the default when results/gpu.json was recorded. It holds about 220 of the
# 1,000 tasks, so the random-task load measures cache misses (built on the device), which is its point;
# the default now (a quarter of memory) would hold them all.
CACHE_BYTES = "256MiB"


def serve(load: LoadProcess, roots: dict[str, Path], stack: contextlib.ExitStack) -> dict:
    """Per load: GPU requests/s over CPU requests/s (median, min-max of the rounds), and context."""
    servers = {(root, device): stack.enter_context(ServerProcess(roots[root], "--threads", str(CPU_THREADS), "--device", device,
                                                                 "--cache-bytes", CACHE_BYTES))
               for root in roots for device in DEVICES}
    phases = {f"{name} | {device}": spec(servers[_root(load_spec), device].url, seconds=PHASE_SECONDS, **load_spec)
              for name, load_spec in LOADS.items() for device in DEVICES}
    runs = alternate(load, phases)
    registry = Registry(roots["mix"])
    references = reference_logits(registry, registry.manifest(MODEL).tasks[:100], 32)
    checked = load.run(spec(servers["mix", GPU].url, tasks=list(range(100)), seconds=CHECK_SECONDS, check=True,
                            references=references))
    return {"gpu_vs_cpu": {name: ratios(runs, f"{name} | {GPU}", f"{name} | {CPU}") for name in LOADS},
            "context": context(runs), "correctness": {k: checked[k] for k in ("requests", "wrong", "failures")}}


def _root(load_spec: dict) -> str:
    """The registry a load needs: the one-task model, or the one of MIX tasks."""
    return "mix" if len(load_spec["tasks"]) > 1 else "base"


def gn_latency(root: Path) -> dict:
    """Each mode's median latency (ms) at T = GN_TASKS on the GPU and on the CPU, alternated."""
    registry = Registry(root)
    snapshots = {device: Snapshot.load(registry, registry.manifest(MODEL), None, LRUCache(4 << 30), device=device)
                 for device in DEVICES}
    x = torch.from_numpy(np.random.default_rng(0).random((GN_BATCH, SIZES[0]), dtype=np.float32))

    def run(device: str, mode: str) -> None:
        snapshot = snapshots[device]
        if mode == "given":
            snapshot.logits(snapshot.tasks[0], x).cpu()
        else:
            infer_task(mode, snapshot, x)

    times = {(d, m): [] for d in snapshots for m in GN_MODES}
    for key in times:
        run(*key)  # warm: weights cached, mask stacks built
    for _ in range(GN_REPEATS):
        for key in times:
            began = time.perf_counter()
            run(*key)
            times[key].append(1000 * (time.perf_counter() - began))
    return {mode: {device: statistics.median(times[device, mode]) for device in snapshots} for mode in GN_MODES}


def report(results: dict) -> str:
    lines = [f"GPU: {results['gpu']}; CPU servers: --threads {CPU_THREADS} on {os.cpu_count()} cores\n",
             "| load (4 clients) | GPU server / CPU server, requests/s: median (min-max) |", "|---|---|"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in results["serve"]["gpu_vs_cpu"].items()]
    lines += ["", "| load | device | requests/s (median) | p50 ms | p99 ms | failed requests |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {row['rps_median']:.0f} | {row.get('p50_ms_median', 0):.2f} | {row.get('p99_ms_median', 0):.2f} "
              f"| {row['failures']} |" for name, row in results["serve"]["context"].items()]
    check = results["serve"]["correctness"]
    lines += ["", f"GPU answers checked against in-process CPU logits (random task of 100): {check['requests']} "
              f"requests, {check['wrong']} wrong, {check['failures']} failed", "",
              f"| T = {GN_TASKS}, batch {GN_BATCH}, in process | GPU ms | CPU ms ({CPU_THREADS} threads) | CPU / GPU |",
              "|---|---|---|---|"]
    lines += [f"| {mode} | {row[GPU]:.2f} | {row[CPU]:.2f} | {row[CPU] / row[GPU]:.1f}x |"
              for mode, row in results["gn_latency"].items()]
    return "\n".join(lines)


def main() -> None:
    if not torch.cuda.is_available():
        print("skipped: PyTorch sees no CUDA GPU here (bench/results/gpu.json left as it was)")
        return
    torch.set_num_threads(CPU_THREADS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maskbank-gpu-") as tmp, contextlib.ExitStack() as stack:
        roots = {"base": Path(tmp) / "base", "mix": Path(tmp) / "mix"}
        train_base(roots["base"])
        shutil.copytree(roots["base"], roots["mix"])
        add_synthetic_tasks(Registry(roots["mix"]), MIX, seed=MIX)
        served = serve(stack.enter_context(LoadProcess(lifetime=900)), roots, stack)
        hundred = Path(tmp) / "hundred"
        shutil.copytree(roots["base"], hundred)
        add_synthetic_tasks(Registry(hundred), GN_TASKS, seed=GN_TASKS)
        gn = gn_latency(hundred)
    results = {"benchmark": "gpu", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cpu_threads": CPU_THREADS, "cores": os.cpu_count(), "repeats": REPEATS, "phase_seconds": PHASE_SECONDS,
               "sizes": SIZES, "serve": served, "gn_latency": gn, "total_seconds": round(time.monotonic() - started, 1)}
    print(report(results))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
