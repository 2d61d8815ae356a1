"""Snapshot memory benchmark: the resident bytes of a served snapshot's task masks, its load time, and
what task inference by gradient holds and costs on it.

A server holds every task's masks for the life of a snapshot, outside the byte bound of its weight
cache (--cache-bytes). Builds a registry of TASKS synthetic SupSup tasks (random supermasks at
DENSITY, stored as bitmask/v1; what the masks learned does not change their size) over the benchmark
network, MLP SIZES with a signed-constant backbone, loads it as the server does
(serving.snapshot.Snapshot.load), and reports per task:

  * the masks as the snapshot holds them (PackedMasks, registry/packed.py): 1 bit per weight;
  * the same masks decoded to bool tensors, as snapshots held them before: 1 byte per weight.

Load time: A = Snapshot.load (read, verify, keep packed); B = the same, then every mask unpacked to
bool (what loading cost when masks were decoded); A B A B ... for REPEATS rounds after a warm-up,
the median ratio with its min-max and the median seconds of each.

Superposition (task inference by gradient, serving/superposition.py): the memory and latency of
`oneshot`, `oneshot-input` and `binary` on the same snapshot, A = the [T, E] float matrix of the
masks kept in a cache big enough for it, B = a cache that admits nothing (as a --cache-bytes below the
matrix's 1.2 GB, like 256MiB, does), so the product is computed from the packed masks block by block;
a batch of GN_BATCH random inputs, A B A B ... for REPEATS rounds after a warm-up.

Reload while gradient modes are in use (a hot add): the snapshot of the last task's generation
loaded over that of the TASKS - 1 before it, whose stack is built. A = Snapshot.load, which now
prepares the new stack from the previous one; B = Snapshot.load without a previous snapshot's stack
(as before: the first gradient request then summed every task's masks), then mask_stack(). Both
with a cache that admits nothing (the float matrix is timed above), REPEATS alternated rounds.

Task-given forward at batch FORWARD_BATCH on the same snapshot (what task_mix's requests cost, without
gRPC): one task, its weights cached and warm in the CPU's caches (the reference); a random task of the
TASKS each call, its weights cached (a cache big enough for all: a hit, read cold from memory); a
random task each call with a cache that admits nothing (every call builds the weights from the packed
masks into per-thread buffers: a miss). FORWARD_CALLS calls each, alternated, REPEATS rounds.

torch.set_num_threads(THREADS). Prints Markdown tables and writes the same numbers to
bench/results/snapshot_memory.json.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from registry import Manifest, PackedMasks, Registry, TaskEntry
from registry.codecs import signed_constant
from serving.cache import LRUCache
from serving.snapshot import Snapshot
from serving.superposition import CHUNK_BYTES
from serving.task_inference import infer_task

from ._command import run_benchmark

TASKS = 1000
SIZES = [64, 512, 512, 10]
DENSITY = 0.5
THREADS = 1
REPEATS = 5
GN_BATCH = 16
GN_MODES = ["oneshot-input", "oneshot", "binary"]
FORWARD_BATCH, FORWARD_CALLS = 32, 300
MODEL = "bench"
RESULTS = Path(__file__).parent / "results" / "snapshot_memory.json"


def build_registry(root: Path) -> Registry:
    """A registry holding MODEL: TASKS SupSup tasks with random masks over one signed-constant backbone."""
    registry = Registry(root)
    generator = torch.Generator().manual_seed(0)
    shapes = {f"fc{i}.weight": (out, inp) for i, (inp, out) in enumerate(zip(SIZES, SIZES[1:]))}
    backbone = registry.put_backbone({n: signed_constant(s, generator) for n, s in shapes.items()}, "signed-constant/v1")
    tasks = tuple(
        TaskEntry(id=i, name=f"synthetic-{i}", method="supsup", backbone="1", num_classes=SIZES[-1],
                  parts={"masks": registry.put("bitmask/v1", {n: torch.rand(s, generator=generator) < DENSITY
                                                             for n, s in shapes.items()})})
        for i in range(TASKS)
    )
    registry.commit(Manifest(model=MODEL, generation=1, architecture={"arch": "mlp", "sizes": SIZES},
                             input_shape=(SIZES[0],), backbones={"1": backbone}, tasks=tasks))
    return registry


def load(registry: Registry) -> Snapshot:
    return Snapshot.load(registry, registry.manifest(MODEL), None, LRUCache(0))


def load_as_bool(registry: Registry) -> list[dict[str, torch.Tensor]]:
    """Load, then unpack every task's masks to bool: what a snapshot held before masks stayed packed."""
    return [dict(task.parts["masks"]) for task in load(registry).tasks.values()]


def held_bytes(snapshot: Snapshot) -> dict:
    """Bytes per task of the snapshot's masks as held (packed) and as bool tensors, and bits per weight."""
    masks: list[PackedMasks] = [task.parts["masks"] for task in snapshot.tasks.values()]
    weights = sum(shape.numel() for shape in masks[0].shapes.values())
    packed = statistics.mean(m.nbytes for m in masks)
    as_bool = statistics.mean(sum(t.numel() * t.element_size() for t in m.values()) for m in masks)
    return {"weights_per_task": weights, "packed_bytes_per_task": packed, "bool_bytes_per_task": as_bool,
            "packed_bits_per_weight": 8 * packed / weights, "bool_bits_per_weight": 8 * as_bool / weights,
            "packed_total_mb": packed * len(masks) / 1e6, "bool_total_mb": as_bool * len(masks) / 1e6}


def load_seconds(registry: Registry) -> dict:
    """Median seconds of A (load, packed) and B (load, then unpack to bool), and B / A per round."""
    load(registry), load_as_bool(registry)  # warm-up: page cache, imports
    times: dict[str, list[float]] = {"packed": [], "bool": []}
    for _ in range(REPEATS):
        for name, run in (("packed", load), ("bool", load_as_bool)):
            began = time.perf_counter()
            run(registry)
            times[name].append(time.perf_counter() - began)
    ratios = [b / a for a, b in zip(times["packed"], times["bool"])]
    return {"packed_s": statistics.median(times["packed"]), "bool_s": statistics.median(times["bool"]),
            "bool_vs_packed": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def superposition(registry: Registry) -> dict:
    """Memory and per-mode latency of task inference by gradient, float matrix cached (A) against
    packed masks unpacked block by block (B)."""
    cached, packed = (Snapshot.load(registry, registry.manifest(MODEL), None, LRUCache(size)) for size in (4 << 30, 0))
    x = torch.randn(GN_BATCH, SIZES[0], generator=torch.Generator().manual_seed(1))
    for snapshot in (cached, packed):  # warm-up: builds the stacks (and the matrix of `cached`)
        for mode in GN_MODES:
            infer_task(mode, snapshot, x)
    times: dict[str, dict[str, list[float]]] = {mode: {"cached": [], "packed": []} for mode in GN_MODES}
    for _ in range(REPEATS):
        for mode in GN_MODES:
            for name, snapshot in (("cached", cached), ("packed", packed)):
                began = time.perf_counter()
                infer_task(mode, snapshot, x)
                times[mode][name].append(time.perf_counter() - began)
    latency = {}
    for mode, runs in times.items():
        ratios = [b / a for a, b in zip(runs["cached"], runs["packed"])]
        latency[mode] = {"cached_ms": 1000 * statistics.median(runs["cached"]),
                         "packed_ms": 1000 * statistics.median(runs["packed"]),
                         "packed_vs_cached": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    stack = packed.mask_stack()
    return {"matrix_mb": len(stack.ids) * stack.width * 4 / 1e6, "cached_bytes": cached._cache.stats().bytes,
            "packed_cache_bytes": packed._cache.stats().bytes, "block_buffer_mb": CHUNK_BYTES / 1e6,
            "latency": latency}


def reload_with_gradients(registry: Registry) -> dict:
    """Seconds to have the stack of a generation with one task appended: prepared from the previous
    stack at load (A), or loaded then built from scratch (B)."""
    latest = registry.manifest(MODEL)
    earlier = dataclasses.replace(latest, generation=latest.generation - 1, tasks=latest.tasks[:-1])
    previous = Snapshot.load(registry, earlier, None, LRUCache(0))
    previous.mask_stack()

    def prepared() -> None:
        assert Snapshot.load(registry, latest, previous, LRUCache(0))._mask_stack is not None

    def from_scratch() -> None:
        Snapshot.load(registry, latest, _without_stack(previous), LRUCache(0)).mask_stack()

    times: dict[str, list[float]] = {"prepared": [], "scratch": []}
    for round_ in range(REPEATS + 1):  # the first round warms up
        for name, run in (("prepared", prepared), ("scratch", from_scratch)):
            began = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - began)
    ratios = [b / a for a, b in zip(times["prepared"], times["scratch"])]
    return {"prepared_ms": 1000 * statistics.median(times["prepared"]), "scratch_ms": 1000 * statistics.median(times["scratch"]),
            "scratch_vs_prepared": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def forward_cost(registry: Registry) -> dict:
    """Microseconds per task-given forward: one warm task, a random cached task (cold in memory), a
    random task built on every call (a miss), and each over the warm one (see the module docstring)."""
    manifest = registry.manifest(MODEL)
    cached, built = (Snapshot.load(registry, manifest, None, LRUCache(size)) for size in (4 << 30, 0))
    x = torch.rand(FORWARD_BATCH, SIZES[0], generator=torch.Generator().manual_seed(2))
    rng = random.Random(0)
    ids = sorted(cached.tasks)
    for task in cached.tasks.values():  # every task's weights into the cache
        cached.logits(task, x)
    warm = cached.tasks[ids[0]]

    def calls(snapshot: Snapshot, random_task: bool) -> float:
        tasks = [snapshot.tasks[rng.choice(ids)] if random_task else warm for _ in range(FORWARD_CALLS)]
        began = time.perf_counter()
        for task in tasks:
            snapshot.logits(task, x)
        return (time.perf_counter() - began) / FORWARD_CALLS * 1e6

    runs = {"one_task": (cached, False), "random_cached": (cached, True), "random_built": (built, True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for round_ in range(REPEATS + 1):  # the first round warms up
            for name, (snapshot, random_task) in runs.items():
                us = calls(snapshot, random_task)
                if round_:
                    times[name].append(us)
    out = {f"{name}_us": statistics.median(t) for name, t in times.items()}
    for name in ("random_cached", "random_built"):
        ratios = [a / b for a, b in zip(times[name], times["one_task"])]
        out[f"{name}_vs_one_task"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    out["cache"] = {"cached": dataclasses.asdict(cached._cache.stats()), "built": dataclasses.asdict(built._cache.stats())}
    return out


def _without_stack(snapshot: Snapshot) -> Snapshot:
    """`snapshot`'s loaded parts in a snapshot that never built a stack (a reload reuses them either way)."""
    return Snapshot(snapshot.manifest, snapshot.backbones, snapshot.shared, snapshot.tasks, LRUCache(0))


def main() -> None:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as root:
        registry = build_registry(Path(root))
        memory = held_bytes(load(registry))
        timing = load_seconds(registry)
        gn = superposition(registry)
        reload = reload_with_gradients(registry)
        forward = forward_cost(registry)
    print(f"Snapshot of {TASKS} SupSup tasks, MLP {SIZES}, random masks at density {DENSITY} (bitmask/v1); "
          f"torch.set_num_threads({THREADS}); load: {REPEATS} alternating rounds after a warm-up\n")
    print("| task masks held as | bytes per task | bits per weight | all tasks | load time (median) |")
    print("|---|---|---|---|---|")
    print(f"| bool tensors (before) | {memory['bool_bytes_per_task']:,.0f} | {memory['bool_bits_per_weight']:.2f} | "
          f"{memory['bool_total_mb']:.1f} MB | {timing['bool_s']:.2f} s (load, then unpack) |")
    print(f"| PackedMasks (now) | {memory['packed_bytes_per_task']:,.0f} | {memory['packed_bits_per_weight']:.2f} | "
          f"{memory['packed_total_mb']:.1f} MB | {timing['packed_s']:.2f} s |")
    ratio = timing["bool_vs_packed"]
    print(f"\nbool / packed: {memory['bool_bytes_per_task'] / memory['packed_bytes_per_task']:.1f}x the memory, "
          f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) the load time")
    print(f"\nTask inference by gradient on this snapshot, batch {GN_BATCH}: the float matrix of the masks "
          f"({gn['matrix_mb']:,.0f} MB) kept in the cache, or the packed masks unpacked in blocks "
          f"(a {gn['block_buffer_mb']:.1f} MB buffer per thread; the cache held {gn['packed_cache_bytes']:,} bytes)\n")
    print("| mode | matrix cached (ms) | packed masks (ms) | packed / cached |")
    print("|---|---|---|---|")
    for mode, row in gn["latency"].items():
        ratio = row["packed_vs_cached"]
        print(f"| {mode} | {row['cached_ms']:.1f} | {row['packed_ms']:.1f} | "
              f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |")
    ratio = reload["scratch_vs_prepared"]
    print(f"\nReload with one task appended while gradient modes are in use: stack prepared at load from the "
          f"previous one {reload['prepared_ms']:.1f} ms (load included), load then stack from scratch "
          f"{reload['scratch_ms']:.1f} ms: {ratio['median']:.1f}x ({ratio['min']:.1f}-{ratio['max']:.1f})")
    print(f"\nTask-given forward, batch {FORWARD_BATCH}, µs per call (median of {REPEATS} rounds of {FORWARD_CALLS} calls):\n")
    print("| task of each call | weights | µs | / one task |\n|---|---|---|---|")
    print(f"| one task | cached, warm | {forward['one_task_us']:.0f} | 1 |")
    for name, what in (("random_cached", "cached (a hit, cold in memory)"), ("random_built", "built from the packed masks (a miss)")):
        ratio = forward[f"{name}_vs_one_task"]
        print(f"| random of {TASKS} | {what} | {forward[f'{name}_us']:.0f} | "
              f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |")
    setup = {"tasks": TASKS, "sizes": SIZES, "density": DENSITY, "threads": THREADS, "repeats": REPEATS,
             "gn_batch": GN_BATCH, "forward_batch": FORWARD_BATCH, "forward_calls": FORWARD_CALLS}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "snapshot_memory", "setup": setup, "memory": memory,
                                   "load": timing, "superposition": gn,
                                   "reload_with_gradients": reload, "forward": forward}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
