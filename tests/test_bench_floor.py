"""The protocol floors of bench/serving.py answer what the dense network computes, sync and aio alike:
a benchmark's reference that answered wrongly (or faster because it skipped work) would make its
ratios meaningless."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

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
