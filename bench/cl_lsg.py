"""CL-LSG benchmark: accuracy and model size of cl-lsg against training every task from scratch.

Streams (offline, 5 tasks each, seeds SEEDS): split-digits and split-mnist1d (dissimilar tasks: 2
classes each) and permuted-digits (similar tasks: 10 classes, a pixel permutation each), MLPs of
width WIDTH per hidden layer. Every run is `trainer.train` into a throwaway registry, so the
accuracies are the served ones. cl-lsg runs with its defaults (20 epochs per phase, seed network and
growth candidates 1/8 of each layer, target = the from-scratch model's holdout accuracy), and as an
ablation with `target=0` (pick-and-reuse only: the seed network never grows).

The from-scratch reference is the model cl-lsg itself trains for its target: the full-width network
trained alone on the task (same 80% of the training set, 20 epochs, SGD), its test accuracy
recorded as the task's `scratch_accuracy`; T such models take T full-width networks.

Model size: `model_size`, the weights some task uses (kept kernels plus the heads) after the last
task, over one full-width network; `grown_size`: every weight between grown units (kept or released).

Prints a Markdown table and writes bench/results/cl_lsg.json. torch.set_num_threads(THREADS).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from registry import Registry
from trainer import train

from ._command import run_benchmark

THREADS = 1
SEEDS = (0, 1, 2)
TASKS = 5
WIDTH = 128
STREAMS = {"split-digits": (64, 2), "split-mnist1d": (40, 2), "permuted-digits": (64, 10)}  # inputs, classes
VARIANTS = {"cl-lsg": {}, "reuse only (target=0)": {"target": 0.0}}
RESULTS = Path(__file__).parent / "results" / "cl_lsg.json"


def run(stream: str, options: dict, seed: int) -> dict:
    inputs, classes = STREAMS[stream]
    settings = {"method": "cl-lsg", "stream": stream, "seed": seed, "method_config": options,
                "architecture": {"arch": "mlp", "sizes": [inputs, WIDTH, WIDTH, classes]}}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        manifest = train(Registry(root), "bench", TASKS, settings, log=lambda _: None)
    tasks = [t.metrics for t in manifest.tasks]
    result = {
        "stream": stream, "options": options, "seed": seed,
        "average_accuracy": manifest.training["average_accuracy"], "bwt": manifest.training["bwt"],
        "scratch_accuracy": [t["scratch_accuracy"] for t in tasks], "grew": [t["grew"] for t in tasks],
        "model_size": tasks[-1]["model_size"], "grown_size": tasks[-1]["grown_size"],
        "units": tasks[-1]["units"], "accuracy_matrix": manifest.training["accuracy_matrix"],
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(f"  {stream} {options} seed {seed}: {result['average_accuracy']:.3f}, size {result['model_size']:.3f} "
          f"({result['seconds']}s)", file=sys.stderr, flush=True)
    return result


def spread(values) -> str:
    values = list(values)
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(runs: dict[tuple[str, str], list[dict]]) -> str:
    lines = [
        f"{TASKS} tasks per stream, MLP [in, {WIDTH}, {WIDTH}, classes], seeds {list(SEEDS)}: mean ± std over seeds. "
        "Size: weights in use after the last task / one full-width network (the grown architecture in brackets); "
        f"training each task from scratch takes {TASKS}.0.",
        "",
        "| stream | variant | average accuracy | from scratch (same tasks) | ratio | BWT | tasks that grew | model size (grown) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (stream, variant), results in runs.items():
        accuracy = [r["average_accuracy"] for r in results]
        scratch = [statistics.fmean(r["scratch_accuracy"]) for r in runs[(stream, "cl-lsg")]]
        grew = sum(sum(r["grew"]) for r in results)
        lines.append(
            f"| {stream} | {variant} | {spread(accuracy)} | {spread(scratch)} "
            f"| {statistics.fmean(accuracy) / statistics.fmean(scratch):.3f} | {statistics.fmean(r['bwt'] for r in results):+.3f} "
            f"| {grew}/{TASKS * len(results)} | {spread(r['model_size'] for r in results)} "
            f"({statistics.fmean(r['grown_size'] for r in results):.3f}) |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    runs = {(stream, variant): [run(stream, options, seed) for seed in SEEDS]
            for stream in STREAMS for variant, options in VARIANTS.items()}
    seconds = time.perf_counter() - began
    print(f"cl-lsg against training each task from scratch; torch.set_num_threads({THREADS}); total {seconds:.0f}s\n")
    print(table(runs) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    setup = {"threads": THREADS, "seeds": list(SEEDS), "tasks": TASKS, "width": WIDTH, "streams": STREAMS,
             "variants": VARIANTS, "seconds": round(seconds, 1)}
    RESULTS.write_text(json.dumps({"benchmark": "cl_lsg", "setup": setup,
                                   "runs": [r for results in runs.values() for r in results]}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
