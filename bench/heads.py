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

Prints the tables; writes bench/results/heads.json. torch.set_num_threads(THREADS).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.accuracy import SEEDS, THREADS, mean, progress, run, spread

TASKS = 5
STREAMS = {
    "split-digits": ("dissimilar", [64, 128, 128, 2]),
    "split-mnist1d": ("dissimilar", [40, 128, 128, 2]),
    "permuted-digits": ("similar", [64, 128, 128, 10]),
}
METHODS = {"NCL (finetune)": "finetune", "EWC": "ewc", "SPG": "spg"}
RESULTS = Path(__file__).parent / "results" / "heads.json"


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


def main() -> None:
    torch.set_num_threads(THREADS)
    runs = {}
    for stream, (_, sizes) in STREAMS.items():
        for label, method in METHODS.items():
            progress(f"{label} on {stream}")
            runs[(stream, label)] = [run(method, stream, sizes, {}, TASKS, seed) for seed in SEEDS]
    print(accuracy_table(runs), "\n", blocked_table(runs), sep="\n")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": THREADS, "seeds": list(SEEDS), "tasks": TASKS,
                                   "runs": {f"{s}/{m}": r for (s, m), r in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
