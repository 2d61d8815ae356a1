"""A snapshot's effective-weight cache under more tasks than fit: what is kept, what is counted, and
that every answer stays bit-identical to registry.effective_parameters + forward."""

from __future__ import annotations

import torch

from registry import Manifest, PackedMasks, Registry, TaskEntry, build_architecture
from serving.cache import LRUCache
from serving.snapshot import Snapshot

from .conftest import task_logits

SIZES, TASKS = [8, 16, 4], 6


def snapshot_of_tasks(root, cache: LRUCache) -> tuple[Registry, Snapshot]:
    """SupSup tasks with random masks over a random (signed) backbone of MLP SIZES."""
    registry, generator = Registry(root), torch.Generator().manual_seed(0)
    module = build_architecture({"arch": "mlp", "sizes": SIZES})
    shapes = {name: p.shape for name, p in module.named_parameters()}
    backbone = registry.put_backbone({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()})
    entries = tuple(
        TaskEntry(id=i, name=f"t{i}", method="supsup", backbone="1", num_classes=SIZES[-1],
                  parts={"masks": registry.put("bitmask/v1", {n: torch.rand(s, generator=generator) < 0.5 for n, s in shapes.items()})})
        for i in range(TASKS)
    )
    manifest = Manifest(model="m", generation=1, architecture={"arch": "mlp", "sizes": SIZES}, input_shape=(SIZES[0],),
                        backbones={"1": backbone}, tasks=entries)
    registry.publish("m", lambda _: manifest)
    return registry, Snapshot.load(registry, registry.manifest("m"), None, cache)


def task_bytes() -> int:
    return 4 * sum(a * b for a, b in zip(SIZES, SIZES[1:]))  # float32 effective weights of one task


def test_misses_the_cache_refuses_are_served_exactly_and_counted(tmp_path):
    cache = LRUCache(2 * task_bytes())
    registry, snapshot = snapshot_of_tasks(tmp_path, cache)
    x = torch.randn(5, SIZES[0], generator=torch.Generator().manual_seed(1))
    order = [0, 0, 0, 1, 2, 3, 4, 5, 3, 0, 2, 1, 5, 4, 0]  # task 0 is the favourite
    for task in order:
        served = snapshot.logits(snapshot.task(task), x)
        assert torch.equal(served, task_logits(registry, task, x)), f"task {task}"
    stats = cache.stats()
    assert stats.hits + stats.misses == len(order)
    assert stats.rejections > 0 and stats.entries == 2 and stats.bytes == 2 * task_bytes()
    assert stats.misses == 2 + stats.rejections + stats.evictions  # every miss: admitted into room, refused, or evicting
    hits = stats.hits
    snapshot.logits(snapshot.task(0), x)
    assert cache.stats().hits == hits + 1  # the favourite stayed


def test_a_refused_miss_leaves_no_trace_in_the_next_answer(tmp_path):
    cache = LRUCache(task_bytes())
    registry, snapshot = snapshot_of_tasks(tmp_path, cache)
    x = torch.randn(3, SIZES[0], generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        snapshot.logits(snapshot.task(0), x)  # task 0 fills the cache and is used most
    for task in (1, 2, 1, 3):  # computed in the same scratch buffers, one after the other
        assert torch.equal(snapshot.logits(snapshot.task(task), x), task_logits(registry, task, x))
    assert cache.stats().rejections == 4 and cache.stats().entries == 1


def test_a_loaded_snapshot_holds_its_masks_bitpacked(tmp_path):
    registry, snapshot = snapshot_of_tasks(tmp_path, LRUCache(0))
    weights = sum(a * b for a, b in zip(SIZES, SIZES[1:]))
    for task in snapshot.tasks.values():
        masks = task.parts["masks"]
        assert isinstance(masks, PackedMasks) and all(p.dtype == torch.uint8 for p in masks.packed.values())
        assert weights / 8 <= masks.nbytes <= weights / 8 + len(masks)  # a byte per weight as bool


def test_a_task_reusing_another_generations_parts_keeps_its_own_entry(tmp_path):
    """A snapshot reuses the parts it decoded before (matched by blob digests) and took their task's
    entry with them: a task whose masks equal an earlier task's answered as that task (its id, name,
    labels), and a model published again with the same blobs kept the old names and labels."""
    import dataclasses

    cache = LRUCache(1 << 20)
    registry, first = snapshot_of_tasks(tmp_path, cache)
    manifest = registry.manifest("m")
    twin = dataclasses.replace(manifest.tasks[0], id=TASKS, name="twin-of-t0")
    relabelled = dataclasses.replace(manifest.tasks[1], labels=tuple("abcd"))
    second = dataclasses.replace(manifest, generation=2,
                                 tasks=(manifest.tasks[0], relabelled, *manifest.tasks[2:], twin))
    snapshot = Snapshot.load(registry, second, first, cache)
    assert snapshot.tasks[TASKS].entry == twin and snapshot.tasks[1].entry == relabelled
    assert snapshot.tasks[TASKS].parts is first.tasks[0].parts  # still decoded once
