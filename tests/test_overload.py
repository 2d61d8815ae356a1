"""A server offered more than it can compute. Admission control (--max-queue-size), the bound on
inference requests a server holds at once: the rules in-process, then a real server on loopback
(refusals over the wire with the stock tritonclient, its stream and maskbank's InferTask, their
metrics, concurrent clients against a small bound). Requests whose caller gives up while they wait
(counted, never computed), and Triton's per-request `timeout` (what waited longer is not computed)."""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from maskbank.cli import main
from serving import InferenceServer, ServerConfig, logs
from serving._proto import maskbank_pb2 as mb
from serving._proto import maskbank_pb2_grpc as mb_grpc
from serving._proto import pb
from serving.oip import decode_timeout
from serving.admission import Admission
from serving.errors import InvalidRequest, RequestTimeout, ServerBusy
from serving.timeouts import QueueTimeouts
from serving.statistics import ModelStats

from .conftest import TINY, AtOnce, scrape, train_model, wait_for, with_parameter

X = np.random.default_rng(0).random((4, 64), dtype=np.float32)


def inputs(x: np.ndarray = X) -> list[triton.InferInput]:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


# ---------------------------------------------------------------- the rules, in-process

def test_no_bound_by_default_and_a_negative_bound_is_refused():
    unbounded = Admission()
    with unbounded.admit("m"), unbounded.admit("m"), unbounded.admit("m"):
        assert unbounded.pending() == {"m": 3}
    assert (unbounded.pending(), unbounded.rejected()) == ({"m": 0}, {})
    with pytest.raises(ValueError, match="--max-queue-size must be 0 .no bound. or more, got -1"):
        Admission(-1)
    with pytest.raises(ValueError, match="--max-queue-size must be at least 0, got -1"):
        ServerConfig(registry="r", max_queue_size=-1)


def test_a_request_beyond_its_models_bound_is_refused_and_its_place_comes_back():
    bounded = Admission(2)
    with bounded.admit("m"), bounded.admit("m"):
        with pytest.raises(ServerBusy, match=r"holds 2 inference requests for model 'm', its bound "
                                             r"\(--max-queue-size 2\); retry"):
            with bounded.admit("m"):
                pass
        with bounded.admit("other"):  # each model has its own bound
            assert bounded.pending() == {"m": 2, "other": 1}
        assert bounded.rejected() == {"m": 1}
    with pytest.raises(RuntimeError):  # a failing request gives its place back too
        with bounded.admit("m"):
            raise RuntimeError("the request failed")
    assert bounded.pending() == {"m": 0, "other": 0}
    with bounded.admit("m"), bounded.admit("m"):
        assert bounded.pending()["m"] == 2


def test_threads_never_hold_more_than_the_bound():
    bounded, limit, attempts, inside, outcomes = Admission(3), 3, 400, AtOnce(), []

    def attempt(_):
        try:
            with bounded.admit("m"), inside:
                time.sleep(0.001)
            outcomes.append("taken")
        except ServerBusy:
            outcomes.append("refused")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(attempt, range(attempts)))
    assert inside.most <= limit
    assert len(outcomes) == attempts and outcomes.count("refused") == bounded.rejected()["m"] > 0
    assert bounded.pending() == {"m": 0}


def test_refusals_are_logged_in_summary_not_one_line_each(caplog, monkeypatch):
    bounded = Admission(1)
    with caplog.at_level(logging.WARNING, logger="maskbank.serving"), bounded.admit("m"):
        for _ in range(50):
            with pytest.raises(ServerBusy):
                with bounded.admit("m"):
                    pass
        monkeypatch.setattr(logs, "FLOOD_LOG_SECONDS", 0.0)
        with pytest.raises(ServerBusy):
            with bounded.admit("m"):
                pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 1 inference request(s) so far, the latest for model 'm', which held 1, its bound (--max-queue-size); "
        "clients got UNAVAILABLE",
        "refused 50 inference request(s) since the last such line, the latest for model 'm', which held 1, its bound "
        "(--max-queue-size); clients got UNAVAILABLE",
    ]


def test_serve_explains_a_negative_bound(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--registry", "r", "--max-queue-size", "-1"])
    assert stopped.value.code == 2
    assert "maskbank serve: error: --max-queue-size must be at least 0, got -1" in capsys.readouterr().err


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """A server of two TINY models, m and other, with room for one request at a time for each, on
    loopback (in this process, so that a test can hold m's one place itself and make every request
    over the wire for m wait on it)."""
    root = tmp_path_factory.mktemp("registry")
    train_model(root, "m", 2, TINY)
    train_model(root, "other", 1, TINY)
    server = InferenceServer(ServerConfig(registry=str(root), port=0, metrics_port=0, max_queue_size=1))
    server.start()
    yield server
    server.stop()


def test_a_full_model_refuses_with_unavailable_others_serve_then_it_serves_again(busy_server):
    client = triton.InferenceServerClient(f"127.0.0.1:{busy_server.port}")
    before = scrape(busy_server)
    with busy_server.servicer.admission.admit("m"):  # model m's one place is taken
        with pytest.raises(InferenceServerException) as refused:
            client.infer("m", inputs(), parameters={"task_id": 0})
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert re.search(r"server is busy: it holds 1 inference request for model 'm', its bound "
                         r"\(--max-queue-size 1\); retry after a short backoff, or send to another replica",
                         refused.value.message())
        with pytest.raises(InferenceServerException, match="server is busy"):  # task inference is bounded too
            client.infer("m", inputs())
        during = scrape(busy_server)
        assert during[("maskbank_model_requests_pending", (("model", "m"),))] == 1
        assert client.infer("other", inputs(), parameters={"task_id": 0}).as_numpy("logits").shape == (4, 10)
    refused = ("maskbank_model_requests_refused_total", (("model", "m"),))
    assert during[refused] - before[refused] == 2
    failures = ("nv_inference_request_failure", (("model", "m"), ("version", "2")))
    assert during[failures] - before[failures] == 2  # refused requests count as failed, as in Triton
    answer = client.infer("m", inputs(), parameters={"task_id": 1})
    assert answer.as_numpy("logits").shape == (4, 10)
    assert scrape(busy_server)[("maskbank_model_requests_pending", (("model", "m"),))] == 0
    assert client.get_model_config("m").config.dynamic_batching.default_queue_policy.max_queue_size == 1


def test_a_stream_gets_the_refusal_as_its_answer_and_stays_open(busy_server):
    client = triton.InferenceServerClient(f"127.0.0.1:{busy_server.port}")
    answers = []
    arrived = threading.Semaphore(0)

    def callback(result, error):
        answers.append((result, error))
        arrived.release()

    client.start_stream(callback)
    try:
        with busy_server.servicer.admission.admit("m"):
            client.async_stream_infer("m", inputs(), parameters={"task_id": 0})
            assert arrived.acquire(timeout=30)
        client.async_stream_infer("m", inputs(), parameters={"task_id": 0})
        assert arrived.acquire(timeout=30)
    finally:
        client.stop_stream()
    (_, refusal), (served, error) = answers
    assert "UNAVAILABLE: the server is busy" in str(refusal)
    assert error is None and served.as_numpy("logits").shape == (4, 10)


def test_a_stream_never_reads_ahead_past_the_bound_so_it_does_not_refuse_itself(busy_server):
    """A stream's requests run together, but no more of them than --max-queue-size: one client that
    pipelines its requests on a stream waits (flow control) rather than be refused by its own."""
    client = triton.InferenceServerClient(f"127.0.0.1:{busy_server.port}")
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        for i in range(10):
            client.async_stream_infer("m", inputs(), request_id=str(i))  # task inference: on the compute pool, at once
        received = [answers.get(timeout=30) for _ in range(10)]
    finally:
        client.stop_stream()
    assert [error for _, error in received] == [None] * 10
    assert [result.get_response().id for result, _ in received] == [str(i) for i in range(10)]


def test_maskbank_infer_task_is_bounded_too(busy_server):
    with grpc.insecure_channel(f"127.0.0.1:{busy_server.port}") as channel:
        stub = mb_grpc.MaskbankStub(channel)
        request = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(X.shape))], raw_input_contents=[X.tobytes()])
        with busy_server.servicer.admission.admit("m"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.InferTask(mb.InferTaskRequest(request=request), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stub.InferTask(mb.InferTaskRequest(request=request), timeout=30).mode == "exhaustive"


def test_concurrent_clients_get_answers_or_unavailable_and_nothing_else(tmp_path):
    """Eight clients at once against room for two: every request is answered, right, or refused with
    UNAVAILABLE; the server ends with nothing held and keeps serving."""
    train_model(tmp_path, "m", 2, TINY)
    server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1, max_queue_size=2))
    server.start()
    try:
        url = f"127.0.0.1:{server.port}"
        first = triton.InferenceServerClient(url)
        expected = {t: first.infer("m", inputs(), parameters={"task_id": t}).as_numpy("logits") for t in (0, 1)}

        def client(index: int) -> list[str]:
            connection, outcomes = triton.InferenceServerClient(url), []
            for _ in range(40):
                try:  # GN requests (exhaustive: every task's forward) keep places held long enough to collide
                    answer = connection.infer("m", inputs(), parameters={} if index % 2 else {"task_id": 1})
                    task = int(answer.as_numpy("task_id")[0])
                    assert np.allclose(answer.as_numpy("logits"), expected[task], rtol=1e-4, atol=1e-5)
                    outcomes.append("served")
                except InferenceServerException as error:
                    assert error.status() == "StatusCode.UNAVAILABLE", error
                    outcomes.append("refused")
            return outcomes

        with ThreadPoolExecutor(8) as pool:
            outcomes = [o for result in pool.map(client, range(8)) for o in result]
        assert len(outcomes) == 320 and outcomes.count("refused") == server.servicer.admission.rejected().get("m", 0)
        assert outcomes.count("served") > 0 and outcomes.count("refused") > 0  # measured: 235-267 of 320 refused
        assert server.servicer.admission.pending() == {"m": 0}
    finally:
        server.stop()


def test_a_request_whose_deadline_passes_while_it_waits_is_counted_and_never_computed(busy_server):
    """The compute pool is kept busy, so a task-inference request waits in its queue until the
    client's deadline passes: the client gets DEADLINE_EXCEEDED, the server counts the request as
    cancelled (and failed), and the pool skips it: only the next request is computed."""
    client = triton.InferenceServerClient(f"127.0.0.1:{busy_server.port}")
    pool, release = busy_server.servicer.compute, threading.Event()
    executions = lambda: busy_server.statistics.snapshot().get("m", ModelStats()).execution_count  # noqa: E731
    before, executed = scrape(busy_server), executions()
    blockers = [pool.submit(release.wait, 60) for _ in range(pool.workers)]
    try:
        with pytest.raises(InferenceServerException) as expired:
            client.infer("m", inputs(), client_timeout=0.5)
        assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        cancelled = ("maskbank_model_requests_cancelled_total", (("model", "m"),))
        wait_for(lambda: scrape(busy_server)[cancelled] - before[cancelled] == 1, 30, "the cancellation to be counted")
    finally:
        release.set()
        for blocker in blockers:
            blocker.result(timeout=30)
    assert client.infer("m", inputs()).as_numpy("logits").shape == (4, 10)
    assert executions() == executed + 1
    failures = ("nv_inference_request_failure", (("model", "m"), ("version", "2")))
    assert scrape(busy_server)[failures] - before[failures] == 1


def test_timeout_is_read_in_microseconds_and_checked():
    request = partial(with_parameter, "timeout")
    assert decode_timeout(request()) is None
    assert decode_timeout(request(int64_param=0)) is None  # 0: no limit, as in Triton
    assert decode_timeout(request(int64_param=250_000)) == 0.25
    assert decode_timeout(request(uint64_param=1_000_000)) == 1.0
    for bad in ({"int64_param": -1}, {"string_param": "soon"}, {"double_param": 0.5}, {"bool_param": True}):
        with pytest.raises(InvalidRequest, match="parameter 'timeout' must be a non-negative integer number of "
                                                 "microseconds, got"):
            decode_timeout(request(**bad))


def test_a_request_that_waits_past_its_timeout_is_not_computed(busy_server):
    """tritonclient's `infer(timeout=...)`: a task-inference request waits on a busy compute pool
    longer than its timeout and is answered DEADLINE_EXCEEDED without being computed; with time to
    spare, the same request is served."""
    client = triton.InferenceServerClient(f"127.0.0.1:{busy_server.port}")
    pool, release = busy_server.servicer.compute, threading.Event()
    executions = lambda: busy_server.statistics.snapshot().get("m", ModelStats()).execution_count  # noqa: E731
    executed, dropped = executions(), ("maskbank_requests_dropped_total", ())
    before = scrape(busy_server)[dropped]
    blockers = [pool.submit(release.wait, 60) for _ in range(pool.workers)]
    threading.Timer(0.5, release.set).start()
    with pytest.raises(InferenceServerException) as late:
        client.infer("m", inputs(), timeout=200_000)  # microseconds
    for blocker in blockers:
        blocker.result(timeout=30)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert re.search(r"the request waited \d+ µs for the compute pool, more than its timeout \(200000 µs\), and was "
                     r"not computed; retry later, or with a longer timeout", late.value.message())
    assert executions() == executed and scrape(busy_server)[dropped] == before + 1
    assert client.infer("m", inputs(), timeout=60_000_000).as_numpy("logits").shape == (4, 10)
    assert executions() == executed + 1


RETRY_ON_UNAVAILABLE = json.dumps({"methodConfig": [{
    "name": [{"service": "inference.GRPCInferenceService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def test_a_client_with_a_retry_policy_rides_out_a_full_server(busy_server):
    """The README's client settings: gRPC's own retries on UNAVAILABLE. The server is full when the
    request arrives and has room 50 ms later; the call is refused, retried, and answered."""
    client = triton.InferenceServerClient(f"127.0.0.1:{busy_server.port}", channel_args=[
        ("grpc.service_config", RETRY_ON_UNAVAILABLE), ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)])
    assert client.is_server_live()  # connected first, so the request itself arrives well within the 50 ms
    refused = ("maskbank_model_requests_refused_total", (("model", "m"),))
    before, full = scrape(busy_server)[refused], busy_server.servicer.admission.admit("m")
    full.__enter__()  # the one place, taken until the timer gives it back
    threading.Timer(0.05, full.__exit__, (None, None, None)).start()
    assert client.infer("m", inputs(), parameters={"task_id": 0}).as_numpy("logits").shape == (4, 10)
    assert scrape(busy_server)[refused] > before


def test_queue_timeouts_drop_only_what_started_too_late():
    timeouts, ran = QueueTimeouts(), []
    job = lambda: ran.append(1) or "answer"  # noqa: E731
    now = time.monotonic()
    assert timeouts.run(job, now, None) == "answer" and timeouts.run(job, now, 60.0) == "answer"
    with pytest.raises(RequestTimeout, match=r"waited \d+ µs for the compute pool, more than its timeout \(1000 µs"):
        timeouts.run(job, now - 1.0, 0.001)  # arrived a second ago, timeout 1 ms
    assert ran == [1, 1] and timeouts.dropped == 1


def test_a_server_default_timeout_applies_to_requests_that_give_none(tmp_path):
    """--default-timeout-us 200000 (Triton's default_timeout_microseconds): on a busy pool a request
    without a timeout of its own is dropped after 0.2 s; one whose `timeout` allows more is served."""
    train_model(tmp_path, "m", 1, TINY)
    server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1, default_timeout_us=200_000))
    server.start()
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        policy = client.get_model_config("m").config.dynamic_batching.default_queue_policy
        assert (policy.default_timeout_microseconds, policy.allow_timeout_override) == (200_000, True)
        pool = server.servicer.compute
        for own_timeout, served in ((None, False), (60_000_000, True)):
            release = threading.Event()
            blockers = [pool.submit(release.wait, 60) for _ in range(pool.workers)]
            threading.Timer(0.5, release.set).start()
            try:
                answer = client.infer("m", inputs(), timeout=own_timeout)
                assert served and answer.as_numpy("logits").shape == (4, 10)
            except InferenceServerException as error:
                assert not served and error.status() == "StatusCode.DEADLINE_EXCEEDED", error
                assert "more than its timeout (200000 µs)" in error.message()
            for blocker in blockers:
                blocker.result(timeout=30)
        assert server.servicer.timeouts.dropped == 1
    finally:
        server.stop()
    with pytest.raises(ValueError, match="--default-timeout-us must be at least 0, got -1"):
        ServerConfig(registry="r", default_timeout_us=-1)


def test_a_flood_log_writes_the_tail_of_a_burst_when_its_period_ends(monkeypatch, caplog):
    """Events after a line were only written at the next event 10 s later: the log undercounted a
    burst until the next one, however long that took."""
    from serving import logs

    monkeypatch.setattr(logs, "FLOOD_LOG_SECONDS", 0.3)
    flood = logs.FloodLog(logging.getLogger("maskbank.test.flood"))
    with caplog.at_level(logging.WARNING, logger="maskbank.test.flood"):
        for _ in range(5):
            flood.record("refused %d request(s) {since}")
        assert [r.getMessage() for r in caplog.records] == ["refused 1 request(s) so far"]
        deadline = time.monotonic() + 10
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.4)  # no third line: nothing came after the second
    assert [r.getMessage() for r in caplog.records] == ["refused 1 request(s) so far",
                                                         "refused 4 request(s) since the last such line"]
