"""packnet-share: structured PackNet with share / omit decisions over earlier subnetworks.

Sharing strategies and the shares they record, bit-exact published tasks (in-process and through a
real server), frozen filters guarded after every optimiser step, connectivity on hand-made data,
appending equals training at once, and the errors a user can run into.
"""

from __future__ import annotations

import math

import pytest
import torch

from registry import InvalidArtifact, MaskbankError, Registry, build_architecture, effective_parameters
from registry.materialize_packnet import in_key, out_key
from trainer import PublishedTask, TrainingContext, get_method, get_stream, train
from trainer.loop import task_generator
from trainer.packnet import (
    PackNetShare,
    check_frozen,
    connectivity,
    dependency_closure,
    filter_activations,
    filter_layers,
    mean_activation,
    squared_correlations,
)

from .conftest import check_served_while_appending, task_logits

ARCH = {"arch": "mlp", "sizes": [64, 128, 128, 2]}
FAST = {"epochs": 4, "finetune_epochs": 2, "batch_size": 64, "score_samples": 128}
HIDDEN = ("fc0.weight", "fc1.weight")


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are tiny: intra-op threads only add synchronisation, which costs 10-40x when
    the machine's cores are busy with other work. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settings(share: str = "all", **config) -> dict:
    return {"method": "packnet-share", "stream": "split-digits", "architecture": ARCH,
            "method_config": {**FAST, "share": share, **config}}


def train_packnet(root, tasks: int, share: str = "all", model: str = "m", **config) -> Registry:
    registry = Registry(root)
    train(registry, model, tasks, settings(share, **config), log=lambda _: None)
    return registry


def own_filters(registry: Registry, model: str = "m") -> dict[int, dict[str, torch.Tensor]]:
    manifest = registry.manifest(model)
    tasks = [PublishedTask(t.id, t.name, t.num_classes, t.backbone, {k: registry.load(r) for k, r in t.parts.items()},
                           {}, t.shares) for t in manifest.tasks]
    return PackNetShare.own_filters(tasks, filter_layers(build_architecture(ARCH))[:-1])


# ---------------------------------------------------------------- connectivity and scores


def test_connectivity_on_hand_made_activations():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])  # centred: [-1.5, -0.5, 0.5, 1.5], squared norm 5
    b = torch.tensor([1.0, -1.0, -1.0, 1.0])  # centred already, orthogonal to a, squared norm 4
    t = math.sqrt(5) / 2  # d = a + t b: r(a, d)^2 = 5 / (5 + 4 t^2) = 1/2, r(b, d)^2 = 4 t^2 / 10 = 1/2
    layer0 = torch.stack([a, b], dim=1)
    layer1 = torch.stack([2 * a + 5, a + t * b, torch.full((4,), 3.0)], dim=1)  # c = 2a + 5, d, constant e
    expected01 = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]])
    assert torch.allclose(squared_correlations(layer0, layer1), expected01.double(), atol=1e-12)
    assert connectivity([layer0, layer1]) == pytest.approx(2 / 6)
    layer2 = b[:, None]  # f = b: r^2 with c, d, e = 0, 1/2, 0
    assert connectivity([layer0, layer1, layer2]) == pytest.approx((2 / 6 + 1 / 6) / 2)  # mean over layer pairs
    assert connectivity([layer0]) is None
    assert mean_activation([layer0, layer1]) == pytest.approx(float(torch.cat([layer0, layer1], 1).mean()))


def test_activations_are_taken_after_relu_from_the_network():
    module = build_architecture({"arch": "mlp", "sizes": [2, 2, 2, 2]})
    params = {"fc0.weight": torch.eye(2), "fc1.weight": torch.tensor([[1.0, 0.0], [0.0, -1.0]]), "fc2.weight": torch.eye(2)}
    x = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 1.0], [4.0, 2.0]])  # x1 and x2 uncorrelated (r = 0)
    first, second = filter_activations(module, filter_layers(module)[:-1], params, x)
    assert torch.equal(first, x) and torch.equal(second, torch.stack([x[:, 0], torch.zeros(4)], 1))  # relu(-x2) = 0
    # pairs: (x1, x1) r^2 = 1, (x1, 0) 0 (constant), (x2, x1) 0, (x2, 0) 0
    assert connectivity([first, second]) == pytest.approx(0.25)


def test_dependency_closure_follows_shares_transitively():
    shares_of = {0: (), 1: (0,), 2: (), 3: (1, 2)}
    assert dependency_closure((3,), shares_of) == (0, 1, 2, 3)
    assert dependency_closure((1, 2), shares_of) == (0, 1, 2)
    assert dependency_closure((), shares_of) == ()


# ---------------------------------------------------------------- strategies


@pytest.mark.parametrize("share", ["all", "none", "lowest", "omit-lowest", "1"])
def test_every_sharing_strategy_trains_publishes_and_records_its_shares(tmp_path, share):
    registry = train_packnet(tmp_path, 3, share)
    manifest = registry.manifest("m")
    tasks = manifest.tasks
    assert [t.method for t in tasks] == ["packnet-share"] * 3 and registry.generations("m") == [1, 2, 3]
    assert all(t.metrics["accuracy"] > 0.9 for t in tasks), [t.metrics["accuracy"] for t in tasks]
    matrix = manifest.training["accuracy_matrix"]
    assert all(row[j] == matrix[j][j] for row in matrix for j in range(len(row)))  # zero forgetting, exactly
    assert [list(t.shares) for t in tasks] == [t.metrics["shares"] for t in tasks]

    scores = tasks[2].metrics["scores"]  # recorded before deciding, for every earlier subnetwork
    assert set(scores) == {"0", "1"} and all(set(s) == {"mean_activation", "connectivity"} for s in scores.values())
    lowest = min((0, 1), key=lambda j: (scores[str(j)]["connectivity"], j))
    expected = {
        "all": [(), (0,), (0, 1)],
        "none": [(), (), ()],
        "lowest": [(), (0,), dependency_closure((lowest,), {0: (), 1: tasks[1].shares})],
        "omit-lowest": [(), (), dependency_closure((1 - lowest,), {0: (), 1: tasks[1].shares})],
        "1": [(), (), (1,)],  # an explicit list: ids not learned yet are skipped
    }[share]
    assert [t.shares for t in tasks] == expected
    if share in ("lowest", "omit-lowest"):
        assert tasks[2].metrics["chosen"] == ([lowest] if share == "lowest" else [1 - lowest])

    # the task's filter mask holds exactly its own subnetwork plus the shared ones; omitted ones are out
    owned = own_filters(registry)
    for task in tasks:
        mask = registry.load(task.parts["filter_mask"])
        for name in HIDDEN:
            expected_used = owned[task.id][name].clone()
            for j in task.shares:
                expected_used |= owned[j][name]
            assert torch.equal(mask[out_key(name)], expected_used)
            assert owned[task.id][name].any()
            for j in set(range(task.id)) - set(task.shares):
                assert not (mask[out_key(name)] & owned[j][name]).any()
        assert torch.equal(mask[in_key("fc1.weight")], mask[out_key("fc0.weight")])

    # a shared subnetwork computes in the sharing task exactly what it computes in its own task
    module = build_architecture(ARCH)
    layers = filter_layers(module)[:-1]
    manifest_backbone = registry.load_backbone(manifest, tasks[-1].backbone)
    x = get_stream("split-digits").task(2).x_test

    def activations(task: int) -> list[torch.Tensor]:
        parts = {kind: registry.load(ref) for kind, ref in tasks[task].parts.items()}
        return filter_activations(module, layers, effective_parameters("packnet-share", manifest_backbone, parts), x)

    for task in tasks:
        for j in task.shares:
            for mine, theirs, layer in zip(activations(task.id), activations(j), layers):
                assert torch.equal(mine[:, owned[j][layer.name]], theirs[:, owned[j][layer.name]])


def test_sharing_a_subnetwork_shares_what_it_depends_on(tmp_path):
    registry = train_packnet(tmp_path, 2, "all")  # task 1 shares S_0
    manifest = registry.manifest("m")
    tasks = [PublishedTask(t.id, t.name, t.num_classes, t.backbone, {k: registry.load(r) for k, r in t.parts.items()},
                           {}, t.shares) for t in manifest.tasks]
    backbone = registry.load_backbone(manifest, manifest.tasks[-1].backbone)
    method = get_method("packnet-share", **{**FAST, "share": "1"})  # asks for S_1 only
    artifact = method.learn_task(build_architecture(ARCH), get_stream("split-digits").task(2), task_generator(0, 2),
                                 TrainingContext(ARCH, backbone, tasks, {}))
    assert artifact.metrics["chosen"] == [1] and artifact.shares == (0, 1)  # S_1 depends on S_0
    module = build_architecture(ARCH)
    layers = filter_layers(module)[:-1]
    x = get_stream("split-digits").task(2).x_test
    mine = filter_activations(module, layers, effective_parameters("packnet-share", artifact.backbone, artifact.parts), x)
    theirs = filter_activations(module, layers, effective_parameters("packnet-share", backbone, tasks[1].parts), x)
    owned = PackNetShare.own_filters(tasks, layers)[1]
    assert all(torch.equal(m[:, owned[l.name]], t[:, owned[l.name]]) for m, t, l in zip(mine, theirs, layers))


# ---------------------------------------------------------------- published tasks never change


def test_published_task_is_bit_exact_after_later_tasks(tmp_path):
    registry = train_packnet(tmp_path, 1, "lowest")
    x = get_stream("split-digits").task(0).x_test
    before = task_logits(registry, 0, x)
    train(registry, "m", 3, {}, log=lambda _: None)
    manifest = registry.manifest("m")
    assert torch.equal(task_logits(registry, 0, x), before)
    # stronger: the frozen filters are the same in the newest backbone, so task 0 over it is identical too
    assert [t.backbone for t in manifest.tasks] == ["2", "3", "4"]
    assert torch.equal(task_logits(registry, 0, x, backbone="4"), before)
    first, last = registry.load_backbone(manifest, "2"), registry.load_backbone(manifest, "4")
    for name, rows in own_filters(registry)[0].items():
        assert torch.equal(first[name][rows], last[name][rows])
        assert not torch.equal(first[name][~rows], last[name][~rows])  # the free filters did train


def test_frozen_filters_are_checked_after_every_step(monkeypatch):
    method = get_method("packnet-share", **FAST)
    stream = get_stream("split-digits")
    backbone = method.create_backbone(build_architecture(ARCH), task_generator(0, 99))
    first = method.learn_task(build_architecture(ARCH), stream.task(0), task_generator(0, 0),
                              TrainingContext(ARCH, backbone, [], {}))
    context = TrainingContext(ARCH, first.backbone, [PublishedTask(0, "t0", 2, "2", first.parts, {}, ())], {})
    honest = method.learn_task(build_architecture(ARCH), stream.task(1), task_generator(0, 1), context)
    frozen = PackNetShare.own_filters(context.tasks, filter_layers(build_architecture(ARCH))[:-1])[0]
    assert all(torch.equal(honest.backbone[n][rows], first.backbone[n][rows]) for n, rows in frozen.items())

    step = torch.optim.SGD.step

    def tampering(self, *args, **kwargs):  # an optimiser that also nudges every weight (e.g. weight decay)
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(0.999)
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", tampering)
    with pytest.raises(RuntimeError, match=r"frozen filter\(s\) \[.*\] of 'fc0.weight' changed"):
        method.learn_task(build_architecture(ARCH), stream.task(1), task_generator(0, 1), context)
    method.learn_task(build_architecture(ARCH), stream.task(0), task_generator(0, 0),  # nothing frozen: no error
                      TrainingContext(ARCH, backbone, [], {}))

    weights = {n: first.backbone[n].clone() for n in frozen}
    weights["fc1.weight"][frozen["fc1.weight"].nonzero()[0, 0], 3] = float("nan")
    with pytest.raises(RuntimeError, match="of 'fc1.weight' changed"):
        check_frozen(weights, first.backbone, frozen)


def test_appending_equals_training_at_once(tmp_path):
    once = train_packnet(tmp_path / "once", 3, "lowest").manifest("m")
    twice = train_packnet(tmp_path / "twice", 2, "lowest")
    first_two = twice.manifest("m").tasks
    train(twice, "m", 3, {}, log=lambda _: None)  # settings come from the stored model
    appended = twice.manifest("m")
    assert appended.tasks[:2] == first_two
    assert [t.parts for t in appended.tasks] == [t.parts for t in once.tasks]  # same blob digests
    assert [t.shares for t in appended.tasks] == [t.shares for t in once.tasks]
    assert appended.backbones == once.backbones


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(MaskbankError, match="share must be one of"):
        get_method("packnet-share", share="lowest,2")
    with pytest.raises(MaskbankError, match=r"method 'packnet-share': prune must be in \[0, 1\)"):
        get_method("packnet-share", prune=1.0)
    narrow = {"arch": "mlp", "sizes": [64, 2, 2, 2]}  # 2 filters per layer: one for each of the first two tasks
    registry = Registry(tmp_path)
    with pytest.raises(MaskbankError, match=r"layer 'fc0.weight' has no free filters left for task 2 .*hold all 2"):
        train(registry, "narrow", 3, {**settings(), "architecture": narrow}, log=lambda _: None)
    assert len(registry.manifest("narrow").tasks) == 2
    with pytest.raises(MaskbankError, match="BatchNorm and residual blocks are not supported"):
        train(registry, "bn", 1, {**settings(), "architecture": {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 2,
                                                                 "width": 4, "bn": "nonaffine"}}, log=lambda _: None)
    with pytest.raises(MaskbankError, match="needs at least two hidden layers"):
        train(registry, "shallow", 1, {**settings("lowest"), "architecture": {"arch": "mlp", "sizes": [64, 16, 2]}},
              log=lambda _: None)
    backbone = {"fc0.weight": torch.ones(3, 4), "fc1.weight": torch.ones(2, 3)}
    masks = {key(n): torch.ones(w.shape[d], dtype=torch.bool) for n, w in backbone.items() for key, d in ((out_key, 0), (in_key, 1))}
    assert effective_parameters("packnet-share", backbone, {"filter_mask": masks, "head": {}}).keys() == backbone.keys()
    with pytest.raises(InvalidArtifact, match=r"'fc1.weight.in' must be bool \[3\], got torch.bool \[4\]"):
        effective_parameters("packnet-share", backbone, {"filter_mask": {**masks, in_key("fc1.weight"): torch.ones(4, dtype=torch.bool)},
                                                         "head": {}})


def test_conv_networks_prune_channels():
    arch = {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 2, "width": 4}
    method = get_method("packnet-share", **FAST)
    backbone = method.create_backbone(build_architecture(arch), task_generator(0, 99))
    artifact = method.learn_task(build_architecture(arch), get_stream("split-digits").task(0), task_generator(0, 0),
                                 TrainingContext(arch, backbone, [], {}))
    mask = artifact.parts["filter_mask"]
    assert [int(mask[out_key(n)].sum()) for n in ("conv0.weight", "conv2.weight")] == [1, 3]  # 4 - round(2.6), 8 - round(5.2)
    assert torch.equal(mask[in_key("fc.weight")], mask[out_key("conv2.weight")].repeat_interleave(4))  # 8x8 -> 2x2 maps
    assert artifact.metrics["own_filters"] == {"conv0.weight": 1, "conv2.weight": 3}


# ---------------------------------------------------------------- through a real server


@pytest.mark.slow
def test_served_task_is_bit_exact_after_later_tasks_are_published(tmp_path):
    registry = train_packnet(tmp_path, 1, "all", model="pack")
    x = get_stream("split-digits").task(0).x_test.numpy()
    check_served_while_appending(tmp_path, registry, "pack", x, lambda: train(registry, "pack", 3, {}, log=lambda _: None), 3)
