"""ImpressLearn: shared basis masks, per-task alpha, the append-only basis contract, and serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskbank.process import ServerProcess
from registry import InvalidArtifact, MaskbankError, Registry, build_architecture, effective_parameters, forward
from registry.audit import audit
from registry.materialize_impresslearn import superpose
from trainer import TrainingContext, get_method, get_stream, train
from trainer.impresslearn import check_append_only
from trainer.loop import task_generator

from .conftest import wait_for

ARCH = {"arch": "mlp", "sizes": [64, 128, 128, 10]}
FAST = {"basis_size": 2, "mask_epochs": 4, "alpha_epochs": 3}


def train_il(root, tasks: int, **config) -> Registry:
    registry = Registry(root)
    fast = {k: v for k, v in FAST.items() if not (config.get("basis") == "random" and k == "mask_epochs")}  # inert there
    requested = {"method": "impresslearn", "stream": "permuted-digits", "architecture": ARCH,
                 "method_config": {**fast, **config}}
    train(registry, "m", tasks, requested, log=lambda _: None)
    return registry


def task_params(registry: Registry, task: int, model: str = "m") -> dict[str, torch.Tensor]:
    """A task's effective parameters computed from the registry alone, as a server does."""
    manifest = registry.manifest(model)
    entry = manifest.task(task)
    parts = {kind: registry.load(ref) for kind, ref in entry.parts.items()}
    shared = {kind: registry.load(ref) for kind, ref in manifest.shared.items()}
    return effective_parameters(entry.method, registry.load_backbone(manifest, entry.backbone), parts, shared)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the materialiser and the basis contract (no training) --------------------------------------

g = torch.Generator().manual_seed(0)
BACKBONE = {"fc0.weight": torch.randn(6, 4, generator=g), "fc1.weight": torch.randn(3, 6, generator=g)}
BASIS = {n: torch.rand(3, *w.shape, generator=g) < 0.5 for n, w in BACKBONE.items()}


def test_alpha_combines_the_first_basis_masks_and_survives_appends():
    alpha = {n: torch.tensor([0.7, -0.2]) for n in BACKBONE}
    params = effective_parameters("impresslearn", BACKBONE, {"alpha": alpha}, {"basis_masks": BASIS})
    for n, w in BACKBONE.items():
        expected = w * (0.7 * BASIS[n][0].float() - 0.2 * BASIS[n][1].float())
        assert torch.allclose(params[n], expected)
        assert torch.equal(params[n], w * superpose(alpha[n], BASIS[n][:2]))
    grown = {n: torch.cat([m, torch.ones(1, *m.shape[1:], dtype=torch.bool)]) for n, m in BASIS.items()}
    assert same(params, effective_parameters("impresslearn", BACKBONE, {"alpha": alpha}, {"basis_masks": grown}))


def test_one_hot_alpha_is_served_exactly_like_supsup():
    one_hot = {n: torch.tensor([0.0, 1.0]) for n in BACKBONE}
    ours = effective_parameters("impresslearn", BACKBONE, {"alpha": one_hot}, {"basis_masks": BASIS})
    supsup = effective_parameters("supsup", BACKBONE, {"masks": {n: m[1] for n, m in BASIS.items()}})
    assert same(ours, supsup)


def test_materialiser_refuses_an_alpha_longer_than_the_basis():
    alpha = {n: torch.full((4,), 0.25) for n in BACKBONE}
    with pytest.raises(InvalidArtifact, match=r"alpha 'fc0.weight' has 4 coefficients but the model's basis has only 3 "
                                              r"mask\(s\): a task can only combine basis masks that were published before it"):
        effective_parameters("impresslearn", BACKBONE, {"alpha": alpha}, {"basis_masks": BASIS})
    with pytest.raises(InvalidArtifact, match="needs the model's shared part 'basis_masks'; the task has parts \\['alpha'\\]"):
        effective_parameters("impresslearn", BACKBONE, {"alpha": alpha}, {})
    alpha = {n: torch.full((2,), 0.5) for n in BACKBONE}
    with pytest.raises(InvalidArtifact, match=r"basis masks 'fc1.weight' have shape \[3, 6, 3\], expected \[B, 3, 6\]"):
        effective_parameters("impresslearn", BACKBONE, {"alpha": alpha},
                             {"basis_masks": {**BASIS, "fc1.weight": BASIS["fc1.weight"].transpose(1, 2)}})


def test_the_basis_is_append_only():
    grown = {n: torch.cat([m, m[:1]]) for n, m in BASIS.items()}
    check_append_only(BASIS, grown)  # appending is fine
    check_append_only({}, BASIS)  # so is the first basis
    with pytest.raises(InvalidArtifact, match="'fc0.weight' would shrink from 3 to 2 masks; the basis is append-only"):
        check_append_only(BASIS, {n: m[:2] for n, m in BASIS.items()})
    changed = {n: m.clone() for n, m in grown.items()}
    changed["fc1.weight"][0, 0, 0] ^= True
    with pytest.raises(InvalidArtifact, match="'fc1.weight' would change published masks"):
        check_append_only(BASIS, changed)


def test_config_is_checked():
    assert get_method("impresslearn").config.basis == "hetero" and get_method("impresslearn").config.basis_size == 5
    with pytest.raises(MaskbankError, match="basis must be one of hetero, homo, random, got 'mixed'"):
        get_method("impresslearn", basis="mixed")
    with pytest.raises(MaskbankError, match="alpha_optimizer must be one of adam, rmsprop"):
        get_method("impresslearn", alpha_optimizer="sgd")
    with pytest.raises(MaskbankError, match=r"has no option\(s\) \['epochs'\]"):
        get_method("impresslearn", epochs=3)


def test_the_penalty_pulls_the_l1_norm_of_alpha_towards_one():
    arch = {"arch": "mlp", "sizes": [64, 32, 10]}
    task = get_stream("permuted-digits").task(0)
    distance = {}
    for penalty in (0.0, 10.0):
        method = get_method("impresslearn", basis="random", basis_size=3, alpha_epochs=2, alpha_lr=0.1, penalty=penalty)
        backbone = method.create_backbone(build_architecture(arch), task_generator(0, 99))
        context = TrainingContext(architecture=arch, backbone=backbone, tasks=[], shared={})
        artifact = method.learn_task(build_architecture(arch), task, task_generator(0, 0), context)
        assert {n: list(a.shape) for n, a in artifact.parts["alpha"].items()} == {"fc0.weight": [3], "fc1.weight": [3]}
        distance[penalty] = sum(abs(float(a.abs().sum()) - 1) for a in artifact.parts["alpha"].values())
    assert distance[10.0] < distance[0.0] / 2, distance


# -- training and publishing -------------------------------------------------------------------

@pytest.mark.parametrize("basis, lengths", [("hetero", [1, 2, 2]), ("homo", [2, 2, 2]), ("random", [2, 2, 2])])
def test_every_basis_kind_trains_and_publishes_a_shared_basis_and_tiny_tasks(tmp_path, basis, lengths):
    registry = train_il(tmp_path, 3, basis=basis)
    manifest = registry.manifest("m")
    assert set(manifest.shared) == {"basis_masks"}  # stored once, at model level
    stored = registry.load(manifest.shared["basis_masks"])
    assert {n: list(m.shape) for n, m in stored.items()} == {
        "fc0.weight": [2, 128, 64], "fc1.weight": [2, 128, 128], "fc2.weight": [2, 10, 128]}
    for entry in manifest.tasks:
        assert set(entry.parts) == {"alpha"}  # no task stores a mask
        assert entry.parts["alpha"].digest != manifest.shared["basis_masks"].digest
    assert [len(registry.load(t.parts["alpha"])["fc0.weight"]) for t in manifest.tasks] == lengths
    if basis == "hetero":  # the basis masks are the early tasks' SupSup masks, one-hot in their alpha
        assert [t.metrics.get("basis_mask") for t in manifest.tasks] == [0, 1, None]
        assert registry.load(manifest.tasks[1].parts["alpha"])["fc1.weight"].tolist() == [0.0, 1.0]
        supsup = Registry(tmp_path / "supsup")  # same seed and mask settings: the very same task 0
        train(supsup, "m", 1, {"method": "supsup", "stream": "permuted-digits", "architecture": ARCH,
                               "method_config": {"epochs": FAST["mask_epochs"]}}, log=lambda _: None)
        assert same(task_params(registry, 0), task_params(supsup, 0))
    else:  # task 0 built the whole basis, then learned its alpha over it
        assert manifest.tasks[0].metrics["density"] == pytest.approx(0.5, abs=1e-3)
    accuracy = [t.metrics["accuracy"] for t in manifest.tasks]
    assert all(0 <= a <= 1 for a in accuracy)

    # Per-task bytes: alpha (B x layers floats) against a SupSup mask of the same architecture.
    report = audit(registry, "m")
    alpha_bytes = [p.bytes for p in report.parts if p.part == "alpha"]
    mask_bytes = registry.put_part("masks", {n: m[0] for n, m in stored.items()}, registry.load_backbone(manifest, "1")).size
    assert len(alpha_bytes) == 3 and max(alpha_bytes) < 0.1 * mask_bytes, (alpha_bytes, mask_bytes)


def test_published_tasks_stay_bit_exact_and_appending_equals_one_run(tmp_path):
    registry = train_il(tmp_path / "appended", 1)  # task 0 published while the basis has 1 mask
    task0 = task_params(registry, 0)
    train(registry, "m", 3, {}, log=lambda _: None)  # task 1 grows the basis; task 2 is alpha over it
    assert same(task_params(registry, 0), task0)
    task2 = task_params(registry, 2)
    train(registry, "m", 4, {}, log=lambda _: None)
    assert same(task_params(registry, 0), task0) and same(task_params(registry, 2), task2)
    manifest = registry.manifest("m")
    matrix = manifest.training["accuracy_matrix"]
    assert all(row[j] == matrix[j][j] for row in matrix for j in range(len(row)))  # no forgetting at all

    once = train_il(tmp_path / "once", 4).manifest("m")
    assert [t.parts for t in manifest.tasks] == [t.parts for t in once.tasks]  # same blob digests
    assert manifest.shared == once.shared and manifest.backbones == once.backbones


# -- serving ------------------------------------------------------------------------------------

def logits(client, x: np.ndarray, **parameters):
    import tritonclient.grpc as triton

    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("m", [inp], parameters=parameters)


def in_process_logits(registry: Registry, task: int, x: np.ndarray) -> np.ndarray:
    manifest = registry.manifest("m")
    with torch.no_grad():
        out = forward(build_architecture(manifest.architecture), task_params(registry, task), torch.from_numpy(x))
    return out[:, : manifest.task(task).num_classes].numpy()


@pytest.mark.slow
def test_server_serves_tasks_bit_exact_while_the_basis_grows_and_infers_tasks(tmp_path):
    import tritonclient.grpc as triton

    registry = train_il(tmp_path, 1)
    stream = get_stream("permuted-digits")
    x = {t: stream.task(t).x_test.numpy()[:48] for t in range(4)}
    with ServerProcess(tmp_path, "--poll-interval", "0.2") as server:
        client = triton.InferenceServerClient(server.url)
        at_version = lambda v: lambda: client.is_model_ready("m") and client.get_model_metadata("m").versions == [v]  # noqa: E731
        wait_for(at_version("1"), what="generation 1")
        task0 = logits(client, x[0], task_id=0).as_numpy("logits")
        assert np.array_equal(task0, in_process_logits(registry, 0, x[0]))

        train(registry, "m", 3, {}, log=lambda _: None)  # the basis grows to 2 masks; task 2 is alpha-only
        wait_for(at_version("3"), what="generation 3")
        assert np.array_equal(logits(client, x[0], task_id=0).as_numpy("logits"), task0)
        task2 = logits(client, x[2], task_id=2).as_numpy("logits")

        train(registry, "m", 4, {}, log=lambda _: None)
        wait_for(at_version("4"), what="generation 4")
        assert np.array_equal(logits(client, x[0], task_id=0).as_numpy("logits"), task0)
        assert np.array_equal(logits(client, x[2], task_id=2).as_numpy("logits"), task2)
        for task in range(4):  # GG: the server's logits are the in-process ones, bit for bit
            assert np.array_equal(logits(client, x[task], task_id=task).as_numpy("logits"),
                                  in_process_logits(registry, task, x[task]))

        # GN exhaustive is generic: lowest mean entropy over every task, with that task's logits.
        for task in range(4):
            result = logits(client, x[task][:16], task_inference="exhaustive", task_scores=True)
            scores = json.loads(result.get_response().parameters["task_scores"].string_param)
            chosen = int(result.as_numpy("task_id")[0])
            assert sorted(scores) == ["0", "1", "2", "3"] and chosen == min(range(4), key=lambda i: scores[str(i)])
            assert np.array_equal(result.as_numpy("logits"), in_process_logits(registry, chosen, x[task][:16]))
        client.close()


@pytest.mark.slow
def test_alpha_task_inference_per_request_and_as_the_server_default(tmp_path):
    """Basis-GN through a real server: `task_inference=alpha` per request and `--task-inference alpha`
    as the default; the response names the task, its score and every task's score, and carries
    that task's own logits."""
    import tritonclient.grpc as triton

    registry = train_il(tmp_path, 3)  # tasks 0 and 1 each add a basis mask; task 2 is alpha over both
    stream = get_stream("permuted-digits")
    with ServerProcess(tmp_path, "--task-inference", "alpha") as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready("m"), what="the model to be ready")
        for task in (0, 1):  # a basis task's own data: its mask is the most confident one
            x = stream.task(task).x_test.numpy()[:32]
            for parameters in ({"task_inference": "alpha", "task_scores": True}, {"task_scores": True}):
                result = logits(client, x, **parameters)
                response = result.get_response().parameters
                scores = json.loads(response["task_scores"].string_param)
                chosen = int(result.as_numpy("task_id")[0])
                assert (chosen, response["task_inference"].string_param) == (task, "alpha")
                assert sorted(scores) == ["0", "1", "2"] and response["task_score"].double_param == scores[str(task)] == 0.0
                assert np.array_equal(result.as_numpy("logits"), in_process_logits(registry, task, x))
        # all zeros: every logit 0 under every basis mask; the basis tasks tie (the lowest id had score 0 alone)
        zeros = logits(client, np.zeros((4, 64), np.float32), task_inference="alpha", task_scores=True)
        response = zeros.get_response().parameters
        assert int(zeros.as_numpy("task_id")[0]) == 0 and response["task_ties"].int64_param == 2
        assert json.loads(response["task_scores"].string_param)["1"] == 0.0
        with pytest.raises(triton.InferenceServerException, match="task_inference 'oneshot' needs mask-based tasks .*"
                           "model 'm' has impresslearn tasks: use 'alpha' or 'exhaustive'"):
            logits(client, stream.task(0).x_test.numpy()[:4], task_inference="oneshot")
        client.close()


def test_batchnorm_networks_are_refused_before_anything_is_trained(tmp_path):
    """A BatchNorm network trained its first task and then failed with a reparametrisation traceback:
    ImpressLearn's tasks combine basis masks and carry no BatchNorm statistics."""
    from registry import MaskbankError, Registry
    from trainer import train

    settings = {"method": "impresslearn", "stream": "permuted-digits",
                "architecture": {"arch": "cnn", "input_shape": [1, 8, 8], "width": 4, "bn": "nonaffine"}}
    with pytest.raises(MaskbankError, match="method 'impresslearn' combines basis masks per task and keeps no "
                                            "BatchNorm statistics; use an architecture without BatchNorm"):
        train(Registry(tmp_path), "m", 2, settings, log=lambda _: None)
    assert not Registry(tmp_path).list_models()
