"""Task inference (GN): when does the one-shot gradient find the task? Share of batches right per
GN mode on SupSup models of 20 permuted-digits tasks, varying the width of the MLP and the mask
rule (topk at several densities, sign), T = 20, batch 16 (8 epochs a task, 1 torch thread).

`oneshot` takes dH/dalpha through every layer; `oneshot-input` only through the first masked layer
(serving/task_inference.py says why). Exhaustive is the exact reference.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench.gn import accuracy, label, table
from registry import Registry
from serving.cache import LRUCache
from serving.snapshot import Snapshot
from trainer import train

from ._command import run_benchmark

THREADS = 1  # as bench/gn.py: on the shared 2-core machine a second thread waits for a busy core
TASKS, BATCH, BATCHES_PER_TASK, EPOCHS = 20, 16, 5, 8
CONFIGS = (  # (hidden width, mask rule, topk density: None for sign, which takes none)
    (128, "topk", 0.5), (512, "topk", 0.5), (128, "sign", None), (128, "topk", 0.2), (128, "topk", 0.1), (512, "topk", 0.1),
)
MODES = (("exhaustive", 1), ("oneshot", 1), ("oneshot", 3), ("binary", 1), ("oneshot-input", 1), ("oneshot-input", 3))
RESULTS = Path(__file__).parent / "results" / "gn_oneshot.json"


def config_name(width: int, rule: str, density: float | None) -> str:
    """The table's row label of a configuration."""
    return f"64-{width}-{width}-10, " + ("sign" if rule == "sign" else f"topk {density}")


def measure(width: int, rule: str, density: float | None) -> dict[str, float]:
    """Train one model, then the share of batches each mode gets right (and the trained accuracy)."""
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        train(registry, "m", TASKS, {"method": "supsup", "stream": "permuted-digits",
                                     "architecture": {"arch": "mlp", "sizes": [64, width, width, 10]},
                                     "method_config": {"epochs": EPOCHS, "mask": rule, "density": density}},
              log=lambda _: None)
        manifest = registry.manifest("m")
        snapshot = Snapshot.load(registry, manifest, None, LRUCache(1 << 30))
        return {"trained_average_accuracy": manifest.training["average_accuracy"]} | accuracy(
            snapshot, TASKS, BATCH, MODES, BATCHES_PER_TASK)


def report(results: dict) -> str:
    """The Markdown table of a run (also usable on a saved bench/results/gn_oneshot.json)."""
    names = [label(*m) for m in MODES]
    rows = [[key, f"{row['trained_average_accuracy']:.3f}"] + [f"{row[n]:.3f}" for n in names]
            for key, row in results["gn_oneshot"].items()]
    return (f"### gn_oneshot: share of batches whose task is inferred right, T={TASKS}, batch {BATCH}\n\n"
            + table(["MLP, mask", "trained accuracy", *names], rows))


def main() -> None:
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    measured = {config_name(*c): measure(*c) for c in CONFIGS}
    results = {"benchmark": "gn_oneshot", "threads": THREADS, "tasks": TASKS, "batch": BATCH, "epochs": EPOCHS,
               "stream": "permuted-digits", "gn_oneshot": measured}
    print(report(results))
    print(f"\n{time.perf_counter() - began:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
