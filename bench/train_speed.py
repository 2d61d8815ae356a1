"""Train-speed benchmark: seconds per epoch of SupSup mask training against the reference style.

Ours (B): `SupSup.learn_task` exactly as the trainer runs it (masks attached with
torch.nn.utils.parametrize through `EdgePopupMask`, top-k by `_TopK`), with the epochs of each configuration.

Reference (A): a plain PyTorch loop in the style of the public edge-popup / SupSup code, kept here:
a `GetSubnet` autograd function that sorts all |scores| every forward (`scores.flatten().sort()`)
and sets the bottom (1 - k) to 0 and the rest to 1, a `SubnetLinear` module whose forward builds
its mask from its scores on every call, and an MLP of those. Same backbone (signed constant), same
score init, same optimiser (SGD lr 0.3, momentum 0.9, weight decay 1e-4, cosine schedule), same
data, batch size (64) and loop (shuffle, cross-entropy, loss.item() per batch).

Also (C) ours with `_TopK` forced onto its torch.topk path (`_TopK.SELECTION_MIN_NUMEL` raised
above every layer's size; the masks are identical, only the time differs): what the O(n) selection
in `_TopK._by_selection` gains over torch.topk, measured in the same run.

Per configuration (architecture x density): one warm-up run of each, then REPEATS repetitions of
A, B, C in turn (A B C A B C ...), each a fresh training run of the configuration's epochs (setup
and the final mask included, so per epoch = run time / epochs). Reported: the median
reference/ours ratio of the repetitions with its min-max, for wall-clock time (perf_counter) and
for the process's CPU time (process_time: what the machine actually spent, less sensitive to other
processes sharing the cores), the same for ours-with-topk / ours, and the median seconds per epoch
of each. torch.set_num_threads(THREADS).
Prints a Markdown table and writes the same numbers to bench/results/train_speed.json.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from registry import build_architecture
from trainer import TaskData, TrainingContext, get_method, get_stream
from trainer.supsup import _TopK

from ._command import run_benchmark

THREADS = 1  # 2 shared cores under load from other jobs: one thread gives the steadiest ratios
WARMUP, REPEATS = 1, 5
BATCH_SIZE = 64
DENSITIES = (0.5, 0.1)
RANDOM_EXAMPLES = 2048  # training examples of the random-data configurations
SEED = 0
RESULTS = Path(__file__).parent / "results" / "train_speed.json"

# (label, MLP sizes, data, epochs per timed run): "permuted-digits" is task 0 of that stream (1437
# training examples); "random" is RANDOM_EXAMPLES uniform inputs of the first size with random labels.
CONFIGS = (
    ("MLP 64-512-512-10", [64, 512, 512, 10], "permuted-digits", 2),
    ("LeNet-300-100 (784-300-100-10)", [784, 300, 100, 10], "random", 2),
    ("MLP 64-1024-1024-10", [64, 1024, 1024, 10], "random", 1),
)


# ---------------------------------------------------------------- the reference style (edge-popup / SupSup code)


class GetSubnet(torch.autograd.Function):
    """As in the public edge-popup code: sort every score, zero the bottom (1 - k), one the rest."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()  # a view: scores are contiguous
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None  # straight-through


class SubnetLinear(nn.Linear):
    """A bias-free linear layer with a fixed weight and trainable scores; the mask is rebuilt every forward."""

    def __init__(self, in_features: int, out_features: int, density: float):
        super().__init__(in_features, out_features, bias=False)
        self.density = density
        self.scores = nn.Parameter(torch.empty(self.weight.size()))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        self.weight.requires_grad_(False)

    def forward(self, x):
        subnet = GetSubnet.apply(self.scores.abs(), self.density)
        return F.linear(x, self.weight * subnet)


class SubnetMLP(nn.Module):
    def __init__(self, sizes: list[int], density: float, backbone: list[torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(SubnetLinear(i, o, density) for i, o in zip(sizes, sizes[1:]))
        with torch.no_grad():
            for layer, weight in zip(self.layers, backbone):
                layer.weight.copy_(weight)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else F.relu(x))
        return x


def train_reference(sizes: list[int], density: float, backbone: list[torch.Tensor], task: TaskData, epochs: int,
                    seed: int) -> float:
    """The reference training loop; returns the last epoch's mean training loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SubnetMLP(sizes, density, backbone)
    scores = [layer.scores for layer in model.layers]
    optimizer = torch.optim.SGD(scores, lr=0.3, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    n = len(task.y_train)
    total = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(task.x_train[batch])[:, : task.num_classes], task.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
    return total / n


# ---------------------------------------------------------------- ours


def train_ours(sizes: list[int], density: float, backbone: dict[str, torch.Tensor], task: TaskData, epochs: int,
               seed: int) -> None:
    method = get_method("supsup", density=density, epochs=epochs, batch_size=BATCH_SIZE, lr=0.3, momentum=0.9,
                        weight_decay=1e-4)
    spec = {"arch": "mlp", "sizes": sizes}
    context = TrainingContext(spec, backbone, [], {})
    method.learn_task(build_architecture(spec), task, torch.Generator().manual_seed(seed), context)


def train_ours_topk(sizes: list[int], density: float, backbone: dict[str, torch.Tensor], task: TaskData, epochs: int,
                    seed: int) -> None:
    """`train_ours` with every mask computed by _TopK's torch.topk path (same masks, the old speed)."""
    saved = _TopK.SELECTION_MIN_NUMEL
    _TopK.SELECTION_MIN_NUMEL = 1 << 62
    try:
        train_ours(sizes, density, backbone, task, epochs, seed)
    finally:
        _TopK.SELECTION_MIN_NUMEL = saved


# ---------------------------------------------------------------- measurement


def make_task(sizes: list[int], data: str) -> TaskData:
    if data == "permuted-digits":
        return get_stream("permuted-digits", SEED).task(0)
    generator = torch.Generator().manual_seed(SEED)
    classes = sizes[-1]
    x = torch.rand(RANDOM_EXAMPLES, sizes[0], generator=generator)
    y = torch.randint(classes, (RANDOM_EXAMPLES,), generator=generator)
    return TaskData(0, "random", x, y, x[:256], y[:256], num_classes=classes)


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(label: str, sizes: list[int], data: str, epochs: int, density: float) -> dict:
    task = make_task(sizes, data)
    spec = {"arch": "mlp", "sizes": sizes}
    method = get_method("supsup")
    backbone = method.create_backbone(build_architecture(spec), torch.Generator().manual_seed(SEED))
    layers = [backbone[name] for name in backbone]  # fc0.weight, fc1.weight, ... in forward order
    runs = {
        "reference": lambda: train_reference(sizes, density, layers, task, epochs, SEED),
        "ours": lambda: train_ours(sizes, density, backbone, task, epochs, SEED),
        "ours_topk": lambda: train_ours_topk(sizes, density, backbone, task, epochs, SEED),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    for repetition in range(WARMUP + REPEATS):
        for name, run in runs.items():  # A (reference), B (ours), C (ours, topk path), every repetition
            wall, cpu = timed(run)
            if repetition >= WARMUP:
                times[name]["wall"].append(wall / epochs)
                times[name]["cpu"].append(cpu / epochs)
    row = {"config": label, "sizes": sizes, "data": data, "density": density, "epochs_per_run": epochs,
           "examples": len(task.y_train), "batches_per_epoch": math.ceil(len(task.y_train) / BATCH_SIZE),
           "weights": sum(t.numel() for t in backbone.values()), "seconds_per_epoch": times}
    for clock in ("wall", "cpu"):
        ratios = [a / b for a, b in zip(times["reference"][clock], times["ours"][clock])]
        gains = [c / b for c, b in zip(times["ours_topk"][clock], times["ours"][clock])]
        row[clock] = {
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "topk_ratio_median": statistics.median(gains), "topk_ratio_min": min(gains), "topk_ratio_max": max(gains),
            **{f"{name}_s_median": statistics.median(times[name][clock]) for name in runs},
        }
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| architecture | data | density | weights | reference s/epoch | ours s/epoch | reference / ours (wall) "
        "| reference / ours (CPU time) | ours-topk s/epoch | ours-topk / ours (wall) | ours-topk / ours (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        w, c = row["wall"], row["cpu"]
        lines.append(
            f"| {row['config']} | {row['data']} ({row['examples']} ex, {row['batches_per_epoch']} batches) "
            f"| {row['density']:g} | {row['weights']:,} | {w['reference_s_median']:.3f} | {w['ours_s_median']:.3f} "
            f"| {w['ratio_median']:.2f}x ({w['ratio_min']:.2f}-{w['ratio_max']:.2f}) "
            f"| {c['ratio_median']:.2f}x ({c['ratio_min']:.2f}-{c['ratio_max']:.2f}) "
            f"| {w['ours_topk_s_median']:.3f} | {w['topk_ratio_median']:.2f}x ({w['topk_ratio_min']:.2f}-{w['topk_ratio_max']:.2f}) "
            f"| {c['topk_ratio_median']:.2f}x ({c['topk_ratio_min']:.2f}-{c['topk_ratio_max']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    rows = [measure(label, sizes, data, epochs, density) for label, sizes, data, epochs in CONFIGS
            for density in DENSITIES]
    print(f"SupSup mask training, seconds per epoch (wall-clock medians), batch {BATCH_SIZE}, SGD lr 0.3 momentum 0.9; "
          f"{WARMUP} warm-up then {REPEATS} alternating repetitions (reference, ours, ours-topk) of "
          f"{'/'.join(str(c[3]) for c in CONFIGS)}-epoch runs; ratios: median (min-max) of the per-repetition ratios; "
          f"ours-topk = ours with _TopK on its torch.topk path (identical masks); torch.set_num_threads({THREADS})\n")
    print(table(rows) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    setup = {"threads": THREADS, "warmup": WARMUP, "repeats": REPEATS,
             "batch_size": BATCH_SIZE, "densities": list(DENSITIES), "random_examples": RANDOM_EXAMPLES,
             "seconds": round(time.perf_counter() - began, 1)}
    RESULTS.write_text(json.dumps({"benchmark": "train_speed", "setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
