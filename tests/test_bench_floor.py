"""The protocol floors of bench/serving.py answer what the dense network computes, sync and aio alike:
a benchmark's reference that answered wrongly (or faster because it skipped work) would make its
ratios meaningless."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from bench.loadgen import run_phase
from bench.oip_floor import FloorProcess, dense_mlp

SIZES = [8, 16, 3]


@pytest.mark.parametrize("aio", [None, "inline", "executor"], ids=["sync", "aio", "aio-executor"])
def test_the_floor_answers_the_dense_network(aio):
    x = np.random.default_rng(0).random((5, SIZES[0]), dtype=np.float32)
    with torch.no_grad():
        expected = dense_mlp(SIZES)(torch.from_numpy(x)).numpy()
    with FloorProcess(SIZES, max_seconds=60, aio=aio) as floor:
        client = triton.InferenceServerClient(floor.url)
        assert client.is_server_live()
        request = triton.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        logits = client.infer("any", [request]).as_numpy("logits")
    assert np.array_equal(logits, expected)


def test_a_load_phase_reports_the_cpu_each_side_spent_per_request():
    """The serving benchmark's CPU columns: server and load generator, per counted request."""
    with FloorProcess(SIZES, max_seconds=60, aio="inline") as floor:
        result = run_phase({"url": floor.url, "clients": 2, "batch": 1, "features": SIZES[0], "classes": SIZES[-1],
                            "seconds": 0.5, "warmup_seconds": 0.1, "parameters": False, "cpu_pid": floor.pid})
        unasked = run_phase({"url": floor.url, "clients": 1, "batch": 1, "features": SIZES[0], "classes": SIZES[-1],
                             "seconds": 0.2, "warmup_seconds": 0, "parameters": False})
    assert result["failures"] == 0 and result["requests"] > 0
    cpu = result["cpu"]
    assert 0 < cpu["server_us"] < 1e5 and 0 < cpu["client_us"] < 1e5
    assert 0 < cpu["server_cores"] <= os.cpu_count() and 0 < cpu["client_cores"] <= os.cpu_count()
    assert unasked["requests"] > 0 and unasked["cpu"] is None
