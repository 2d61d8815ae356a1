"""A bounded load test: concurrent tritonclient clients in a separate process send task-given (GG) and
task-inferred (GN) requests to a live server for ~15 s (longer if publishing is slow, until every
new task has been served) while this process publishes new tasks.

No request may fail, and every task published during the run must become servable during it (a
probe thread in the load process asks for the next task id until it is answered). The load process
(`python -m bench.loadgen SPEC`, see bench/loadgen.py) is bounded in time and in count and prints
its numbers as JSON; it also checks every answer's logits against the answering task's reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from maskbank.process import ServerProcess
from registry import Registry, build_architecture, effective_parameters, forward

from .conftest import TINY, train_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODEL = "m"
SECONDS = 15.0
BATCH, FEATURES = 8, 64
START_TASKS, ADDED = 2, 4  # tasks 2..5 are published while the load runs, about every 3 s



def x_of_the_load(seed: int = 0) -> np.ndarray:
    """The input bench.loadgen sends (its `_Requests`: default_rng(seed).random((batch, features)))."""
    return np.random.default_rng(seed).random((BATCH, FEATURES), dtype=np.float32)


def in_process_logits(root: Path, task: int, x: np.ndarray) -> list:
    registry = Registry(root)
    manifest = registry.manifest(MODEL)
    entry = manifest.task(task)
    parts = {name: registry.load(ref) for name, ref in entry.parts.items()}
    params = effective_parameters(entry.method, registry.load_backbone(manifest, entry.backbone), parts)
    with torch.no_grad():
        return forward(build_architecture(manifest.architecture), params, torch.from_numpy(x))[:, : entry.num_classes].tolist()


def load_spec(url: str, root: Path, tasks: list[int], **overrides) -> dict:
    x = x_of_the_load()
    return {"url": url, "model": MODEL, "client": "triton", "clients": 4, "batch": BATCH, "features": FEATURES,
            "classes": 10, "seconds": SECONDS, "warmup_seconds": 0.0, "max_requests": 50_000, "tasks": tasks,
            "check": True, "references": {t: in_process_logits(root, t, x) for t in tasks}, **overrides}


def start_load(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_load(load: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = load.communicate(timeout=timeout)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, err
    return json.loads(out)


def test_concurrent_gg_and_gn_load_while_tasks_are_published(tmp_path):
    train_model(tmp_path, MODEL, START_TASKS, TINY)
    with ServerProcess(tmp_path, "--poll-interval", "0.2") as server:
        spec = load_spec(server.url, tmp_path, list(range(START_TASKS)), gn_share=0.3, gn_mode="exhaustive",
                         probe_from=START_TASKS, probe_interval=0.05,
                         probe_until=ADDED)
        load = start_load(spec)
        try:
            began = time.monotonic()
            published = {}
            for k in range(START_TASKS + 1, START_TASKS + ADDED + 1):
                time.sleep(max(0.0, began + 3.0 * (k - START_TASKS) - 1.5 - time.monotonic()))
                train_model(tmp_path, MODEL, k, TINY)  # appends task k - 1 and publishes it
                published[k - 1] = time.monotonic()
        finally:
            result = finish_load(load, 120 + 90)  # loadgen.MAX_SECONDS bounds the phase
        print("\nload process:", json.dumps(result))
        lat = result["latency_ms"]
        print(f"{result['requests']} requests ({result['gg']} GG, {result['gn']} GN) in {result['seconds']:.1f} s "
              f"from 4 clients: {result['rps']:.0f}/s, latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms; "
              f"failures {result['failures']}; answers with another task's logits {result['wrong']}")
        found = {int(k): v for k, v in result["discovered"].items()}
        print("published -> first served (s):", {t: round(found[t] - published[t], 3) for t in published if t in found})

        assert result["failures"] == 0 and not result["errors"], result["errors"]
        assert not result["probe_errors"], result["probe_errors"]
        assert result["gg"] > 20 and result["gn"] > 10, result
        assert sorted(found) == sorted(published), f"tasks published {sorted(published)}, served during the run {sorted(found)}"
        for task, at in published.items():
            assert found[task] >= at - 0.05, f"task {task} answered before it was published?"
            assert found[task] - at < 5.0, f"task {task} took {found[task] - at:.1f} s to become servable"
        assert server.stop() == 0
    assert result["wrong"] == 0, f"answers with another task's logits, e.g. {result['wrong_examples'][:2]}"


@pytest.mark.parametrize("batching", [(), ("--max-queue-delay-us", "2000")], ids=["no delay", "queue delay"])
def test_concurrent_requests_for_different_tasks_get_their_own_logits(tmp_path, batching):
    """With a queue delay, batches of each task also learn when to stop waiting (serving/batcher.py
    Expected): every answer is still its own task's."""
    train_model(tmp_path, MODEL, 2, TINY)
    with ServerProcess(tmp_path, *batching) as server:
        result = finish_load(start_load(load_spec(server.url, tmp_path, [0, 1], seconds=4.0)), 90)
    print(f"\n{result['requests']} requests on tasks 0 and 1 from 4 clients; answers with another task's logits: "
          f"{result['wrong']}; failures {result['failures']}")
    assert result["failures"] == 0 and result["requests"] > 50
    assert result["wrong"] == 0, result["wrong_examples"]
