"""Shared fixtures: small SupSup models trained on offline digits, and real servers on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from registry import Manifest, Registry, TaskEntry, build_architecture, effective_parameters, forward
from serving import InferenceServer, ServerConfig
from serving._proto import pb
from trainer import train

# Property tests draw the same examples on every run, so that CI never fails on a draw nobody can
# reproduce; HYPOTHESIS_PROFILE=explore draws fresh ones (how the fuzz test's own bugs get found).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


class AtOnce:
    """`with at_once:` in several threads: `most` is the largest number of them inside at one time."""

    def __init__(self):
        self.inside = self.most = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.inside -= 1


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the metrics endpoint of `server`: an InferenceServer
    of this process (its `metrics_port`) or a ServerProcess (the port its startup line names)."""
    port = getattr(server, "metrics_port", None) or int(
        re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "\n".join(server.output)).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


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


def signed_manifest(body) -> str:
    """A manifest file around `body` with the checksum it deserves (damage a checksum cannot catch)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"manifest": body, "sha256": hashlib.sha256(canonical).hexdigest()})


def task_logits(registry: Registry, task: int, x: torch.Tensor, model: str = "m", backbone: str | None = None) -> torch.Tensor:
    """Task `task`'s logits computed from the registry alone, as a server computes them (over its own
    backbone version, or over `backbone`)."""
    manifest = registry.manifest(model)
    entry = manifest.task(task)
    parts = {kind: registry.load(ref) for kind, ref in entry.parts.items()}
    params = effective_parameters(entry.method, registry.load_backbone(manifest, backbone or entry.backbone), parts)
    with torch.no_grad():
        return forward(build_architecture(manifest.architecture), params, x)[:, : entry.num_classes]


def check_served_while_appending(root, registry: Registry, model: str, x: np.ndarray, append, generation: int) -> None:
    """Serve `root` with a real `maskbank serve`; record task 0's served logits on `x`; `append()` publishes
    more tasks, up to `generation`; then task 0 must be served bit-identically and every task exactly
    as `task_logits` computes it from the registry."""
    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    def served(task: int) -> np.ndarray:
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], parameters={"task_id": task}).as_numpy("logits")

    with ServerProcess(root, "--poll-interval", "0.2") as server:
        client = triton.InferenceServerClient(server.url)
        try:
            wait_for(lambda: client.is_model_ready(model), what="the model to be ready")
            before = served(0)
            append()
            wait_for(lambda: client.get_model_metadata(model).versions == [str(generation)],
                     what=f"the server to load generation {generation}")
            assert np.array_equal(served(0), before)
            for task in range(len(registry.manifest(model).tasks)):
                assert np.array_equal(served(task), task_logits(registry, task, torch.from_numpy(x), model=model).numpy())
        finally:
            client.close()


@contextlib.contextmanager
def held_server(root, **settings) -> Iterator[tuple[InferenceServer, list[threading.Event]]]:
    """A server of one TINY model, m, with `settings`, every compute thread held until its event is set."""
    train_model(root, "m", 2, TINY)
    server = InferenceServer(ServerConfig(registry=str(root), port=0, metrics_port=0, **settings))
    server.start()
    pool = server.servicer.compute
    releases = [threading.Event() for _ in range(pool.workers)]
    blockers = [pool.submit(release.wait, 30) for release in releases]
    try:
        wait_for(lambda: pool.queued == 0, 10, "the blockers to start")
        yield server, releases
    finally:
        for release in releases:
            release.set()
        for blocker in blockers:
            blocker.result(timeout=30)
        server.stop()


def with_parameter(key: str, **value) -> pb.ModelInferRequest:
    """A ModelInferRequest for model m carrying parameter `key` set as `value` says (e.g. int64_param=3),
    or none without `value`: for the decoders of single parameters."""
    message = pb.ModelInferRequest(model_name="m")
    if value:
        message.parameters[key].MergeFrom(pb.InferParameter(**value))
    return message
