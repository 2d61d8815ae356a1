"""ExSSNeT (+ KKT): exclusive weight training keeps published tasks bit-exact, KKT copies the scores
of the most similar earlier task, appending equals training at once, and a real server serves it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from registry import MaskbankError, Registry, build_architecture, effective_parameters, forward
from trainer import PublishedTask, TrainingContext, get_method, get_stream, train
from trainer.exssnet import check_exclusive, free_mask, sparse_overlap
from trainer.loop import task_generator

ARCH = {"arch": "mlp", "sizes": [64, 64, 64, 10]}
CONFIG = {"density": 0.2, "epochs": 2, "weight_epochs": 1, "kkt": True}
SETTINGS = {"method": "exssnet", "stream": "permuted-digits", "architecture": ARCH, "method_config": CONFIG}


def quiet_train(root, tasks: int, requested: dict = SETTINGS, model: str = "m") -> Registry:
    registry = Registry(root)
    train(registry, model, tasks, requested, log=lambda _: None)
    return registry


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Registry:
    """Three ExSSNeT+KKT tasks trained in one run."""
    return quiet_train(tmp_path_factory.mktemp("once"), 3)


def context_of(registry: Registry, model: str = "m") -> TrainingContext:
    """What the loop hands a method that appends to `model` (everything decoded from the registry)."""
    manifest = registry.manifest(model)
    tasks = [PublishedTask(t.id, t.name, t.num_classes, t.backbone, {k: registry.load(r) for k, r in t.parts.items()},
                           {k: registry.load(r) for k, r in t.state.items()}) for t in manifest.tasks]
    latest = max(manifest.backbones, key=int)
    return TrainingContext(manifest.architecture, registry.load_backbone(manifest, latest), tasks, {})


def task_logits(registry: Registry, manifest, task: int, backbone_version: str | None = None) -> torch.Tensor:
    entry = manifest.task(task)
    parts = {k: registry.load(r) for k, r in entry.parts.items()}
    backbone = registry.load_backbone(manifest, backbone_version or entry.backbone)
    with torch.no_grad():
        params = effective_parameters(entry.method, backbone, parts)
        return forward(build_architecture(manifest.architecture).eval(), params, get_stream("permuted-digits").task(task).x_test)


def test_sparse_overlap_and_free_mask_on_a_hand_made_example():
    m = {"a": torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool), "b": torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)}
    earlier = [{"a": torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.bool), "b": torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)},
               {"a": torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool), "b": torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)}]
    free = free_mask(m, earlier)
    assert free["a"].tolist() == [False, False, True, False, False, True]
    assert free["b"].tolist() == [[True, False], [False, True]]
    # |M| = 4 + 3 = 7; free 2 + 2 = 4; overlap (7 - 4) / 7
    assert sparse_overlap(m, earlier) == pytest.approx(3 / 7)
    assert sparse_overlap(m, []) == 0.0 and free_mask(m, [])["a"].tolist() == m["a"].tolist()


def test_exclusivity_check_fires_on_a_weight_outside_the_free_mask():
    reference = {"fc.weight": torch.arange(6.0).reshape(2, 3)}
    free = {"fc.weight": torch.tensor([[True, False, False], [False, True, False]])}
    inside = {"fc.weight": reference["fc.weight"].clone()}
    inside["fc.weight"][0, 0] += 1.0  # a free weight may move
    check_exclusive(inside, reference, free)
    tampered = {"fc.weight": reference["fc.weight"].clone()}
    tampered["fc.weight"][1, 2] = 7.5
    with pytest.raises(RuntimeError, match=r"exclusivity violated: 1 weight\(s\) of 'fc.weight' outside the task's free "
                                           r"mask moved \(first at flat index 5: 5.0 -> 7.5\)"):
        check_exclusive(tampered, reference, free)
    tampered["fc.weight"][1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="exclusivity violated"):
        check_exclusive(tampered, reference, free)


def _two_tasks(method, arch=ARCH):
    """Learn task 0 with `method`; return (task 1, the context task 1 sees, task 0's artifact, the initial backbone)."""
    stream = get_stream("permuted-digits")
    backbone = method.create_backbone(build_architecture(arch), task_generator(0, 99))
    first = method.learn_task(build_architecture(arch), stream.task(0), task_generator(0, 0), TrainingContext(arch, backbone, [], {}))
    published = PublishedTask(0, "perm-0", 10, "2", first.parts, first.state)
    return stream.task(1), TrainingContext(arch, first.backbone, [published], {}), first, backbone


def test_weight_phase_moves_only_free_weights_and_the_check_guards_the_optimiser(monkeypatch):
    method, arch = get_method("exssnet", density=0.5, epochs=1, weight_epochs=1), {"arch": "mlp", "sizes": [64, 32, 32, 10]}
    task1, context, first, start = _two_tasks(method, arch)
    # task 0 trains exactly its own mask's weights: everything else keeps the signed-constant init
    for name, mask in first.parts["masks"].items():
        changed = first.backbone[name] != start[name]
        assert changed.any() and not (changed & ~mask).any()
    second = method.learn_task(build_architecture(arch), task1, task_generator(0, 1), context)
    free = free_mask(second.parts["masks"], [first.parts["masks"]])
    for name in free:
        changed = second.backbone[name] != first.backbone[name]
        assert changed.any() and not (changed & ~free[name]).any()
        assert not (second.backbone[name] != first.backbone[name])[first.parts["masks"][name]].any()
    assert second.metrics["sparse_overlap"] == pytest.approx(sparse_overlap(second.parts["masks"], [first.parts["masks"]]))
    assert second.metrics["sparse_overlap"] > 0.3  # at density 0.5 the masks must overlap
    assert second.metrics["free_fraction"] == pytest.approx(1 - second.metrics["sparse_overlap"])
    # Without the gradient restriction the shared weights of M_1 move, and the per-step check says so.
    monkeypatch.setattr("trainer.exssnet.zero_outside", lambda weights, free: None)
    with pytest.raises(RuntimeError, match="exclusivity violated"):
        method.learn_task(build_architecture(arch), task1, task_generator(0, 1), context)


def test_published_tasks_stay_bit_exact_in_process(trained):
    first, last = trained.manifest("m", 1), trained.manifest("m")
    assert [t.backbone for t in last.tasks] == ["2", "3", "4"]  # each task published a trained version
    assert last.tasks[0] == first.tasks[0]
    before = task_logits(trained, first, 0)
    assert torch.equal(task_logits(trained, last, 0), before)
    assert torch.equal(task_logits(trained, last, 0, backbone_version="4"), before)  # the newest weights, same task
    matrix = last.training["accuracy_matrix"]
    assert all(row[0] == matrix[0][0] for row in matrix) and matrix[2][1] == matrix[1][1]
    assert last.training["forgetting"] == 0.0


def test_kkt_copies_the_best_earlier_tasks_scores(trained):
    tasks = trained.manifest("m").tasks
    assert tasks[0].metrics["kkt_source"] is None and tasks[0].metrics["kkt_accuracies"] == {}
    assert tasks[1].metrics["kkt_source"] == 0 and tasks[1].metrics["kkt_accuracies"]["0"] > tasks[1].metrics["kkt_threshold"]
    assert tasks[2].metrics["kkt_source"] in (0, 1) and set(tasks[2].metrics["kkt_accuracies"]) == {"0", "1"}
    assert all(s.dtype == torch.float16 for s in trained.load(tasks[0].state["scores"]).values())
    # Task 3 starts from a copy of the chosen task's stored scores: with no training at all they come back as is.
    context = context_of(trained)
    untrained = get_method("exssnet", **{**CONFIG, "epochs": 0, "weight_epochs": 0})
    artifact = untrained.learn_task(build_architecture(ARCH), get_stream("permuted-digits").task(3), task_generator(0, 3), context)
    source = artifact.metrics["kkt_source"]
    assert source in (0, 1, 2) and artifact.backbone is None
    stored = context.tasks[source].state["scores"]
    assert all(torch.equal(artifact.state["scores"][n], stored[n]) for n in stored)
    # the same weights and scores (but rounded to float16: a few top-k ties fall the other way): nearly the same mask
    assert artifact.metrics["sparse_overlap"] > 0.99


def test_kkt_does_not_transfer_below_its_threshold(trained):
    method = get_method("exssnet", **{**CONFIG, "kkt_margin": 1.0})
    source, scores, accuracies, threshold = method.transfer(
        build_architecture(ARCH), get_stream("permuted-digits").task(3), task_generator(0, 3), context_of(trained))
    assert source is None and scores is None and threshold > 1 and set(accuracies) == {"0", "1", "2"}


def test_appending_equals_training_at_once(trained, tmp_path):
    twice = quiet_train(tmp_path, 2)
    first_two = twice.manifest("m").tasks
    appended = quiet_train(tmp_path, 3, {}).manifest("m")  # settings come from the stored model
    once = trained.manifest("m")
    assert appended.tasks[:2] == first_two
    assert [t.parts for t in appended.tasks] == [t.parts for t in once.tasks]
    assert [t.state for t in appended.tasks] == [t.state for t in once.tasks]  # KKT read the stored float16 scores
    assert appended.backbones == once.backbones


def test_config_is_checked():
    with pytest.raises(MaskbankError, match="method 'exssnet': density must be in"):
        get_method("exssnet", density=0.0)
    with pytest.raises(MaskbankError, match=r"has no option\(s\) \['mask_lr'\]"):
        get_method("exssnet", mask_lr=0.1)


@pytest.mark.slow
def test_served_by_a_real_server_bit_exact_after_more_tasks(tmp_path):
    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    from .conftest import wait_for

    stream = get_stream("permuted-digits")
    registry = quiet_train(tmp_path, 1)

    def served(client, task: int, **parameters) -> np.ndarray:
        """Logits of the task's whole test set, in requests of 180 rows (the server takes at most 256)."""
        x = stream.task(task).x_test.numpy()
        inputs = [triton.InferInput("input", [len(part), x.shape[1]], "FP32") for part in np.split(x, [180])]
        for inp, part in zip(inputs, np.split(x, [180])):
            inp.set_data_from_numpy(part)
        return np.concatenate([client.infer("m", [inp], parameters=parameters).as_numpy("logits") for inp in inputs])

    with ServerProcess(tmp_path, "--poll-interval", "0.2") as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready("m"), what="the model to be ready")
        before = served(client, 0, task_id=0)
        quiet_train(tmp_path, 4)  # published to the live server
        wait_for(lambda: client.get_model_metadata("m").versions == ["4"], what="the server to load generation 4")
        assert np.array_equal(served(client, 0, task_id=0), before)
        manifest = registry.manifest("m")
        for task in range(4):
            logits = served(client, task, task_id=task)
            assert np.array_equal(logits, task_logits(registry, manifest, task).numpy())
            accuracy = float((logits.argmax(1) == stream.task(task).y_test.numpy()).mean())
            assert accuracy == pytest.approx(manifest.tasks[task].metrics["accuracy"], abs=1e-6)
        assert served(client, 2, task_inference="exhaustive").shape[1] == 10
        client.close()
