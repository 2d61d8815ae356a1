"""Accuracy benchmark: average accuracy, forgetting and BWT per method on offline task streams, and
per-task bytes, on the same streams and seeds for every method.

Every run is `trainer.train` into a throwaway registry (the accuracy it records is the accuracy
served); bytes come from `registry.audit.audit`. Seeds SEEDS: the seed sets the stream (the digits
train/test split, the MNIST-1D generation), the backbone and every task, identically for all methods.
Methods run with their defaults except what is listed here; nothing was tuned to agree with the papers.

(a) Split streams (split-digits, split-mnist1d; 5 tasks of 2 classes), MLP [in, 128, 128, 2], density
    0.05: supsup, exssnet, exssnet + KKT, packnet-share (share all; prunes 65%, no density option).
    Claim: ExSSNeT >= SupSup in average accuracy.
(b) Same streams: mask epochs in EPOCH_GRID for supsup, exssnet and exssnet + KKT (ExSSNeT's weight
    phase stays at its default 10 epochs on top); the first epoch count whose mean average accuracy
    reaches SupSup's at 30 epochs. Claim: KKT gets there in fewer epochs.
(c) Only if `impresslearn` is registered: permuted-digits, IMPRESS_TASKS tasks, MLP 64-256-256-10,
    density 0.5 (both methods' default), heterogeneous bases of IMPRESS_BASES masks (tasks 0..B-1
    build the basis; the tasks after them are outside it and store only alpha). Claim: on tasks
    outside the basis, >= 0.9x SupSup's accuracy on the same tasks with <= 2% of SupSup's per-task
    bytes (the audit's bytes of the task's own parts; the shared basis amortised over the tasks is
    shown too).
Per-task bytes: each task's own parts, and shared bytes (backbone versions, shared parts) / tasks.

Prints one Markdown table per claim plus the bytes table; writes the same numbers (and every run's
accuracy matrix) to bench/results/accuracy.json. torch.set_num_threads(THREADS).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import trainer
from registry import Registry
from registry.audit import audit
from trainer import train

from ._command import run_benchmark

THREADS = 1
SEEDS = (0, 1, 2)
DENSITY = 0.05
SPLIT_STREAMS = {"split-digits": [64, 128, 128, 2], "split-mnist1d": [40, 128, 128, 2]}
SPLIT_TASKS = 5
# label -> (method, options); options other than density/epochs are the methods' own
SPLIT_METHODS = {
    "supsup": ("supsup", {"density": DENSITY}),
    "exssnet": ("exssnet", {"density": DENSITY}),
    "exssnet+kkt": ("exssnet", {"density": DENSITY, "kkt": True}),
    "packnet-share": ("packnet-share", {"share": "all"}),
}
EPOCH_GRID = (3, 5, 10, 20, 30)
EPOCH_METHODS = ("supsup", "exssnet", "exssnet+kkt")
FULL_EPOCHS = 30  # the default of supsup and exssnet; (a) runs at it
IMPRESS_STREAM, IMPRESS_SIZES, IMPRESS_TASKS, IMPRESS_BASES = "permuted-digits", [64, 256, 256, 10], 10, (5, 8)
RESULTS = Path(__file__).parent / "results" / "accuracy.json"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(method: str, stream: str, sizes: list[int], options: dict, tasks: int, seed: int) -> dict:
    """Train `tasks` tasks; the manifest's metrics, the audit's bytes and the KKT decisions."""
    settings = {"method": method, "stream": stream, "seed": seed, "architecture": {"arch": "mlp", "sizes": sizes},
                "method_config": options}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        manifest = train(registry, "bench", tasks, settings, log=lambda _: None)
        bytes_ = audit(registry, "bench")
    result = {
        "method": method, "stream": stream, "sizes": sizes, "options": options, "tasks": tasks, "seed": seed,
        "average_accuracy": manifest.training["average_accuracy"],
        "forgetting": manifest.training["forgetting"],
        "bwt": manifest.training["bwt"],
        "accuracy_matrix": manifest.training["accuracy_matrix"],
        "task_metrics": [t.metrics for t in manifest.tasks],
        "task_bytes": bytes_.task_bytes,
        "shared_bytes": bytes_.shared_bytes,
        "shared_parts_bytes": {kind: ref.size for kind, ref in manifest.shared.items()},
        "state_bytes": [sum(ref.size for ref in t.state.values()) for t in manifest.tasks],
        "kkt_sources": [t.metrics.get("kkt_source") for t in manifest.tasks] if options.get("kkt") else None,
        "seconds": round(time.perf_counter() - began, 2),
    }
    progress(f"  {method} {options} {stream} seed {seed}: average accuracy {result['average_accuracy']:.3f} "
             f"({result['seconds']:.1f}s)")
    return result


def mean(values) -> float:
    return statistics.fmean(values)


def spread(values) -> str:
    """mean ± standard deviation (over seeds)"""
    values = list(values)
    return f"{mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


# ---------------------------------------------------------------- (a) and (b): split streams


def split_runs() -> dict[tuple[str, str, int], list[dict]]:
    """(label, stream, mask epochs) -> one run per seed."""
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for stream, sizes in SPLIT_STREAMS.items():
        for label, (method, options) in SPLIT_METHODS.items():
            grid = EPOCH_GRID if label in EPOCH_METHODS else (None,)
            for epochs in grid:
                config = {**options, **({"epochs": epochs} if epochs is not None else {})}
                runs[(label, stream, epochs or FULL_EPOCHS)] = [run(method, stream, sizes, config, SPLIT_TASKS, seed)
                                                                for seed in SEEDS]
    return runs


def claim_a(runs) -> tuple[list[dict], str]:
    rows = []
    for stream in SPLIT_STREAMS:
        supsup = [r["average_accuracy"] for r in runs[("supsup", stream, FULL_EPOCHS)]]
        for label in SPLIT_METHODS:
            results = runs[(label, stream, FULL_EPOCHS)]
            accuracies = [r["average_accuracy"] for r in results]
            rows.append({
                "stream": stream, "method": label, "average_accuracy": accuracies,
                "forgetting": [r["forgetting"] for r in results], "bwt": [r["bwt"] for r in results],
                "minus_supsup": [a - s for a, s in zip(accuracies, supsup)],
                "seeds_at_least_supsup": sum(a >= s for a, s in zip(accuracies, supsup)),
                "kkt_transfers": (sum(s is not None for r in results for s in r["kkt_sources"][1:]),
                                  sum(len(r["kkt_sources"]) - 1 for r in results)) if results[0]["kkt_sources"] else None,
            })
    lines = [
        f"(a) Split streams, {SPLIT_TASKS} tasks of 2 classes, MLP [in, 128, 128, 2], density {DENSITY} "
        f"(packnet-share: its own 65% pruning), {FULL_EPOCHS} mask epochs, seeds {list(SEEDS)}: mean ± std over seeds",
        "",
        "| stream | method | average accuracy | per seed | - SupSup (mean) | seeds >= SupSup | forgetting | BWT | KKT transfers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kkt = f"{row['kkt_transfers'][0]}/{row['kkt_transfers'][1]}" if row["kkt_transfers"] else "-"
        lines.append(
            f"| {row['stream']} | {row['method']} | {spread(row['average_accuracy'])} "
            f"| {', '.join(f'{a:.3f}' for a in row['average_accuracy'])} | {mean(row['minus_supsup']):+.3f} "
            f"| {row['seeds_at_least_supsup']}/{len(SEEDS)} | {mean(row['forgetting']):.3f} | {mean(row['bwt']):+.3f} | {kkt} |"
        )
    verdicts = []
    for stream in SPLIT_STREAMS:
        ex = mean(next(r for r in rows if r["stream"] == stream and r["method"] == "exssnet")["average_accuracy"])
        su = mean(next(r for r in rows if r["stream"] == stream and r["method"] == "supsup")["average_accuracy"])
        verdicts.append(f"{stream}: ExSSNeT {ex:.3f} vs SupSup {su:.3f} -> {'holds' if ex >= su else 'does not hold'}")
    lines += ["", "Claim (a) ExSSNeT >= SupSup (mean average accuracy): " + "; ".join(verdicts)]
    return rows, "\n".join(lines)


def claim_b(runs) -> tuple[list[dict], str]:
    rows = []
    for stream in SPLIT_STREAMS:
        target = mean(r["average_accuracy"] for r in runs[("supsup", stream, FULL_EPOCHS)])
        curves = {label: {e: [r["average_accuracy"] for r in runs[(label, stream, e)]] for e in EPOCH_GRID}
                  for label in EPOCH_METHODS}
        first = {label: next((e for e in EPOCH_GRID if mean(curve[e]) >= target), None) for label, curve in curves.items()}
        rows.append({"stream": stream, "target_supsup_30": target, "curves": curves, "first_epochs_reaching_target": first})
    header = " | ".join(f"{label}" for label in EPOCH_METHODS)
    lines = [
        f"(b) Mean average accuracy over seeds {list(SEEDS)} against mask epochs (same streams, MLP and density as (a); "
        "exssnet's weight phase adds its default 10 epochs at every point), and the first epoch count whose mean "
        f"reaches SupSup's at {FULL_EPOCHS} epochs",
        "",
        f"| stream | mask epochs | {header} |",
        "|---|---|" + "---|" * len(EPOCH_METHODS),
    ]
    for row in rows:
        for e in EPOCH_GRID:
            lines.append(f"| {row['stream']} | {e} | " + " | ".join(spread(row["curves"][label][e]) for label in EPOCH_METHODS) + " |")
        firsts = " | ".join(str(row["first_epochs_reaching_target"][label] or f"not within {EPOCH_GRID[-1]}")
                            for label in EPOCH_METHODS)
        lines.append(f"| {row['stream']} | **first to reach {row['target_supsup_30']:.3f}** | {firsts} |")
    verdicts = []
    for row in rows:
        first = row["first_epochs_reaching_target"]
        kkt, su = first["exssnet+kkt"], first["supsup"]
        holds = kkt is not None and (su is None or kkt < su)
        verdicts.append(f"{row['stream']}: exssnet+kkt {kkt}, supsup {su} -> {'holds' if holds else 'does not hold'}")
    lines += ["", "Claim (b) KKT reaches SupSup's 30-epoch accuracy in fewer mask epochs: " + "; ".join(verdicts)]
    return rows, "\n".join(lines)


# ---------------------------------------------------------------- (c): ImpressLearn


def claim_c() -> tuple[dict, str]:
    supsup = [run("supsup", IMPRESS_STREAM, IMPRESS_SIZES, {}, IMPRESS_TASKS, seed) for seed in SEEDS]
    rows = []
    for basis in IMPRESS_BASES:
        impress = [run("impresslearn", IMPRESS_STREAM, IMPRESS_SIZES, {"basis_size": basis}, IMPRESS_TASKS, seed)
                   for seed in SEEDS]
        outside = range(basis, IMPRESS_TASKS)
        il_acc = [r["accuracy_matrix"][-1][t] for r in impress for t in outside]
        su_acc = [r["accuracy_matrix"][-1][t] for r in supsup for t in outside]
        il_bytes = mean(r["task_bytes"][t] for r in impress for t in outside)
        su_bytes = mean(b for r in supsup for b in r["task_bytes"])
        basis_bytes = mean(r["shared_parts_bytes"].get("basis_masks", 0) for r in impress)
        amortised = il_bytes + basis_bytes / IMPRESS_TASKS
        rows.append({
            "basis_size": basis, "tasks_outside_basis": list(outside),
            "impresslearn_accuracy_outside": mean(il_acc), "supsup_accuracy_same_tasks": mean(su_acc),
            "accuracy_ratio": mean(il_acc) / mean(su_acc),
            "impresslearn_accuracy_per_task": [mean(r["accuracy_matrix"][-1][t] for r in impress) for t in outside],
            "impresslearn_average_accuracy_all": [r["average_accuracy"] for r in impress],
            "forgetting": [r["forgetting"] for r in impress], "bwt": [r["bwt"] for r in impress],
            "impresslearn_task_bytes": il_bytes, "supsup_task_bytes": su_bytes, "bytes_ratio": il_bytes / su_bytes,
            "basis_bytes": basis_bytes, "amortised_task_bytes": amortised, "amortised_bytes_ratio": amortised / su_bytes,
            "accuracy_claim": mean(il_acc) / mean(su_acc) >= 0.9, "bytes_claim": il_bytes / su_bytes <= 0.02,
            "runs": impress,
        })
    lines = [
        f"(c) ImpressLearn (heterogeneous basis) vs SupSup, {IMPRESS_STREAM}, {IMPRESS_TASKS} tasks, MLP "
        f"{'-'.join(map(str, IMPRESS_SIZES))}, density 0.5, defaults (alpha: Adam lr 0.05, 30 epochs), seeds {list(SEEDS)}; "
        "accuracy on the tasks outside the basis (final row of the matrix), bytes from the audit",
        "",
        "| basis | tasks outside | ImpressLearn acc | SupSup acc (same tasks) | ratio (>= 0.9?) | ImpressLearn bytes/task "
        "| SupSup bytes/task | ratio (<= 2%?) | with basis amortised over the tasks | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['basis_size']} | {row['tasks_outside_basis'][0]}..{row['tasks_outside_basis'][-1]} "
            f"| {row['impresslearn_accuracy_outside']:.3f} | {row['supsup_accuracy_same_tasks']:.3f} "
            f"| {row['accuracy_ratio']:.2f} ({'yes' if row['accuracy_claim'] else 'no'}) | {row['impresslearn_task_bytes']:.0f} "
            f"| {row['supsup_task_bytes']:.0f} | {100 * row['bytes_ratio']:.2f}% ({'yes' if row['bytes_claim'] else 'no'}) "
            f"| {row['amortised_task_bytes']:.0f} | {100 * row['amortised_bytes_ratio']:.1f}% |"
        )
    per_task = "; ".join(f"B={row['basis_size']}: " + ", ".join(f"{a:.2f}" for a in row["impresslearn_accuracy_per_task"])
                         for row in rows)
    holds = [row["basis_size"] for row in rows if row["accuracy_claim"] and row["bytes_claim"]]
    lines += ["", f"ImpressLearn accuracy per task outside the basis (mean over seeds): {per_task}",
              f"SupSup average accuracy (all {IMPRESS_TASKS} tasks): {spread(r['average_accuracy'] for r in supsup)}",
              "Claim (c) >= 0.9x SupSup accuracy with <= 2% of its per-task bytes: "
              + (f"holds for basis {holds}" if holds else "does not hold for any basis size tried")]
    return {"supsup_runs": supsup, "rows": rows}, "\n".join(lines)


# ---------------------------------------------------------------- bytes


def bytes_table(split, impress) -> tuple[list[dict], str]:
    groups = [(label, stream, split[(label, stream, FULL_EPOCHS)]) for stream in SPLIT_STREAMS for label in SPLIT_METHODS]
    if impress:
        groups.append(("supsup", IMPRESS_STREAM, impress["supsup_runs"]))
        groups += [(f"impresslearn B={row['basis_size']}", IMPRESS_STREAM, row["runs"]) for row in impress["rows"]]
    rows = []
    for label, stream, results in groups:
        own = mean(b for r in results for b in r["task_bytes"])
        shared = mean(r["shared_bytes"] / r["tasks"] for r in results)
        state = mean(b for r in results for b in r["state_bytes"])
        rows.append({"method": label, "stream": stream, "sizes": results[0]["sizes"], "tasks": results[0]["tasks"],
                     "own_bytes_per_task": own, "shared_bytes_per_task": shared, "total_bytes_per_task": own + shared,
                     "training_state_bytes_per_task": state})
    lines = [
        "Per-task bytes (audit; mean over tasks and seeds): the task's own parts, and shared bytes (every backbone "
        "version, e.g. ExSSNeT's and packnet-share's per-task weight deltas, plus shared parts such as ImpressLearn's "
        "basis) divided by the number of tasks; and training state kept with each task but never served (KKT's "
        "float16 scores), which the audit does not count",
        "",
        "| stream | MLP | tasks | method | own parts bytes/task | shared bytes/task | total bytes/task | training state bytes/task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['stream']} | {'-'.join(map(str, row['sizes']))} | {row['tasks']} | {row['method']} "
                     f"| {row['own_bytes_per_task']:.0f} | {row['shared_bytes_per_task']:.0f} | {row['total_bytes_per_task']:.0f} "
                     f"| {row['training_state_bytes_per_task']:.0f} |")
    return rows, "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    methods = trainer.method_names()
    progress(f"methods registered: {methods}")
    split = split_runs()
    a_rows, a_text = claim_a(split)
    b_rows, b_text = claim_b(split)
    if "impresslearn" in methods:
        impress, c_text = claim_c()
    else:
        impress, c_text = None, "(c) skipped: no method 'impresslearn' is registered (trainer.method_names())"
    byte_rows, bytes_text = bytes_table(split, impress)
    seconds = time.perf_counter() - began
    print(f"Offline task streams, seeds {list(SEEDS)}, torch.set_num_threads({THREADS}); every method with its "
          f"defaults except as stated; total {seconds:.0f}s\n")
    for text in (a_text, b_text, c_text, bytes_text):
        print(text + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    setup = {"threads": THREADS, "seeds": list(SEEDS), "density": DENSITY, "split_streams": SPLIT_STREAMS,
             "split_tasks": SPLIT_TASKS, "split_methods": SPLIT_METHODS, "epoch_grid": list(EPOCH_GRID),
             "impresslearn": {"stream": IMPRESS_STREAM, "sizes": IMPRESS_SIZES, "tasks": IMPRESS_TASKS,
                              "bases": list(IMPRESS_BASES)}, "methods_registered": methods, "seconds": round(seconds, 1)}
    document = {
        "benchmark": "accuracy", "setup": setup,
        "a_split": a_rows, "b_epochs": b_rows, "c_impresslearn": impress, "bytes": byte_rows,
        "runs": [r for results in split.values() for r in results],
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
