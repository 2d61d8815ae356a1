"""The extension point: a method defined outside trainer/ trains, publishes and serves.

`LastLayer` learns only a per-task output layer over a fixed random backbone. Everything it
needs is public API: `Method`/`register_method`/`TaskArtifact` from trainer, an artifact kind
from registry/kinds.py, and a materialiser registered with `register_materializer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from registry import Registry, register_materializer
from registry.codecs import signed_constant
from serving import ModelRepository, infer
from registry.errors import MaskbankError
from trainer import Method, TaskArtifact, get_method, method_names, register_method, require, train


@dataclass
class LastLayerConfig:
    epochs: int = 20
    lr: float = 0.05

    def __post_init__(self):
        require(self, ">= 0", "epochs")
        require(self, "> 0", "lr")


@register_method
class LastLayer(Method):
    name = "test-lastlayer"
    backbone_codec = "signed-constant/v1"
    Config = LastLayerConfig

    def create_backbone(self, module, generator):
        return {name: signed_constant(tuple(p.shape), generator) for name, p in module.named_parameters()}

    def learn_task(self, module, task, generator, context):
        head_name = list(context.backbone)[-1]
        module.load_state_dict(context.backbone)
        head = module.get_parameter(head_name)
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(name == head_name)
        optimizer = torch.optim.Adam([head], lr=self.config.lr)
        for _ in range(self.config.epochs):
            loss = F.cross_entropy(module(task.x_train)[:, : task.num_classes], task.y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return TaskArtifact(parts={"head": {head_name: head.detach().clone()}}, metrics={"final_loss": loss.item()})


@register_materializer("test-lastlayer", parts=("head",))
def _last_layer(backbone, parts, shared):
    return {**backbone, **parts["head"]}


def test_a_materialiser_registered_without_its_parts_still_loads():
    """Plugins written before `parts=` existed stopped every command from starting (a TypeError)."""
    from registry.materialize import missing_parts

    register_materializer("test-older-plugin")(_last_layer)
    assert missing_parts("test-older-plugin", [], {}) is None


def test_a_plugged_in_method_trains_publishes_and_serves(tmp_path):
    assert "test-lastlayer" in method_names() and get_method("test-lastlayer", epochs=3).config.epochs == 3
    with pytest.raises(MaskbankError, match=r"^method 'test-lastlayer': lr must be > 0, got 0.0$"):
        get_method("test-lastlayer", lr=0.0)
    registry = Registry(tmp_path)
    settings = {"method": "test-lastlayer", "stream": "permuted-digits",
                "architecture": {"arch": "mlp", "sizes": [64, 128, 10]}}
    manifest = train(registry, "plug", 2, settings, log=lambda _: None)
    assert [t.method for t in manifest.tasks] == ["test-lastlayer"] * 2
    assert manifest.tasks[1].parts["head"].codec == "tensors/v1"
    assert manifest.training["average_accuracy"] > 0.5  # a random-feature head learns digits

    repository = ModelRepository(registry)
    repository.refresh()
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    result = infer(repository.get("plug"), x, task=1)
    assert result.logits.shape == (8, 10) and result.mode == "given"
    assert infer(repository.get("plug"), x, mode="exhaustive").task.entry.id in (0, 1)


def test_the_command_line_trains_and_serves_a_plugin_named_in_maskbank_plugins(tmp_path, monkeypatch):
    """`maskbank train --method NAME` offered only the built-in methods: a plugin could be used from
    Python alone. MASKBANK_PLUGINS names modules to import first, in `train` and in `serve`."""
    import subprocess
    import sys

    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    from .conftest import wait_for

    root = str(Path(__file__).resolve().parents[1])  # where `tests.test_plugin_method` imports from
    monkeypatch.setenv("MASKBANK_PLUGINS", "tests.test_plugin_method")
    monkeypatch.setenv("PYTHONPATH", root)
    command = [sys.executable, "-m", "maskbank", "train", "--method", "test-lastlayer", "--stream", "permuted-digits",
               "--tasks", "1", "--registry", str(tmp_path), "--model", "plug", "--arch", '{"arch": "mlp", "sizes": [64, 32, 10]}',
               "--epochs", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with ServerProcess(tmp_path) as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready("plug"), what="the plugin's model")
        x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("plug", [inp], parameters={"task_id": 0}).as_numpy("logits").shape == (2, 10)
        client.close()
    monkeypatch.setenv("MASKBANK_PLUGINS", "no_such_plugin_module")
    done = subprocess.run([sys.executable, "-m", "maskbank", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == ("maskbank: error: MASKBANK_PLUGINS: cannot import plugin module "
                                                            "'no_such_plugin_module': ModuleNotFoundError: No module "
                                                            "named 'no_such_plugin_module'")
