"""Shared fixtures: small SupSup models trained on offline digits, and real servers on loopback."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from registry import Manifest, Registry, TaskEntry
from trainer import train

# Small enough for 2 CPU cores, accurate enough (~95%) for task inference to be meaningful.
SMALL = {"architecture": {"arch": "mlp", "sizes": [64, 256, 256, 10]}, "method_config": {"epochs": 12}}
TINY = {"architecture": {"arch": "mlp", "sizes": [64, 32, 10]}, "method_config": {"epochs": 2}}


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


def train_model(root, model: str, tasks: int, settings: dict, stream: str = "permuted-digits") -> Registry:
    registry = Registry(root)
    train(registry, model, tasks, {"method": "supsup", "stream": stream, **settings}, log=lambda _: None)
    return registry


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run the `maskbank` command as a user would."""
    return subprocess.run([sys.executable, "-m", "maskbank", *args], capture_output=True, text=True, timeout=600)


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def manifest_with(registry: Registry, tasks: int = 1, generation: int = 1) -> Manifest:
    """A small hand-made manifest of `tasks` SupSup-style tasks over a 2x2 backbone, blobs stored."""
    backbone = registry.put_backbone({"w": torch.ones(2, 2)})
    entries = tuple(
        TaskEntry(id=i, name=f"t{i}", method="supsup", backbone="1", num_classes=2,
                  parts={"masks": registry.put("bitmask/v1", {"w": torch.eye(2, dtype=torch.bool) ^ bool(i)})})
        for i in range(tasks)
    )
    return Manifest(model="m", generation=generation, architecture={"arch": "mlp", "sizes": [2, 2]}, input_shape=(2,),
                    backbones={"1": backbone}, tasks=entries)
