"""cl-lsg: pick-and-reuse over frozen kernels, learnable sparse growth below a target.

The selective mask's hard threshold and straight-through gradient, dead-unit pruning on a hand-made
network, growth decided by the target, old tasks bit-exact after growth (from the registry, over
every later backbone version, and through a real server while tasks are added), the backbone delta
holding exactly the newly kept weights, appending equals training at once, the command line, and
the errors a user can run into.
"""

from __future__ import annotations

import json

import pytest
import torch

from registry import InvalidArtifact, MaskbankError, Registry, build_architecture, effective_parameters
from registry.audit import audit
from registry.codecs import sparse_delta
from trainer import get_method, get_stream, train
from trainer.cl_lsg import GrowthMask, gumbel_hard, network_layers, next_units, prune_dead

from .conftest import check_served_while_appending, cli, task_logits

ARCH = {"arch": "mlp", "sizes": [64, 32, 32, 2]}
FAST = {"epochs": 3, "grow_epochs": 3, "batch_size": 64}
SCRATCH = {"scratch_epochs": 3}  # only where no target is given: with one, no from-scratch model is trained
HIDDEN = ("fc0", "fc1")
CNN = {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 2, "width": 4}  # conv0: 4 channels, conv2: 8, fc: 8 x 2 x 2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add synchronisation on a busy machine. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_cl_lsg(root, tasks: int, model: str = "m", **config) -> Registry:
    registry = Registry(root)
    train(registry, model, tasks, {"method": "cl-lsg", "stream": "split-digits", "architecture": ARCH,
                                   "method_config": {**FAST, **({} if "target" in config else SCRATCH), **config}},
          log=lambda _: None)
    return registry


def growth_masks(registry: Registry, task: int, model: str = "m") -> dict[str, torch.Tensor]:
    return registry.load(registry.manifest(model).task(task).parts["growth_masks"])


# ---------------------------------------------------------------- the masks


def test_selective_mask_is_a_hard_threshold_with_the_sigmoids_gradient():
    scores = torch.tensor([-3.0, -0.2, 0.0, 0.4, 5.0]).requires_grad_(True)
    temperature = 0.5
    sample = gumbel_hard(scores, temperature, torch.Generator().manual_seed(7))
    u = torch.rand(5, generator=torch.Generator().manual_seed(7)).clamp(1e-6, 1 - 1e-6)  # the same draw
    logits = (scores.detach() + torch.log(u) - torch.log1p(-u)) / temperature
    assert torch.equal(sample.detach(), (logits > 0).float())  # exactly 0 or 1 in the forward
    assert set(sample.detach().tolist()) == {0.0, 1.0}  # this draw has both
    sample.sum().backward()
    soft = torch.sigmoid(logits)
    assert torch.allclose(scores.grad, soft * (1 - soft) / temperature)  # straight through the sigmoid


def test_growth_mask_forward_in_training_and_in_eval():
    config = get_method("cl-lsg").config
    old = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    frozen = torch.tensor([[True, True], [False, False]])
    mask = GrowthMask(old, frozen, config, torch.Generator().manual_seed(0))
    mask.available.fill_(True)
    mask.candidates.copy_(torch.tensor([False, True]))
    with torch.no_grad():
        mask.selective.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        mask.attentive.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        mask.grown.copy_(torch.tensor([-5.0, 0.5]))
    weight = torch.tensor([[10.0, 20.0], [3.0, 4.0]])
    mask.eval()
    # frozen row: old values, selective mask (1, 0); candidate row: W * attentive (1, 0) * grown (1); the
    # first row's grown score is ignored (not a candidate)
    assert torch.equal(mask(weight), torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert torch.equal(mask.kept(), torch.tensor([[True, False], [True, False]]))
    mask.train()
    mask.beta = 2.0
    relaxed = mask(weight)
    assert set(relaxed[0].tolist()) <= {0.0, 1.0, 2.0}  # frozen kernels: exact 0/1 samples times old values
    expected = weight[1] * torch.sigmoid(2.0 * mask.attentive[1]) * torch.sigmoid(torch.tensor(2.0 * 0.5))
    assert torch.allclose(relaxed[1], expected)  # continuous sparsification on trainable kernels and candidates
    assert torch.allclose(mask.penalty(), torch.sigmoid(2.0 * mask.attentive[1]).sum() + torch.sigmoid(torch.tensor(1.0)))


def test_dead_units_lose_their_kernels():
    first = torch.tensor([[True, False], [False, False], [True, True]])  # unit 1 has no input: it outputs 0
    second = torch.tensor([[True, True, False], [False, False, False]])  # unit 2 is read by nobody; unit 1 of layer 2 is idle
    kept = prune_dead([first, second])
    assert torch.equal(kept[0], torch.tensor([[True, False], [False, False], [False, False]]))
    assert torch.equal(kept[1], torch.tensor([[True, False, False], [False, False, False]]))
    assert torch.equal(next_units(torch.tensor([True, False, True, False, False]), 0.25), torch.tensor([False, True, False, True, False]))


# ---------------------------------------------------------------- growth decisions


def test_growth_happens_only_below_the_target(tmp_path):
    never = train_cl_lsg(tmp_path / "never", 2, target=0.0).manifest("m")
    always = train_cl_lsg(tmp_path / "always", 2, target=2.0).manifest("m")
    seed = {f"{layer}.weight": 4 for layer in HIDDEN}  # 1/8 of 32 units
    assert [t.metrics["grew"] for t in never.tasks] == [False, False]
    assert [t.metrics["units"] for t in never.tasks] == [seed, seed]
    assert [t.metrics["grown_units"] for t in never.tasks] == [seed, {n: 0 for n in seed}]
    assert [t.metrics["grew"] for t in always.tasks] == [True, True]
    units = [t.metrics["units"] for t in always.tasks]
    assert all(4 < units[0][n] <= 8 < units[1][n] <= 12 for n in seed), units  # at most 4 candidates per layer and task
    for task in always.tasks:
        assert task.metrics["target"] == 2.0 and task.metrics["target_source"] == "option"
        assert task.metrics["scratch_accuracy"] is None
        assert task.metrics["validation_accuracy"] < 2.0
    registry = Registry(tmp_path / "always")
    channels = [growth_masks(registry, t) for t in (0, 1)]
    for layer in HIDDEN:
        assert not (channels[0][f"{layer}.channels"] & channels[1][f"{layer}.channels"]).any()  # each unit grown once
        assert channels[0][f"{layer}.channels"][:4].all()  # the seed network belongs to task 0
        assert int(channels[1][f"{layer}.channels"].sum()) == always.tasks[1].metrics["grown_units"][f"{layer}.weight"]


def test_scratch_target_and_sizes_are_recorded(tmp_path):
    registry = train_cl_lsg(tmp_path, 2)
    manifest = registry.manifest("m")
    backbone = registry.load_backbone(manifest, manifest.tasks[-1].backbone)
    full = sum(w.numel() for w in backbone.values())
    heads = [registry.load(t.parts["head"])["fc2.weight"] for t in manifest.tasks]
    used = sum(int((backbone[f"{layer}.weight"] != 0).sum()) for layer in HIDDEN) + sum(int((h != 0).sum()) for h in heads)
    last = manifest.tasks[-1].metrics
    assert last["model_size"] == pytest.approx(used / full)
    assert last["model_size"] <= last["grown_size"] <= 1.0
    for task in manifest.tasks:
        assert task.metrics["target_source"] == "scratch"
        assert 0.5 <= task.metrics["target"] <= 1.0 and 0.5 <= task.metrics["scratch_accuracy"] <= 1.0
        assert task.metrics["grew"] == (task.metrics["reuse_accuracy"] < task.metrics["target"])
    # every kept kernel is in the backbone; every kernel no task keeps is still zero
    kept = {layer: growth_masks(registry, 0)[f"{layer}.kernels"] | growth_masks(registry, 1)[f"{layer}.kernels"]
            for layer in HIDDEN}
    assert all(torch.equal(backbone[f"{layer}.weight"] != 0, kept[layer]) for layer in HIDDEN)


# ---------------------------------------------------------------- published tasks never change


def test_old_tasks_are_bit_exact_after_growth(tmp_path):
    registry = train_cl_lsg(tmp_path, 1, target=2.0)
    x = get_stream("split-digits").task(0).x_test
    before = task_logits(registry, 0, x)
    train(registry, "m", 3, {}, log=lambda _: None)
    manifest = registry.manifest("m")
    assert all(t.metrics["grew"] for t in manifest.tasks) and [t.backbone for t in manifest.tasks] == ["2", "3", "4"]
    assert torch.equal(task_logits(registry, 0, x), before)
    assert torch.equal(task_logits(registry, 0, x, backbone="4"), before)  # the newest version serves it identically
    assert manifest.training["bwt"] == 0.0
    versions = {v: registry.load_backbone(manifest, v) for v in ("2", "3", "4")}
    for task, version in ((0, "2"), (1, "3")):  # a task's kernels never change again; the next one only adds kernels
        masks = growth_masks(registry, task)
        nxt = str(int(version) + 1)
        for layer in HIDDEN:
            name, kernels = f"{layer}.weight", masks[f"{layer}.kernels"]
            assert torch.equal(versions[version][name][kernels], versions["4"][name][kernels])
            changed = versions[nxt][name] != versions[version][name]
            assert not (changed & (versions[version][name] != 0)).any()
            assert torch.equal(changed, growth_masks(registry, task + 1)[f"{layer}.kernels"] & (versions[version][name] == 0))
    # each backbone version is stored as a sparse delta of the weights its task added: an index and a value each
    added = sum(int(t.numel()) for k, t in sparse_delta(versions["3"], versions["4"]).items() if k.endswith(".index"))
    assert manifest.backbones["4"].base == "3" and added == manifest.tasks[2].metrics["new_kernels"]
    assert manifest.backbones["4"].blob.size < 12 * added + 1024


def test_appending_equals_training_at_once(tmp_path):
    once = train_cl_lsg(tmp_path / "once", 5, epochs=5).manifest("m")  # these settings grow on some tasks only
    twice = train_cl_lsg(tmp_path / "twice", 3, epochs=5)
    first = twice.manifest("m").tasks
    train(twice, "m", 5, {}, log=lambda _: None)
    appended = twice.manifest("m")
    assert appended.tasks[:3] == first
    assert [t.parts for t in appended.tasks] == [t.parts for t in once.tasks]  # same blob digests
    assert appended.backbones == once.backbones
    assert appended.training["accuracy_matrix"] == once.training["accuracy_matrix"]
    assert any(t.metrics["grew"] for t in once.tasks) and not all(t.metrics["grew"] for t in once.tasks)


def test_conv_networks_grow_channels_with_kernel_masks(tmp_path):
    registry = Registry(tmp_path)
    train(registry, "cnn", 1, {"method": "cl-lsg", "stream": "split-digits", "architecture": CNN,
                               "method_config": {**FAST, "target": 2.0}}, log=lambda _: None)
    x = get_stream("split-digits").task(0).x_test
    before = task_logits(registry, 0, x, model="cnn")
    train(registry, "cnn", 2, {}, log=lambda _: None)
    manifest = registry.manifest("cnn")
    assert torch.equal(task_logits(registry, 0, x, model="cnn", backbone="3"), before)
    assert all(t.metrics["grew"] for t in manifest.tasks)
    channels = [growth_masks(registry, t, model="cnn") for t in (0, 1)]
    for layer in ("conv0", "conv2"):
        assert not (channels[0][f"{layer}.channels"] & channels[1][f"{layer}.channels"]).any()
        assert manifest.tasks[1].metrics["units"][f"{layer}.weight"] == int(
            (channels[0][f"{layer}.channels"] | channels[1][f"{layer}.channels"]).sum())
    masks = growth_masks(registry, 1, model="cnn")
    assert masks["conv2.kernels"].shape == (8, 4) and masks["conv2.channels"].shape == (8,)
    backbone = registry.load_backbone(manifest, "3")
    kept = masks["conv2.kernels"] | growth_masks(registry, 0, model="cnn")["conv2.kernels"]
    assert torch.equal((backbone["conv2.weight"] != 0).any(3).any(2), kept)  # whole 3x3 kernels, kept or not
    head = registry.load(manifest.tasks[1].parts["head"])["fc.weight"]
    used = masks["conv2.kernels"].any(1).repeat_interleave(4)  # each channel feeds 2 x 2 inputs of the head
    assert not head[:, ~used].any() and head[:2, used].all()


# ---------------------------------------------------------------- command line, audit and errors


def test_command_line_trains_and_audits(tmp_path):
    registry = str(tmp_path / "reg")
    arch = json.dumps(ARCH)
    result = cli("train", "--registry", registry, "--model", "lsg", "--tasks", "2", "--method", "cl-lsg",
                 "--stream", "split-digits", "--arch", arch, "--epochs", "2", "--batch-size", "64",
                 "--set", "grow_epochs=2", "--set", "target=2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "published task 1" in result.stdout
    manifest = Registry(registry).manifest("lsg")
    assert manifest.training["settings"]["method_config"]["target"] == 2 and manifest.tasks[1].metrics["grew"]
    report = cli("registry", "audit", "--registry", registry, "lsg")
    assert report.returncode == 0, report.stderr
    assert "| growth_masks |" in report.stdout and "| head |" in report.stdout
    result = audit(Registry(registry), "lsg")
    assert result.backbone_weights == 64 * 32 + 32 * 32 + 32 * 2
    assert result.shared_bytes < result.dense_model_bytes  # a zero start (1 bit per weight) and two sparse deltas


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(MaskbankError, match="method 'cl-lsg': seed_fraction must be in"):
        get_method("cl-lsg", seed_fraction=0)
    with pytest.raises(MaskbankError, match="target must be >= 0"):
        get_method("cl-lsg", target=-0.5)
    with pytest.raises(MaskbankError, match="cl-lsg needs a plain chain of .* BatchNorm and residual blocks are not"):
        network_layers(build_architecture({**CNN, "bn": "nonaffine"}))
    registry = Registry(tmp_path)
    backbone = {"fc0.weight": torch.ones(4, 3), "fc1.weight": torch.ones(2, 4)}
    with pytest.raises(InvalidArtifact, match=r"growth mask 'fc0.kernels' has shape \[3, 4\], expected \[4, 3\]"):
        registry.put_part("growth_masks", {"fc0.kernels": torch.ones(3, 4, dtype=torch.bool)}, backbone)
    with pytest.raises(InvalidArtifact, match="the backbone has no weight 'fc9.weight'"):
        registry.put_part("growth_masks", {"fc9.channels": torch.ones(3, dtype=torch.bool)}, backbone)
    head = {"fc1.weight": torch.ones(2, 4)}
    with pytest.raises(InvalidArtifact, match=r"growth mask 'fc0.kernels' must be bool \[4, 3\], got nothing"):
        effective_parameters("cl-lsg", backbone, {"growth_masks": {}, "head": head})
    with pytest.raises(InvalidArtifact, match=r"^method cl-lsg needs part 'growth_masks'; the task has parts \['head'\]$"):
        effective_parameters("cl-lsg", backbone, {"head": head})
    kernels = torch.tensor([[True, False, True]] * 4)
    params = effective_parameters("cl-lsg", backbone, {"growth_masks": {"fc0.kernels": kernels}, "head": head})
    assert torch.equal(params["fc0.weight"], kernels.float()) and params["fc1.weight"] is head["fc1.weight"]


# ---------------------------------------------------------------- through a real server


@pytest.mark.slow
def test_served_old_tasks_are_bit_exact_while_the_network_grows(tmp_path):
    registry = train_cl_lsg(tmp_path, 1, model="lsg", target=2.0)
    x = get_stream("split-digits").task(0).x_test.numpy()
    check_served_while_appending(tmp_path, registry, "lsg", x, lambda: train(registry, "lsg", 3, {}, log=lambda _: None), 3)
    assert all(t.metrics["grew"] for t in registry.manifest("lsg").tasks)  # each of the tasks grew the served network
