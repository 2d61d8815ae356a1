"""GN modes on a trained SupSup model, called in-process as the server calls them (no mocks)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from serving import superposition
from serving.cache import LRUCache
from serving.repository import ModelRepository
from serving.snapshot import Snapshot
from serving.superposition import MaskStack
from serving.task_inference import infer_task, mean_entropy, superposition_gradient
from trainer import get_stream

from .conftest import TINY, train_model

TASKS, BATCH, BATCHES_PER_TASK = 10, 16, 5
SPARSE = {"architecture": {"arch": "mlp", "sizes": [64, 128, 128, 10]}, "method_config": {"epochs": 8, "density": 0.1}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return train_model(tmp_path_factory.mktemp("gn"), "sparse", TASKS, SPARSE)


@pytest.fixture(scope="module", params=["float matrix cached", "packed masks"])
def snapshot(request, registry) -> Snapshot:
    """The server's two paths to the mask product: the [T, E] float matrix kept in a cache big enough
    for it, and the bitpacked masks unpacked a few rows at a time where the cache holds nothing."""
    cache = LRUCache(1 << 28 if request.param == "float matrix cached" else 0)
    return Snapshot.load(registry, registry.manifest("sparse"), None, cache)


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
    every = infer_task("binary", snapshot, x, shortlist=TASKS)  # no round narrows anything: it had no score at all
    assert every.task.entry.id == exact.task.entry.id and sorted(every.scores) == list(range(TASKS))
    assert every.scores == superposition_gradient(snapshot, x, list(range(TASKS)))  # its first round's


def test_binary_checks_as_many_candidates_as_its_shortlist(snapshot):
    """A median split could leave fewer than k (10 tasks, k = 6: 5), so fewer than the k best were checked."""
    x = get_stream("permuted-digits").task(3).x_test[:BATCH]
    for k in range(2, TASKS + 1):
        checked: list[int] = []

        def counting(tasks, rows):
            checked.append(len(tasks))
            return snapshot.logits_of(tasks, rows)

        infer_task("binary", snapshot, x, shortlist=k, logits_of=counting)
        assert checked == [k], k


def autograd_signal(snapshot: Snapshot, x, candidates: list[int], input_layer_only: bool) -> dict[int, float]:
    """dH/dalpha the straightforward way: autograd through W * sum_i alpha_i M_i at alpha = 1/k.

    The forward uses the mean mask exactly (plus a zero that carries alpha's gradient): computed
    as sum_i alpha_i M_i it differs in the last bit, and on digits some hidden units' superposed
    input cancels to exactly zero, so that last bit picks the side of their ReLU."""
    tasks = [snapshot.tasks[i] for i in candidates]
    backbone = snapshot.backbones[tasks[0].entry.backbone]
    first = next(iter(backbone))
    alpha = torch.full((len(tasks),), 1.0 / len(tasks), requires_grad=True)
    params = {}
    for name, weight in backbone.items():
        masks = torch.stack([t.parts["masks"][name].to(torch.float32) for t in tasks])
        zero = torch.tensordot(alpha - alpha.detach(), masks, dims=1) if name == first or not input_layer_only else 0
        params[name] = weight * (masks.mean(dim=0) + zero)
    classes = max(t.entry.num_classes for t in tasks)
    entropy = mean_entropy(snapshot.forward(params, x)[:, :classes])
    (gradient,) = torch.autograd.grad(entropy, alpha)
    return dict(zip(candidates, gradient.tolist()))


@pytest.mark.parametrize("input_layer_only", [False, True], ids=["oneshot", "oneshot-input"])
@pytest.mark.parametrize("candidates", [list(range(TASKS)), [7, 2, 9, 4, 0]], ids=["all tasks", "binary round"])
def test_stacked_mask_gradient_equals_autograd_through_alpha(snapshot, input_layer_only, candidates):
    x = get_stream("permuted-digits").task(3).x_test[:BATCH]
    fast = superposition_gradient(snapshot, x, candidates, input_layer_only)
    slow = autograd_signal(snapshot, x, candidates, input_layer_only)
    assert list(fast) == candidates
    assert torch.allclose(torch.tensor(list(fast.values())), torch.tensor(list(slow.values())), rtol=1e-4, atol=1e-7)
    assert min(fast, key=fast.get) == min(slow, key=slow.get)


def test_stacked_mask_gradient_of_a_cnn_equals_autograd_through_alpha(tmp_path):
    """Not a plain MLP: the entropy gradient comes from autograd (serving/entropy.py)."""
    cnn = {"architecture": {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "width": 4},
           "method_config": {"epochs": 1}}
    registry = train_model(tmp_path, "cnn", 3, cnn)
    snapshot = Snapshot.load(registry, registry.manifest("cnn"), None, LRUCache(1 << 26))
    x = get_stream("permuted-digits").task(1).x_test[:BATCH]
    for candidates, input_layer_only in (([0, 1, 2], False), ([0, 1, 2], True), ([2, 0], False)):
        fast = list(superposition_gradient(snapshot, x, candidates, input_layer_only).values())
        slow = list(autograd_signal(snapshot, x, candidates, input_layer_only).values())
        assert torch.allclose(torch.tensor(fast), torch.tensor(slow), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("candidates", [list(range(TASKS)), [7, 2, 9, 4, 0]], ids=["all tasks", "binary round"])
def test_packed_masks_give_the_float_matrix_signal_and_hold_no_matrix(registry, candidates, monkeypatch):
    """Where the cache cannot hold the float matrix, the signal comes from the packed masks, in blocks
    of a few rows (3 here, so blocks end mid-list), with the same values and without the matrix."""
    manifest = registry.manifest("sparse")
    dense, packed = (Snapshot.load(registry, manifest, None, LRUCache(size)) for size in (1 << 28, 0))
    x = get_stream("permuted-digits").task(6).x_test[:BATCH]
    width = dense.mask_stack().width
    monkeypatch.setattr(superposition, "CHUNK_BYTES", 3 * 4 * width)
    for input_layer_only in (False, True):
        expected = superposition_gradient(dense, x, candidates, input_layer_only)
        got = superposition_gradient(packed, x, candidates, input_layer_only)
        assert torch.allclose(torch.tensor(list(got.values())), torch.tensor(list(expected.values())), rtol=1e-5, atol=1e-9)
        assert min(got, key=got.get) == min(expected, key=expected.get)
    for mode in ("oneshot", "oneshot-input", "binary"):
        assert infer_task(mode, packed, x).task.entry.id == infer_task(mode, dense, x).task.entry.id
    assert dense._cache.stats().bytes >= TASKS * width * 4  # the float matrix of all tasks, kept
    assert packed._cache.stats().bytes == 0 and packed._cache.stats().rejections > 0


def test_a_reload_prepares_the_next_stack_from_the_last_and_retires_its_matrix(tmp_path):
    """A hot add while gradient modes are in use: the new generation's stack is built at load from the
    last one (only the new task's masks summed, the same sums as from scratch), its float matrix is
    cached by the refresh rather than by a request, and the old matrix leaves the cache."""
    registry = train_model(tmp_path, "m", 3, TINY)
    repository = ModelRepository(registry, cache_bytes=1 << 26)
    repository.refresh()
    old = repository.get("m")
    x = get_stream("permuted-digits").task(1).x_test[:BATCH]
    infer_task("oneshot", old, x)
    old_stack = old.mask_stack()
    assert old_stack.key in repository.cache

    first = registry.manifest("m").tasks[0]
    shapes = registry.load(first.parts["masks"]).shapes
    generator = torch.Generator().manual_seed(5)
    added = dataclasses.replace(first, id=3, name="added", parts={
        "masks": registry.put("bitmask/v1", {n: torch.rand(s, generator=generator) < 0.5 for n, s in shapes.items()})})
    registry.publish("m", lambda manifest: manifest.next(tasks=manifest.tasks + (added,)))
    repository.refresh()
    new = repository.get("m")

    stack = new._mask_stack  # built by the refresh, before any request
    assert isinstance(stack, MaskStack) and stack.ids == [0, 1, 2, 3]
    assert old_stack.is_prefix_of(stack)  # the same mask objects: only task 3 was summed
    scratch = MaskStack.build(stack.ids, stack.classes, stack.masks, stack.backbone, LRUCache(0), "scratch")
    assert torch.equal(stack.sums, scratch.sums)
    assert all(torch.equal(stack.superposed[n], scratch.superposed[n]) for n in scratch.superposed)
    assert stack.key in repository.cache
    assert old_stack.key not in repository.cache and old_stack.dense() is None  # retired: never cached again
    assert infer_task("oneshot", old, x).task.entry.id in range(3)  # requests still on the old one are served


@pytest.mark.parametrize("gradients", [True, False], ids=["default mode by gradient", "default exhaustive"])
def test_a_server_defaulting_to_a_gradient_mode_loads_models_ready_for_it(tmp_path, gradients):
    registry = train_model(tmp_path, "m", 2, TINY)
    repository = ModelRepository(registry, cache_bytes=1 << 26, gradients=gradients)
    repository.refresh()
    stack = repository.get("m")._mask_stack
    assert isinstance(stack, MaskStack) == gradients
    assert (gradients and stack.key in repository.cache) or repository.cache.stats().bytes == 0


def test_a_matrix_larger_than_the_cache_is_reported_once_with_the_size_to_set(tmp_path, caplog):
    registry = train_model(tmp_path, "m", 2, TINY)
    snapshot = Snapshot.load(registry, registry.manifest("m"), None, LRUCache(1000))
    x = get_stream("permuted-digits").task(0).x_test[:BATCH]
    with caplog.at_level("WARNING", logger="maskbank.serving"):
        for _ in range(3):
            infer_task("oneshot", snapshot, x)
    warnings = [r.getMessage() for r in caplog.records if "mask matrix" in r.getMessage()]
    megabytes = 2 * snapshot.mask_stack().width * 4 / 1e6
    assert len(warnings) == 1
    assert warnings[0].startswith(f"model 'm': the gradient task-inference modes' float mask matrix (2 tasks, {megabytes:.1f} MB) "
                                  "exceeds --cache-bytes (0.0 MB)")
    assert warnings[0].endswith(f"raise --cache-bytes above {math.ceil(megabytes)} MB to keep it")  # not "above 0 MB"


def test_a_request_does_not_wait_for_another_thread_building_the_matrix(tmp_path):
    registry = train_model(tmp_path, "m", 3, TINY)
    snapshot = Snapshot.load(registry, registry.manifest("m"), None, LRUCache(0))
    stack = snapshot.mask_stack()
    cached = MaskStack.build(stack.ids, stack.classes, stack.masks, stack.backbone, LRUCache(1 << 26), "cached")
    x = get_stream("permuted-digits").task(2).x_test[:BATCH]
    gradients = snapshot.entropy_gradients(stack.superposed, x, max(stack.classes), list(stack.columns))
    expected = cached.gradient(cached.subset(None), gradients)
    cached.cache.evict(cached.key)
    with cached._building:  # another thread is building the matrix: the packed masks serve meanwhile
        tasks = cached.subset(None)
        assert tasks.dense is None
        assert torch.allclose(cached.gradient(tasks, gradients), expected, rtol=1e-5, atol=1e-9)
    assert cached.dense() is not None and cached.key in cached.cache


def test_non_finite_scores_rank_last_and_never_break_a_ranking():
    """NaN compares false with everything: binary's median split kept no task and failed. A
    non-finite score (the network overflowed) is +inf, so it ranks after every finite one."""
    from serving.task_inference import _scores

    assert _scores(torch.tensor([0.5, float("nan"), float("-inf"), float("inf"), -1.0])) == [0.5, math.inf, math.inf, math.inf, -1.0]
