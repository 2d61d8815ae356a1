"""Head-based methods (spg, finetune, ewc): SPG's gradient scaling and importance, EWC's Fisher and
penalty, appending equals training at once, earlier tasks served on the newest backbone, and GN
exhaustive running the backbone once for all heads, in process and through a real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from registry import MaskbankError, Registry, build_architecture, effective_parameters, forward
from registry.audit import audit
from serving.cache import LRUCache
from serving.snapshot import Snapshot
from trainer import PublishedTask, TrainingContext, get_method, get_stream, train
from trainer.ewc import fisher_diagonal
from trainer.fit import TrainingDiverged
from trainer.loop import task_generator
from trainer.spg import standardised_importance

from .conftest import cli

ARCH = {"arch": "mlp", "sizes": [64, 32, 32, 2]}
STREAM = "split-digits"


def quiet_train(root, tasks: int, method: str = "spg", config: dict | None = None, model: str = "m") -> Registry:
    registry = Registry(root)
    requested = {"method": method, "stream": STREAM, "architecture": ARCH, "method_config": config or {"epochs": 3}}
    train(registry, model, tasks, requested if registry.find_manifest(model) is None else {}, log=lambda _: None)
    return registry


@pytest.fixture(scope="module")
def spg_model(tmp_path_factory) -> Registry:
    """Three SPG tasks of split digits trained in one run."""
    return quiet_train(tmp_path_factory.mktemp("spg"), 3)


def test_standardised_importance_is_zero_without_signal_and_in_unit_interval():
    assert torch.equal(standardised_importance(torch.zeros(3, 4)), torch.zeros(3, 4))
    assert torch.equal(standardised_importance(torch.full((3, 4), 2.0)), torch.zeros(3, 4))
    g = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    importance = standardised_importance(g)
    assert importance.min() >= 0 and importance.max() <= 1
    expected = torch.tanh((g - g.mean()) / g.std(unbiased=True)).abs()
    assert torch.equal(importance, expected)
    assert int(importance.argmax()) == 4


def _context_with_importance(method, importance_of) -> tuple[TrainingContext, dict]:
    """A context of one published task whose accumulated importance is `importance_of(weight)`."""
    module = build_architecture(ARCH)
    backbone = method.create_backbone(module, task_generator(0, 99))
    head = "fc2.weight"
    importance = {n: importance_of(w) for n, w in backbone.items() if n != head}
    earlier = PublishedTask(0, "earlier", 2, "1", {"head": {head: backbone[head]}}, {"importance": importance})
    return TrainingContext(ARCH, backbone, [earlier], {}), importance


def test_spg_weight_with_importance_one_does_not_move_and_zero_moves_freely():
    method = get_method("spg", epochs=2)
    half = lambda w: (torch.arange(w.numel()).reshape(w.shape) % 2).to(torch.float32)  # noqa: E731
    context, importance = _context_with_importance(method, half)
    task = get_stream(STREAM).task(1)
    artifact = method.learn_task(build_architecture(ARCH), task, task_generator(0, 1), context)
    for name, imp in importance.items():
        before, after = context.backbone[name], artifact.backbone[name]
        blocked, free = imp == 1, imp == 0
        assert torch.equal(after[blocked], before[blocked]), f"{name}: a weight of importance 1 moved"
        assert (after[free] != before[free]).float().mean() > 0.5, f"{name}: free weights did not train"
    assert torch.equal(artifact.backbone["fc2.weight"], context.backbone["fc2.weight"])  # heads stay out


def test_spg_accumulated_importance_only_grows_and_blocked_share_is_reported(spg_model):
    manifest = spg_model.manifest("m")
    states = [spg_model.load(t.state["importance"]) for t in manifest.tasks]
    for earlier, later in zip(states, states[1:]):
        assert all(torch.all(later[n] >= earlier[n]) for n in earlier)
    assert set(states[0]) == {"fc0.weight", "fc1.weight"}  # the backbone without the head
    for entry, state in zip(manifest.tasks, states):
        blocked = sum(int((v == 1).sum()) for v in state.values()) / sum(v.numel() for v in state.values())
        assert entry.metrics["blocked_fraction"] == pytest.approx(blocked)
    assert audit(spg_model, "m").state_bytes == sum(r.size for t in manifest.tasks for r in t.state.values()) > 0


def test_ewc_fisher_is_the_mean_squared_per_example_gradient():
    module = build_architecture(ARCH)
    method = get_method("ewc")
    weights = method.create_backbone(module, task_generator(0, 7))
    task = get_stream(STREAM).task(0)
    small = type(task)(**{**task.__dict__, "x_train": task.x_train[:6], "y_train": task.y_train[:6]})
    fisher = fisher_diagonal(module, weights, "fc2.weight", small, batch_size=4)
    expected = {n: torch.zeros_like(w) for n, w in weights.items() if n != "fc2.weight"}
    for x, y in zip(small.x_train, small.y_train):
        params = {n: w.clone().requires_grad_(n in expected) for n, w in weights.items()}
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(module, params, (x[None],))[:, :2], y[None])
        for n, g in zip(expected, torch.autograd.grad(loss, [params[n] for n in expected])):
            expected[n] += g.pow(2) / len(small.y_train)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-9)


def test_ewc_penalty_holds_important_weights_closer_than_fine_tuning(tmp_path):
    moved, fisher = {}, None
    for method, config in (("ewc", {"epochs": 3, "penalty": 300}), ("finetune", {"epochs": 3})):
        registry = quiet_train(tmp_path / method, 2, method, config)
        manifest = registry.manifest("m")
        fisher = fisher or registry.load(manifest.tasks[0].state["fisher"])  # the same task 0 in both runs
        first, second = (registry.load_backbone(manifest, v) for v in ("2", "3"))
        moved[method] = sum(float((fisher[n] * (second[n] - first[n]) ** 2).sum()) for n in fisher)
    assert moved["ewc"] < 0.5 * moved["finetune"]  # the Fisher-weighted distance EWC penalises


def test_a_diverging_penalty_is_reported_not_published(tmp_path):
    registry = quiet_train(tmp_path, 1, "ewc", {"epochs": 3, "penalty": 1e5})
    with pytest.raises(TrainingDiverged, match=r"task 1 \(digits-2-3\): the training loss became nan .*lower the learning rate"):
        quiet_train(tmp_path, 2, "ewc")
    assert [t.id for t in registry.manifest("m").tasks] == [0]


@pytest.mark.parametrize("method", ["spg", "ewc"])
def test_appending_equals_training_at_once(method, tmp_path):
    once = quiet_train(tmp_path / "once", 3, method).manifest("m")
    quiet_train(tmp_path / "twice", 2, method)
    appended = quiet_train(tmp_path / "twice", 3, method).manifest("m")  # settings come from the stored model
    assert [t.parts for t in appended.tasks] == [t.parts for t in once.tasks]
    assert [t.state for t in appended.tasks] == [t.state for t in once.tasks]
    assert appended.backbones == once.backbones
    assert appended.training["accuracy_matrix"] == once.training["accuracy_matrix"]


def _snapshot(registry: Registry) -> Snapshot:
    return Snapshot.load(registry, registry.manifest("m"), None, LRUCache(1 << 30))


def test_earlier_tasks_are_served_on_the_newest_backbone(spg_model):
    manifest = spg_model.manifest("m")
    snapshot = _snapshot(spg_model)
    newest = spg_model.load_backbone(manifest, "4")
    stream = get_stream(STREAM)
    module = build_architecture(ARCH).eval()
    for entry, accuracy in zip(manifest.tasks, manifest.training["accuracy_matrix"][-1]):
        task = snapshot.task(entry.id)
        assert entry.backbone == str(entry.id + 2) and snapshot.backbone_version(task) == "4"
        x = stream.task(entry.id).x_test
        with torch.no_grad():
            expected = forward(module, effective_parameters("spg", newest, task.parts), x)[:, :2]
        served = snapshot.logits(task, x)
        assert torch.equal(served, expected)
        assert float((served.argmax(1) == stream.task(entry.id).y_test).float().mean()) == pytest.approx(accuracy)


def test_exhaustive_runs_the_backbone_once_for_every_head(spg_model):
    snapshot = _snapshot(spg_model)
    x = get_stream(STREAM).task(1).x_test[:16]
    tasks = snapshot.healthy_tasks()
    one_by_one = {t.entry.id: snapshot.logits(t, x) for t in tasks}
    calls = []
    handle = snapshot.bound.module.get_submodule("fc0").register_forward_hook(lambda *_: calls.append(1))
    try:
        together = snapshot.logits_of(tasks, x)
    finally:
        handle.remove()
    assert len(calls) == 1  # the first layer ran once for three tasks
    assert together.keys() == one_by_one.keys()
    assert all(torch.equal(together[i], one_by_one[i]) for i in one_by_one)


def test_batchnorm_networks_are_refused_with_a_clear_message():
    method = get_method("spg")
    module = build_architecture({"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 2, "width": 4, "bn": "nonaffine"})
    with pytest.raises(MaskbankError, match="use an architecture without BatchNorm"):
        method.create_backbone(module, task_generator(0, 0))


def test_cli_trains_ewc_with_a_method_option(tmp_path):
    result = cli("train", "--method", "ewc", "--stream", STREAM, "--tasks", "2", "--registry", str(tmp_path),
                 "--model", "e", "--arch", '{"arch": "mlp", "sizes": [64, 16, 2]}', "--epochs", "1", "--set", "penalty=50")
    assert result.returncode == 0, result.stderr
    manifest = Registry(tmp_path).manifest("e")
    assert manifest.training["settings"]["method_config"]["penalty"] == 50
    assert [t.method for t in manifest.tasks] == ["ewc", "ewc"] and list(manifest.backbones) == ["1", "2", "3"]


@pytest.mark.slow
def test_served_by_a_real_server_on_the_newest_backbone(tmp_path):
    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    from .conftest import wait_for

    stream = get_stream(STREAM)
    registry = quiet_train(tmp_path, 2)

    def served(client, task: int, **parameters) -> np.ndarray:
        x = stream.task(task).x_test.numpy()
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("m", [inp], parameters=parameters).as_numpy("logits")

    with ServerProcess(tmp_path, "--poll-interval", "0.2") as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready("m"), what="the model to be ready")
        before = served(client, 0, task_id=0)
        quiet_train(tmp_path, 4)  # two more tasks, each a new backbone version, published to the live server
        wait_for(lambda: client.get_model_metadata("m").versions == ["4"], what="the server to load generation 4")
        snapshot = _snapshot(registry)
        for task in range(4):
            expected = snapshot.logits(snapshot.task(task), stream.task(task).x_test).numpy()
            assert np.array_equal(served(client, task, task_id=task), expected)
        assert not np.array_equal(served(client, 0, task_id=0), before)  # SPG serves old tasks on the new backbone
        for task in range(4):
            x = stream.task(task).x_test[:16].numpy()
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("m", [inp], parameters={"task_inference": "exhaustive"})
            assert result.get_response().parameters["task_id"].int64_param in range(4)
        client.close()


def test_a_server_default_that_cannot_run_on_a_model_falls_back_to_exhaustive_there(tmp_path):
    """--task-inference oneshot on a server that also serves an SPG model: that model's requests that
    name no mode use exhaustive (said in the response, its config and one log line); the SupSup
    model keeps oneshot; a request that names oneshot for the SPG model is still refused."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    from maskbank.process import ServerProcess

    from .conftest import wait_for

    quiet_train(tmp_path, 2)
    quiet_train(tmp_path, 2, method="supsup", model="s")
    x = get_stream(STREAM).task(1).x_test[:8].numpy()
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with ServerProcess(tmp_path, "--task-inference", "oneshot") as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready("m") and client.is_model_ready("s"), what="both models")
        for model, mode in (("m", "exhaustive"), ("m", "exhaustive"), ("s", "oneshot")):
            answer = client.infer(model, [inp]).get_response().parameters
            assert answer["task_inference"].string_param == mode
            config = client.get_model_config(model).config
            assert config.parameters["default_task_inference"].string_value == mode
        with pytest.raises(InferenceServerException, match=r"task_inference 'oneshot' needs mask-based tasks .*\); "
                           "model 'm' has spg tasks: use 'exhaustive'$"):
            client.infer("m", [inp], parameters={"task_inference": "oneshot"})
        client.close()
    warnings = [line for line in server.output if "cannot run on its tasks" in line]
    assert len(warnings) == 1 and "model 'm': the default task inference 'oneshot' (--task-inference)" in warnings[0]


def test_spg_scales_the_head_by_a_mean_independent_of_the_state_dicts_order():
    """The accumulated importance decoded from the registry came in another key order than a single run
    keeps it in; the head's scale, a float32 mean over the concatenation, then differed by 2 ulps and a
    task appended by a second run was not the task one run publishes (at 120 epochs, seen on split digits)."""
    from trainer.spg import IMPORTANCE

    generator = torch.Generator().manual_seed(4)  # values whose scale depends on the order (asserted below)
    module = build_architecture({"arch": "mlp", "sizes": [64, 512, 512, 10]})
    params = dict(module.named_parameters())
    importance = {n: torch.rand(p.shape, generator=generator) for n, p in params.items() if n != "fc2.weight"}
    importance = {n: torch.where(v > 0.5, 1.0, v) for n, v in importance.items()}  # many blocked weights
    backwards = dict(reversed(importance.items()))
    naive = [torch.ones(1) * (1 - float(torch.cat([v.flatten() for v in d.values()]).mean())) for d in (importance, backwards)]
    assert not torch.equal(*naive)  # the orders sum to float32 scales apart: what the test needs to show anything
    scales = []
    for state in (importance, backwards):
        task = PublishedTask(0, "t0", 10, "1", {"head": {}}, {IMPORTANCE: state})
        context = TrainingContext({"arch": "mlp"}, {}, [task], {})
        params["fc2.weight"].grad = torch.ones_like(params["fc2.weight"])
        get_method("spg").protect(params, "fc2.weight", context)()
        scales.append(params["fc2.weight"].grad[0, 0].item())
    assert scales[0] == scales[1]
