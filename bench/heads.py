"""Head-based methods: SPG against its reference rows, fine-tuning (NCL) and EWC.

Same streams, seeds and network for every method (`bench.accuracy.run`: `trainer.train` into a
throwaway registry, so the accuracy recorded is the accuracy served, earlier tasks on the newest
backbone). Defaults of each method (10 epochs of plain SGD, lr 0.05, batch 64; EWC penalty 100);
nothing tuned to agree with the paper.

- Dissimilar tasks: split-digits and split-mnist1d, 5 tasks of 2 classes, MLP [in, 128, 128, 2].
- Similar tasks: permuted-digits, 5 tasks of 10 classes, MLP [64, 128, 128, 10].
Claim (SPG paper): SPG above NCL and EWC on dissimilar tasks, with small negative BWT.
Also reported: SPG's share of backbone weights fully blocked (importance 1) after each task, as
the paper's Table 5, and the mean importance.

Exhaustive GN cost: an SPG model of COST_TASKS permuted-digits tasks (MLP 64-512-512-10, 2 epochs
each), served in-process as the server does; latency of exhaustive task inference over every head
(one backbone pass, then each head: `Snapshot.logits_of`) against T full task forwards and against
one task-given forward, batch COST_BATCH, alternated, median of REPEATS (min-max).

Prints the tables; writes bench/results/heads.json. torch.set_num_threads(THREADS).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.accuracy import SEEDS, THREADS, mean, progress, run, spread
from registry import Registry
from serving.cache import LRUCache
from serving.snapshot import Snapshot
from trainer import get_stream, train

from ._command import run_benchmark

TASKS = 5
STREAMS = {
    "split-digits": ("dissimilar", [64, 128, 128, 2]),
    "split-mnist1d": ("dissimilar", [40, 128, 128, 2]),
    "permuted-digits": ("similar", [64, 128, 128, 10]),
}
METHODS = {"NCL (finetune)": "finetune", "EWC": "ewc", "SPG": "spg"}
RESULTS = Path(__file__).parent / "results" / "heads.json"
COST_TASKS, COST_BATCH, REPEATS = 20, 16, 25


def accuracy_table(runs: dict) -> str:
    lines = [f"{TASKS} tasks per stream, seeds {list(SEEDS)}, mean ± std over seeds", "",
             "| stream | kind | method | average accuracy | forgetting | BWT | SPG - this method (seeds SPG ahead) |",
             "|---|---|---|---|---|---|---|"]
    for stream, (kind, _) in STREAMS.items():
        spg = [r["average_accuracy"] for r in runs[(stream, "SPG")]]
        for label in METHODS:
            results = runs[(stream, label)]
            accuracy = [r["average_accuracy"] for r in results]
            gap = "" if label == "SPG" else \
                f"{mean(s - a for s, a in zip(spg, accuracy)):+.3f} ({sum(s > a for s, a in zip(spg, accuracy))}/{len(spg)})"
            lines.append(f"| {stream} | {kind} | {label} | {spread(accuracy)} | {spread(r['forgetting'] for r in results)} "
                         f"| {spread(r['bwt'] for r in results)} | {gap} |")
    return "\n".join(lines)


def blocked_table(runs: dict) -> str:
    lines = ["SPG: share of backbone weights fully blocked (importance == 1) / mean importance, after each task "
             "(mean over seeds)", "", "| stream | " + " | ".join(f"after task {i}" for i in range(TASKS)) + " |",
             "|---|" + "---|" * TASKS]
    for stream in STREAMS:
        results = runs[(stream, "SPG")]
        cells = [f"{mean(r['task_metrics'][i]['blocked_fraction'] for r in results):.4f} / "
                 f"{mean(r['task_metrics'][i]['mean_importance'] for r in results):.2f}" for i in range(TASKS)]
        lines.append(f"| {stream} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exhaustive_cost() -> dict:
    """Median (min-max) latency ratios of exhaustive GN over all heads, shared pass vs T forwards."""
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        settings = {"method": "spg", "stream": "permuted-digits", "architecture": {"arch": "mlp", "sizes": [64, 512, 512, 10]},
                    "method_config": {"epochs": 2}}
        train(registry, "cost", COST_TASKS, settings, log=lambda _: None)
        snapshot = Snapshot.load(registry, registry.manifest("cost"), None, LRUCache(1 << 32))
    tasks = snapshot.healthy_tasks()
    x = get_stream("permuted-digits").task(0).x_test[:COST_BATCH]
    calls = {"shared pass": lambda: snapshot.logits_of(tasks, x),
             "T forwards": lambda: [snapshot.logits(t, x) for t in tasks],
             "one forward": lambda: snapshot.logits(tasks[0], x)}
    times = {name: [] for name in calls}
    for repeat in range(REPEATS + 1):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            if repeat:  # the first round warms up (and fills the cache)
                times[name].append(time.perf_counter() - began)
    ratio = lambda a, b: [x / y for x, y in zip(times[a], times[b])]  # noqa: E731
    summary = lambda r: {"median": statistics.median(r), "min": min(r), "max": max(r)}  # noqa: E731
    return {"tasks": COST_TASKS, "batch": COST_BATCH, "repeats": REPEATS,
            "shared_vs_T_forwards": summary(ratio("shared pass", "T forwards")),
            "shared_vs_one_forward": summary(ratio("shared pass", "one forward")),
            "T_forwards_vs_one_forward": summary(ratio("T forwards", "one forward"))}


def cost_table(cost: dict) -> str:
    rows = [("exhaustive, one backbone pass + T heads / T full forwards", "shared_vs_T_forwards"),
            ("exhaustive, one backbone pass + T heads / one task-given forward", "shared_vs_one_forward"),
            ("T full forwards / one task-given forward", "T_forwards_vs_one_forward")]
    lines = [f"Exhaustive GN cost, SPG, T = {cost['tasks']}, batch {cost['batch']}, median (min-max) of {cost['repeats']}",
             "", "| ratio | value |", "|---|---|"]
    lines += [f"| {text} | {cost[key]['median']:.2f}x ({cost[key]['min']:.2f}-{cost[key]['max']:.2f}) |" for text, key in rows]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    runs = {}
    for stream, (_, sizes) in STREAMS.items():
        for label, method in METHODS.items():
            progress(f"{label} on {stream}")
            runs[(stream, label)] = [run(method, stream, sizes, {}, TASKS, seed) for seed in SEEDS]
    progress("exhaustive GN cost")
    cost = exhaustive_cost()
    print(accuracy_table(runs), blocked_table(runs), cost_table(cost), sep="\n\n")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": THREADS, "seeds": list(SEEDS), "tasks": TASKS, "exhaustive_cost": cost,
                                   "runs": {f"{s}/{m}": r for (s, m), r in runs.items()}}, indent=1))


if __name__ == "__main__":
    run_benchmark(main, __doc__)
