"""GN modes on a trained SupSup model, called in-process as the server calls them (no mocks)."""

from __future__ import annotations

import pytest

from serving.cache import LRUCache
from serving.snapshot import Snapshot
from serving.task_inference import infer_task
from trainer import get_stream

from .conftest import train_model

TASKS, BATCH, BATCHES_PER_TASK = 10, 16, 5
SPARSE = {"architecture": {"arch": "mlp", "sizes": [64, 128, 128, 10]}, "method_config": {"epochs": 8, "density": 0.1}}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    registry = train_model(tmp_path_factory.mktemp("gn"), "sparse", TASKS, SPARSE)
    return Snapshot.load(registry, registry.manifest("sparse"), None, LRUCache(1 << 28))


def share_right(snapshot: Snapshot, mode: str, shortlist: int = 1) -> float:
    stream = get_stream("permuted-digits")
    right = total = 0
    for task in range(TASKS):
        x = stream.task(task).x_test
        for b in range(BATCHES_PER_TASK):
            right += infer_task(mode, snapshot, x[b * BATCH : (b + 1) * BATCH], shortlist).task.entry.id == task
            total += 1
    return right / total


def test_input_layer_gradient_finds_permuted_tasks_the_full_gradient_misses(snapshot):
    full, first = share_right(snapshot, "oneshot"), share_right(snapshot, "oneshot-input")
    print(f"\nGN right share, {TASKS} tasks, density 0.1: oneshot {full:.3f}, oneshot-input {first:.3f}")
    assert first >= 0.9
    assert first > full + 0.2  # the output layer's term biases the full gradient toward some tasks
    assert share_right(snapshot, "oneshot-input", shortlist=3) >= 0.98


def test_input_layer_shortlist_of_every_task_is_exhaustive(snapshot):
    x = get_stream("permuted-digits").task(4).x_test[:BATCH]
    full = infer_task("oneshot-input", snapshot, x, shortlist=TASKS)
    exact = infer_task("exhaustive", snapshot, x)
    assert full.task.entry.id == exact.task.entry.id
    assert full.logits.equal(exact.logits)
    assert sorted(full.scores) == list(range(TASKS))
