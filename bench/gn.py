"""Task inference (GN): accuracy and cost per mode (the gn_accuracy and gn_cost rows of the README's benchmark targets).

One SupSup model with 100 permuted-digits tasks (MLP 64-128-128-10, 8 epochs per task); views
of its first T tasks are served in-process exactly as the server does (Snapshot + task
inference). gn_accuracy: share of test batches whose task is inferred correctly, per mode, T
and batch size. gn_cost: latency of each mode divided by one task-given forward at the same
batch (warm-up, then modes and the reference alternated, median of the repetitions).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from registry import Registry
from serving.cache import LRUCache
from serving.snapshot import Snapshot
from serving.entropy import autograd_gradients
from serving.task_inference import infer_task
from trainer import get_stream, train

from ._command import run_benchmark

THREADS = 1  # on the shared 2-core machine a second thread waits for a busy core: 2 threads gave 0.0x-3000x spreads
TASKS = 100
ARCHITECTURE = {"arch": "mlp", "sizes": [64, 128, 128, 10]}
EPOCHS = 8
MODES = (("exhaustive", 1), ("oneshot", 1), ("oneshot", 3), ("binary", 1))
COST_MODES = MODES + (("oneshot-input", 1),)
PARTS = ("dH/dW first layer, autograd", "dH/dW first layer, by hand", "dH/dW all layers, by hand",
         "mask product, all layers", "mask product, first layer")
ACCURACY_TS, ACCURACY_BATCHES, ACCURACY_BATCHES_PER_TASK = (5, 20), (1, 4, 16), 6
COST_TS, COST_BATCH, REPEATS = (10, 50, 100), 16, 7
RESULTS = Path(__file__).parent / "results" / "gn.json"


def label(mode: str, shortlist: int) -> str:
    return mode if shortlist == 1 else f"{mode} (shortlist {shortlist})"


def view(registry: Registry, tasks: int) -> Snapshot:
    """A snapshot of the model's first `tasks` tasks."""
    manifest = registry.manifest("gn")
    partial = dataclasses.replace(manifest, tasks=manifest.tasks[:tasks])
    return Snapshot.load(registry, partial, None, LRUCache(1 << 30))


def accuracy(snapshot: Snapshot, tasks: int, batch: int, modes: tuple[tuple[str, int], ...] = MODES,
             batches_per_task: int = ACCURACY_BATCHES_PER_TASK) -> dict[str, float]:
    """Share of permuted-digits test batches of the first `tasks` tasks whose task each (mode, shortlist) finds."""
    stream = get_stream("permuted-digits")
    right = {label(*m): 0 for m in modes}
    total = 0
    for task in range(tasks):
        x = stream.task(task).x_test
        for b in range(batches_per_task):
            rows = x[b * batch : (b + 1) * batch]
            total += 1
            for mode, shortlist in modes:
                right[label(mode, shortlist)] += infer_task(mode, snapshot, rows, shortlist).task.entry.id == task
    return {name: count / total for name, count in right.items()}


def cost(snapshot: Snapshot) -> dict[str, dict[str, float]]:
    """Each mode's latency, and that of the parts of a gradient mode (PARTS), over a task-given forward."""
    x = get_stream("permuted-digits").task(0).x_test[:COST_BATCH]
    reference = snapshot.tasks[0]
    snapshot.logits(reference, x)
    runs = {"given": lambda: snapshot.logits(reference, x)}
    runs.update({label(m, k): (lambda m=m, k=k: infer_task(m, snapshot, x, k)) for m, k in COST_MODES})
    runs.update(gradient_parts(snapshot, x))
    return relative_to_given(runs, REPEATS)


def gradient_parts(snapshot: Snapshot, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The steps of `oneshot` / `oneshot-input` at the superposition of all tasks, timed on their own:
    dH/dW by hand (serving/entropy.py) and by autograd, and the product with the stacked masks."""
    stack = snapshot.mask_stack()
    tasks = stack.subset(None)
    layers = list(stack.columns)
    gradients = snapshot.entropy_gradients(tasks.parameters, x, tasks.classes, layers)
    first = {layers[0]: gradients[layers[0]]}
    return dict(zip(PARTS, [
        lambda: autograd_gradients(snapshot.forward, tasks.parameters, x, tasks.classes, layers[:1]),
        lambda: snapshot.entropy_gradients(tasks.parameters, x, tasks.classes, layers[:1]),
        lambda: snapshot.entropy_gradients(tasks.parameters, x, tasks.classes, layers),
        lambda: stack.gradient(tasks, gradients),
        lambda: stack.gradient(tasks, first),
    ]))


def relative_to_given(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Each run's latency over the "given" run's: warm-up (caches filled, stacks built), then `repeats`
    rounds alternating the runs; median ratio (min-max) and median milliseconds."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    ratios = {name: [t / g for t, g in zip(times[name], times["given"])] for name in runs if name != "given"}
    return {name: {"median_ratio": statistics.median(r), "min": min(r), "max": max(r),
                   "median_ms": 1000 * statistics.median(times[name])} for name, r in ratios.items()} | {
        "given": {"median_ms": 1000 * statistics.median(times["given"])}}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(results: dict) -> str:
    """The two Markdown tables of a run (also usable on a saved bench/results/gn.json)."""
    names, cost_names = [label(*m) for m in MODES], [label(*m) for m in COST_MODES]
    accuracy_rows = [[key] + [f"{row[n]:.3f}" for n in names] for key, row in results["gn_accuracy"].items()]
    cost_rows = [[key, f"{row['given']['median_ms']:.2f}"]
                 + [f"{row[n]['median_ratio']:.1f}x ({row[n]['min']:.1f}-{row[n]['max']:.1f})" for n in cost_names]
                 for key, row in results["gn_cost"].items()]
    return "\n".join([
        "### gn_accuracy: share of batches whose task is inferred correctly\n",
        table(["T, batch", *names], accuracy_rows),
        f"\n### gn_cost: latency / one task-given forward, batch {COST_BATCH} (median, min-max of {REPEATS})\n",
        table(["T", "given (ms)", *cost_names], cost_rows),
        "\n### the parts of a gradient mode, same runs: latency / one task-given forward\n",
        table(["T", *PARTS], [[key] + [f"{row[n]['median_ratio']:.1f}x ({row[n]['min']:.1f}-{row[n]['max']:.1f})"
                                       for n in PARTS] for key, row in results["gn_cost"].items()]),
    ])


def main() -> None:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        began = time.perf_counter()
        train(registry, "gn", TASKS, {"method": "supsup", "stream": "permuted-digits", "architecture": ARCHITECTURE,
                                      "method_config": {"epochs": EPOCHS}}, log=lambda _: None)
        trained = registry.manifest("gn").training["average_accuracy"]
        print(f"trained {TASKS} tasks in {time.perf_counter() - began:.0f} s (average accuracy {trained:.3f}); "
              f"torch.set_num_threads({THREADS})\n")
        acc = {f"T={t}, batch {b}": accuracy(view(registry, t), t, b) for t in ACCURACY_TS for b in ACCURACY_BATCHES}
        costs = {f"T={t}": cost(view(registry, t)) for t in COST_TS}
    results = {"benchmark": "gn", "threads": THREADS, "tasks": TASKS, "architecture": ARCHITECTURE, "epochs": EPOCHS,
               "trained_average_accuracy": trained, "gn_accuracy": acc, "gn_cost": costs}
    print(report(results))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
