"""Task inference on an ImpressLearn model: the `alpha` mode (basis-GN) against exhaustive, and the
two continuous formulations of basis optimisation it was chosen over (gn_accuracy and gn_cost of the
README's benchmark targets, for the method with a basis; bench/gn.py covers SupSup).

One ImpressLearn model (heterogeneous basis of BASIS masks, MLP 64-128-128-10, permuted digits,
default ImpressLearnConfig) with TASKS tasks; views of its first T tasks are served in-process as the
server does. Shares are reported separately for the basis tasks (0..BASIS-1, one-hot alpha: each is
a SupSup mask) and for the tasks learned as alpha over the basis, whose own accuracy is low on this
stream (README, accuracy benchmark). Rules measured:

* `exhaustive`, `alpha`, `alpha (shortlist 3)`: the server's modes (serving/task_inference.py).
* `descent from uniform`: one alpha over the basis, shared by every layer, softmax-parametrised
  from uniform, DESCENT_STEPS Adam steps (lr 0.3) of entropy minimisation; then the task whose
  alpha is nearest, as the alpha mode ranks them.
* `task simplex`: weights w over the tasks (softmax, from uniform), effective alpha sum_i w_i alpha_i,
  DESCENT_STEPS Adam steps of entropy minimisation; argmax w.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from registry import Registry
from serving.snapshot import Snapshot
from serving.task_inference import infer_task, mean_entropy
from trainer import get_stream, train

from ._command import run_benchmark
from .gn import relative_to_given, table, view

THREADS = 1  # as bench/gn.py: on the shared 2-core machine a second thread waits for a busy core
TASKS, BASIS = 20, 5
ARCHITECTURE = {"arch": "mlp", "sizes": [64, 128, 128, 10]}
TS, BATCHES, BATCHES_PER_TASK = (10, 20), (4, 16), 3
DESCENT_STEPS, REPEATS = 25, 7
RESULTS = Path(__file__).parent / "results" / "gn_basis.json"


def _combined(snapshot: Snapshot, alpha: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Effective parameters of one alpha per layer (float [B]) over the model's basis."""
    backbone = snapshot.backbones[snapshot.tasks[0].entry.backbone]
    basis = snapshot.shared["basis_masks"]
    return {name: w * torch.tensordot(alpha[name], basis.as_float(name, w.dtype), dims=1) for name, w in backbone.items()}


def _descend(snapshot: Snapshot, x: torch.Tensor, logits_of, size: int) -> torch.Tensor:
    """DESCENT_STEPS Adam steps of the batch's mean entropy over softmax(z), z from 0 (uniform)."""
    z = torch.zeros(size, requires_grad=True)
    optimizer = torch.optim.Adam([z], lr=0.3)
    with torch.enable_grad():
        for _ in range(DESCENT_STEPS):
            entropy = mean_entropy(snapshot.forward(_combined(snapshot, logits_of(torch.softmax(z, 0))), x))
            optimizer.zero_grad()
            entropy.backward()
            optimizer.step()
    return torch.softmax(z.detach(), 0)


def descent_from_uniform(snapshot: Snapshot, x: torch.Tensor) -> int:
    ids, stack = snapshot.alpha_stack()
    size = next(iter(stack.values())).shape[1]
    found = _descend(snapshot, x, lambda a: {name: a for name in stack}, size)
    distance = sum(((layer - found) ** 2).sum(dim=1) for layer in stack.values())
    return ids[int(torch.argmin(distance))]


def task_simplex(snapshot: Snapshot, x: torch.Tensor) -> int:
    ids, stack = snapshot.alpha_stack()
    weights = _descend(snapshot, x, lambda w: {name: w @ layer for name, layer in stack.items()}, len(ids))
    return ids[int(torch.argmax(weights))]


RULES = {
    "exhaustive": lambda s, x: infer_task("exhaustive", s, x).task.entry.id,
    "alpha": lambda s, x: infer_task("alpha", s, x).task.entry.id,
    "alpha (shortlist 3)": lambda s, x: infer_task("alpha", s, x, 3).task.entry.id,
    "descent from uniform": descent_from_uniform,
    "task simplex": task_simplex,
}


def accuracy(snapshot: Snapshot, tasks: int, batch: int) -> dict[str, dict[str, float]]:
    """Per rule, the share of batches right on the basis tasks and on the alpha-only tasks."""
    stream = get_stream("permuted-digits")
    right = {rule: {"basis": 0, "alpha-only": 0} for rule in RULES}
    total = {"basis": 0, "alpha-only": 0}
    for task in range(tasks):
        group = "basis" if task < BASIS else "alpha-only"
        x = stream.task(task).x_test
        for b in range(BATCHES_PER_TASK):
            rows = x[b * batch : (b + 1) * batch]
            total[group] += 1
            for rule, choose in RULES.items():
                right[rule][group] += choose(snapshot, rows) == task
    return {rule: {g: n / total[g] for g, n in counts.items()} for rule, counts in right.items()}


def cost(snapshot: Snapshot, batch: int) -> dict[str, dict[str, float]]:
    """Latency of each rule over one task-given forward (alternated, REPEATS rounds)."""
    x = get_stream("permuted-digits").task(0).x_test[:batch]
    given = snapshot.tasks[0]
    runs = {"given": lambda: snapshot.logits(given, x)} | {rule: (lambda c=c: c(snapshot, x)) for rule, c in RULES.items()}
    return relative_to_given(runs, REPEATS)


def report(results: dict) -> str:
    rows = [[key, group] + [f"{results['accuracy'][key][rule][group]:.3f}" for rule in RULES]
            for key in results["accuracy"] for group in ("basis", "alpha-only")]
    cost_rows = [[key] + [f"{c[rule]['median_ratio']:.1f}x ({c[rule]['min']:.1f}-{c[rule]['max']:.1f})" for rule in RULES]
                 for key, c in results["cost"].items()]
    return "\n".join([
        f"### gn_accuracy, ImpressLearn ({BASIS} basis masks): share of batches whose task is inferred correctly\n",
        table(["T, batch", "tasks", *RULES], rows),
        f"\n### gn_cost: latency / one task-given forward (median, min-max of {REPEATS})\n",
        table(["T, batch", *RULES], cost_rows),
    ])


def main() -> None:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        began = time.perf_counter()
        train(registry, "gn", TASKS, {"method": "impresslearn", "stream": "permuted-digits", "architecture": ARCHITECTURE,
                                      "method_config": {"basis_size": BASIS}}, log=lambda _: None)
        matrix = registry.manifest("gn").training["accuracy_matrix"][-1]
        print(f"trained {TASKS} ImpressLearn tasks in {time.perf_counter() - began:.0f} s (test accuracy: basis tasks "
              f"{statistics.mean(matrix[:BASIS]):.3f}, alpha-only tasks {statistics.mean(matrix[BASIS:]):.3f}); "
              f"torch.set_num_threads({THREADS})\n")
        acc = {f"T={t}, batch {b}": accuracy(view(registry, t), t, b) for t in TS for b in BATCHES}
        costs = {f"T={TASKS}, batch {b}": cost(view(registry, TASKS), b) for b in (16,)}
    results = {"benchmark": "gn_basis", "threads": THREADS, "tasks": TASKS, "basis": BASIS, "architecture": ARCHITECTURE,
               "descent_steps": DESCENT_STEPS, "task_accuracy": {"basis": statistics.mean(matrix[:BASIS]),
                                                                 "alpha-only": statistics.mean(matrix[BASIS:])},
               "accuracy": acc, "cost": costs}
    print(report(results))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
