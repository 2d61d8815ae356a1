"""A graceful stop under load and with open streams: every call gets an answer a client can act on
(UNAVAILABLE: retry on another replica), idle streams and watches do not hold the stop for the whole
grace period, and a second signal ends it at once."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from serving import InferenceServer, ServerConfig
from serving._proto import maskbank_pb2 as mb
from serving._proto import maskbank_pb2_grpc as mb_grpc
from serving._proto import pb, pb_grpc

from trainer import train

from .conftest import TINY, train_model, wait_for

pytestmark = pytest.mark.slow
X = np.random.default_rng(0).random((4, 64), dtype=np.float32)


def infer_request(**parameters) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    train_model(root, "m", 2, TINY)
    return root


def started(registry, grace: float, drain: float = 0.0) -> InferenceServer:
    server = InferenceServer(ServerConfig(registry=str(registry), port=0, metrics_port=-1, grace_seconds=grace,
                                          drain_seconds=drain))
    server.start()
    return server


def stop_in_background(server: InferenceServer) -> threading.Thread:
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    return stopping


def test_open_streams_and_watches_end_with_unavailable_rather_than_hold_the_stop(registry):
    """An idle ModelStreamInfer and a WatchModel held every stop for the whole grace period, then were
    cut off with gRPC's own message; a second signal did nothing meanwhile."""
    server = started(registry, grace=30)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        requests_sent = threading.Event()

        def requests():
            yield infer_request(task_id=0)
            requests_sent.wait(60)  # then idle: the client keeps the stream open

        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        assert next(stream).error_message == ""  # the first request is answered
        watch = mb_grpc.MaskbankStub(channel).WatchModel(mb.WatchModelRequest(model="m"))
        assert next(watch).generation == 2
        began = time.monotonic()
        stopping = stop_in_background(server)
        for call in (stream, watch):
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the server is shutting down" in ended.value.details()
        stopping.join(30)
        assert not stopping.is_alive() and time.monotonic() - began < 10  # not the 30 s grace period
        requests_sent.set()
    finally:
        channel.close()


def test_requests_still_waiting_when_the_grace_period_ends_get_unavailable_not_cancelled(registry):
    """They were cancelled by gRPC (CANCELLED, which clients and balancers do not retry)."""
    server = started(registry, grace=0.5)
    pool, release = server.servicer.compute, threading.Event()
    blockers = [pool.submit(release.wait, 60) for _ in range(pool.workers)]  # the compute pool is busy
    wait_for(lambda: pool.queued == 0, 30, "the blockers to start")  # else they count as waiting requests
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        waiting = [stub.ModelInfer.future(infer_request(), timeout=60) for _ in range(3)]  # task inference: the pool
        deadline = time.monotonic() + 30
        while pool.queued < len(waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        stopping = stop_in_background(server)
        for call in waiting:
            assert call.exception(30).code() == grpc.StatusCode.UNAVAILABLE
            assert "its grace period (--grace-seconds) ended before this request was computed" in call.details()
        release.set()
        stopping.join(30)
        assert not stopping.is_alive() and all(blocker.result(30) for blocker in blockers)
    finally:
        release.set()
        channel.close()


def test_stop_now_ends_a_graceful_stop_at_once(registry):
    """A second SIGINT or SIGTERM while stopping (serve_forever) calls stop_now: the waiting calls are
    answered UNAVAILABLE at once, not after the grace period."""
    server = started(registry, grace=60)
    pool, release = server.servicer.compute, threading.Event()
    blockers = [pool.submit(release.wait, 60) for _ in range(pool.workers)]
    wait_for(lambda: pool.queued == 0, 30, "the blockers to start")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        waiting = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(infer_request(), timeout=60)
        deadline = time.monotonic() + 30
        while pool.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopping = stop_in_background(server)
        time.sleep(0.5)
        assert stopping.is_alive()  # graceful: waiting for the request
        began = time.monotonic()
        server.stop_now()
        assert waiting.exception(30).code() == grpc.StatusCode.UNAVAILABLE
        assert "it was stopped at once" in waiting.details()
        release.set()
        stopping.join(30)
        assert not stopping.is_alive() and time.monotonic() - began < 10
        assert all(blocker.result(30) for blocker in blockers)
    finally:
        release.set()
        channel.close()


def test_stop_now_ends_the_drain_too(registry):
    """A second signal during --drain-seconds refused what waited but the process lived on until the
    drain ended (up to an hour)."""
    server = started(registry, grace=60, drain=60)
    stopping = stop_in_background(server)
    time.sleep(0.5)
    began = time.monotonic()
    server.stop_now()
    stopping.join(30)
    assert not stopping.is_alive() and time.monotonic() - began < 10


@pytest.mark.parametrize("run", range(3))
def test_a_second_signal_right_after_the_first_stops_at_once(registry, run):
    """A real server with --drain-seconds 60, sent SIGTERM and SIGINT back to back (two signals, which
    the system never merges), ends in seconds. The second was taken for the first again when it came
    before the handlers were swapped, and when it interrupted the first's handler, that handler's lock
    (threading.Event.set) deadlocked the process, still serving (5 runs in 20, in a probe)."""
    import signal
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-m", "maskbank", "serve", "--registry", str(registry), "--port", "0",
                               "--metrics-port", "-1", "--drain-seconds", "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "maskbank serving" in server.stdout.readline()
        server.send_signal(signal.SIGTERM)
        server.send_signal(signal.SIGINT)
        began = time.monotonic()
        assert server.wait(30) == 0 and time.monotonic() - began < 10
        assert "stopping now (signalled again)" in server.stderr.read()
    finally:
        server.kill()


def test_sighup_while_serve_starts_or_stops_neither_kills_it_nor_changes_its_status(registry):
    """SIGHUP's default action killed a server that was still importing and loading (status 129, no word),
    and one sent during a graceful stop, once the interpreter tore down, turned status 0 into 129."""
    import signal
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-m", "maskbank", "--log-level", "INFO", "serve", "--registry",
                               str(registry), "--port", "0", "--metrics-port", "-1", "--grace-seconds", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # importing: before serve_forever's handler
        server.send_signal(signal.SIGHUP)
        assert "maskbank serving" in server.stdout.readline()
        server.send_signal(signal.SIGTERM)
        for _ in range(20):  # through the stop and the teardown
            time.sleep(0.05)
            if server.poll() is None:
                server.send_signal(signal.SIGHUP)
        assert server.wait(30) == 0
    finally:
        server.kill()


@pytest.mark.parametrize("grace", [float("inf"), float("nan"), -1.0, 3601.0])
def test_the_grace_period_is_a_finite_number_of_seconds(grace):
    with pytest.raises(ValueError, match="--grace-seconds must be from 0 to 3600"):
        ServerConfig(registry="r", grace_seconds=grace)


def test_a_registry_that_hangs_holds_neither_metadata_calls_nor_the_stop(tmp_path):
    """With the registry hanging (object storage retrying for a minute; here a manifest that is a FIFO
    nobody writes, so reading it never ends), admin loads took every RPC thread, so metadata and index
    calls timed out; and a stop never ended: its wait for the hung poll had no limit, and the loads'
    threads, joined at exit, waited for the stopped event loop."""
    import contextlib
    import os

    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    train_model(tmp_path, "m", 1, TINY)
    token = "secret"
    with ServerProcess(tmp_path, "--poll-interval", "0.1", "--grace-seconds", "1", "--workers", "2",
                       "--admin-token", token) as process:
        os.mkfifo(tmp_path / "models" / "m" / "generations" / "0000000002.json")
        client = triton.InferenceServerClient(process.url)

        def load() -> None:
            with contextlib.suppress(Exception):  # answered at the stop, if at all
                triton.InferenceServerClient(process.url).load_model("m", headers={"authorization": f"Bearer {token}"},
                                                                     client_timeout=60)

        loads = [threading.Thread(target=load, daemon=True) for _ in range(4)]  # more than --workers
        for thread in loads:
            thread.start()
        time.sleep(1.0)
        assert client.get_model_metadata("m", client_timeout=5).versions == ["1"]
        assert client.get_model_repository_index(client_timeout=5).models[0].name == "m"
        began = time.monotonic()
        assert process.stop(timeout=30) == 0
        assert time.monotonic() - began < 10, f"the stop took {time.monotonic() - began:.1f} s"
        assert any("stopping without waiting for the registry poll under way" in line for line in process.output)


def test_sighup_makes_a_running_server_poll_the_registry_at_once(tmp_path):
    """SIGHUP killed the server (its default action); a daemon's reload signal should rather have it
    look at the registry now, so a publish need not wait out a long --poll-interval."""
    import signal

    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    registry = train_model(tmp_path, "m", 1, TINY)
    with ServerProcess(tmp_path, "--poll-interval", "3600", "--threads", "1") as process:
        client = triton.InferenceServerClient(process.url)
        assert client.get_model_metadata("m", client_timeout=5).versions == ["1"]
        train(registry, "m", 2, {}, log=lambda _: None)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: client.get_model_metadata("m", client_timeout=5).versions == ["2"], timeout=30,
                 what="generation 2 served after SIGHUP")
        process.send_signal(signal.SIGHUP)  # nothing new: it keeps serving
        time.sleep(0.5)
        assert client.is_server_live() and client.get_model_metadata("m").versions == ["2"]
        assert process.stop(timeout=30) == 0
    assert any("SIGHUP: polling the registry now" in line for line in process.output)
