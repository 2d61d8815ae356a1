"""Triton's protocol extensions through the stock tritonclient: streaming, model config,
statistics, repository index, load and unload."""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from maskbank.process import ServerProcess
from serving._proto import pb, pb_grpc

from .conftest import TINY, held_server, train_model, wait_for

pytestmark = pytest.mark.slow
X = np.random.default_rng(0).random((4, 64), dtype=np.float32)
TOKEN = "test-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    train_model(root, "a", 2, TINY)
    train_model(root, "b", 1, TINY)
    with ServerProcess(root, "--poll-interval", "0.2", "--max-batch-size", "8", "--admin-token", TOKEN) as process:
        client = triton.InferenceServerClient(process.url)
        wait_for(lambda: client.is_model_ready("a") and client.is_model_ready("b"), what="models")
        yield process, client, root
        client.close()


def request(x: np.ndarray = X):
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def test_stream_infer_answers_in_order_and_survives_a_bad_request(server):
    _, client, _ = server
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("a", request(), parameters={"task_id": 1}, request_id="first")
        client.async_stream_infer("a", request(), parameters={"task_id": 9}, request_id="bad")
        client.async_stream_infer("a", request(), parameters={"task_id": 0}, request_id="third")
        answers = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    (first, e1), (_, bad), (third, e3) = answers
    assert e1 is None and e3 is None
    assert first.get_response().id == "first" and first.as_numpy("task_id").tolist() == [1] * 4
    # Triton marks each request's last answer; clients of decoupled models read until it (waited forever)
    assert first.get_response().parameters["triton_final_response"].bool_param
    assert "NOT_FOUND" in str(bad) and "no task 9" in str(bad)
    assert third.as_numpy("task_id").tolist() == [0] * 4
    direct = client.infer("a", request(), parameters={"task_id": 1}).as_numpy("logits")
    assert np.array_equal(first.as_numpy("logits"), direct)


def test_a_stream_error_names_its_request(server):
    """A raw client matches answers to requests by id: a failed request's answer carries it too."""
    url = server[0].url
    requests = [pb.ModelInferRequest(model_name="a", id=name) for name in ("no-input", "unknown-model")]
    requests[1].model_name, requests[1].model_version = "nope", "7"
    with grpc.insecure_channel(url) as channel:
        answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=30))
    assert [(a.infer_response.id, a.infer_response.model_name, a.infer_response.model_version) for a in answers] == [
        ("no-input", "a", ""), ("unknown-model", "nope", "7")]  # as Triton: the version was left out
    assert all(a.infer_response.parameters["triton_final_response"].bool_param for a in answers)
    assert answers[0].error_message.startswith("INVALID_ARGUMENT: ") and answers[1].error_message.startswith("NOT_FOUND: ")


def test_a_bug_answering_one_stream_request_fails_that_request_only():
    """Any exception, not only maskbank's own errors, is the answer of its request: the stream goes on
    (it ended the whole call with INTERNAL, unanswered requests included)."""
    import asyncio

    from serving.servicer import InferenceServicer

    class Failing(InferenceServicer):
        def __init__(self):  # only ModelStreamInfer's loop is under test here
            self._stream_readers = set()

        async def answer(self, request, stream=None):
            if request.id == "bad":
                raise RuntimeError("a bug")
            return pb.ModelInferResponse(id=request.id), None

    async def answers():
        async def requests():
            for name in ("first", "bad", "third"):
                yield pb.ModelInferRequest(model_name="a", id=name)

        return [a async for a in Failing().ModelStreamInfer(requests(), None)]

    first, bad, third = asyncio.run(answers())
    assert (first.error_message, third.error_message, third.infer_response.id) == ("", "", "third")
    assert bad.infer_response.id == "bad"
    assert bad.error_message == ("INTERNAL: internal error in /inference.GRPCInferenceService/ModelStreamInfer; "
                                 "the server log has details")


def test_a_stream_computes_its_requests_together_and_answers_in_order():
    """A stream's requests run at once (as in Triton, they batch together, and one slow request does
    not hold back those behind it), and the answers come in request order: here the first request
    can only finish once the second has started, which a stream answering one request at a time
    never does."""
    import asyncio

    from serving.servicer import InferenceServicer

    class Dependent(InferenceServicer):
        def __init__(self):  # only ModelStreamInfer's loop is under test here
            self._stream_readers = set()
            self.second_started = asyncio.Event()
            self.finished: list[str] = []

        async def answer(self, request, stream=None):
            if request.id == "first":
                await self.second_started.wait()
            else:
                self.second_started.set()
            self.finished.append(request.id)
            return pb.ModelInferResponse(id=request.id), None

    async def answers():
        servicer = Dependent()

        async def requests():
            for name in ("first", "second", "third"):
                yield pb.ModelInferRequest(model_name="a", id=name)

        async def collect():
            return [a.infer_response.id async for a in servicer.ModelStreamInfer(requests(), None)]

        return await asyncio.wait_for(collect(), 10), servicer.finished

    sent, finished = asyncio.run(answers())
    assert sent == ["first", "second", "third"] and finished[0] == "second"


def test_a_huge_model_name_gets_not_found_and_is_not_kept(server):
    """A client's string is quoted in part (a status message travels in a header, which clients cap at
    16 KiB) and a model the server does not serve gets no statistics (they would grow without bound)."""
    _, client, _ = server
    name = "x" * 100_000
    with pytest.raises(InferenceServerException) as info:
        client.infer(name, request(), parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.NOT_FOUND" and "characters left out" in info.value.message()
    assert len(info.value.message()) <= 2000
    assert name not in [m.name for m in client.get_inference_statistics().model_stats]


def test_model_config(server):
    _, client, _ = server
    config = client.get_model_config("a").config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("a", "maskbank_pytorch", "maskbank", 8)
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [64])]
    assert [o.name for o in config.output] == ["logits", "task_id"]
    task_id = config.output[1]  # [N] at batch N, as responses have it (ModelMetadata: [-1]), in Triton's words
    assert list(task_id.dims) == [1] and task_id.HasField("reshape") and list(task_id.reshape.shape) == []
    assert config.parameters["tasks"].string_value == "2" and config.parameters["methods"].string_value == "supsup"
    assert config.version_policy.latest.num_versions == 1  # fields Triton always fills in
    group = config.instance_group[0]
    assert (len(config.instance_group), group.name, group.kind, group.count) == (1, "a", group.KIND_CPU, 2)
    assert client.get_model_config("a", as_json=True)["config"]["instance_group"][0]["kind"] == "KIND_CPU"


def test_model_config_holds_the_largest_settings_a_server_accepts(tmp_path):
    """A server took --max-batch-size 3000000000 (Triton's field is an int32) and answered every
    ModelConfig INTERNAL, which tools that read the config first (perf_analyzer) cannot get past."""
    from serving.server import INT32_MAX, MAX_PRIORITY_LEVELS, UINT32_MAX, UINT64_MAX

    settings = {"max_batch_size": INT32_MAX, "instances": INT32_MAX, "max_queue_size": UINT32_MAX,
                "default_timeout_us": UINT64_MAX, "priority_levels": MAX_PRIORITY_LEVELS}
    with held_server(tmp_path, **settings) as (server, _):
        config = triton.InferenceServerClient(f"127.0.0.1:{server.port}").get_model_config("m").config
    batching = config.dynamic_batching
    assert (config.max_batch_size, config.instance_group[0].count, batching.default_queue_policy.max_queue_size,
            batching.default_queue_policy.default_timeout_microseconds, batching.priority_levels) == tuple(settings.values())


def test_statistics_count_successes_and_failures(server):
    _, client, _ = server
    before = client.get_inference_statistics("b").model_stats[0]
    client.infer("b", request(), parameters={"task_id": 0})
    with pytest.raises(InferenceServerException):
        client.infer("b", request(), parameters={"task_id": 5})
    after = client.get_inference_statistics("b").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_count == before.inference_count + 4 and after.last_inference > 0
    every = client.get_inference_statistics().model_stats
    assert sorted(s.name for s in every) == ["a", "b"]


def test_statistics_time_successful_requests_only_and_send_every_field(server):
    """As Triton: queue and compute time count the requests that succeed (perf_analyzer divides them by
    the success count), while a failed request's execution still counts as an execution; every
    duration is present, zero or not, so that JSON readers find each key."""
    _, client, _ = server
    before = client.get_inference_statistics("b").model_stats[0]
    client.infer("b", request(), parameters={"task_id": 0})
    with pytest.raises(InferenceServerException, match="non-finite outputs"):  # fails after its execution
        client.infer("b", request(np.full((2, 64), 3e38, np.float32)), parameters={"task_id": 0})
    after = client.get_inference_statistics("b").model_stats[0]
    for name in ("success", "queue", "compute_infer"):
        assert getattr(after.inference_stats, name).count == getattr(before.inference_stats, name).count + 1, name
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.execution_count == before.execution_count + 2
    stats = client.get_inference_statistics("b", as_json=True)["model_stats"][0]["inference_stats"]
    assert set(stats) == {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                          "cache_hit", "cache_miss"}


def test_queue_time_includes_the_wait_for_the_compute_pool(server):
    """Task inference runs on the compute pool: the time from arrival to its start is queue time, as
    in Triton (it was recorded as 0, however long requests waited for a thread)."""
    _, client, _ = server
    before = client.get_inference_statistics("b").model_stats[0].inference_stats.queue
    client.infer("b", request(), parameters={"task_inference": "exhaustive"})
    after = client.get_inference_statistics("b").model_stats[0].inference_stats.queue
    assert after.count == before.count + 1 and after.ns > before.ns


def test_oversized_batch_is_refused(server):
    _, client, _ = server
    with pytest.raises(InferenceServerException, match="at most 8 per request") as info:
        client.infer("a", request(np.zeros((9, 64), np.float32)), parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_repository_index_load_and_unload(server):
    _, client, root = server
    index = {m.name: (m.version, m.state) for m in client.get_model_repository_index().models}
    assert index == {"a": ("2", "READY"), "b": ("1", "READY")}
    client.unload_model("b", headers=ADMIN)
    assert not client.is_model_ready("b")
    unloaded = {m.name: (m.version, m.state, m.reason) for m in client.get_model_repository_index().models}["b"]
    assert unloaded == ("1", "UNAVAILABLE", "unloaded")  # Triton's words for a model unloaded, with its version
    with pytest.raises(InferenceServerException, match="unloaded") as info:
        client.infer("b", request(), parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.NOT_FOUND"
    train_model(root, "b", 2, TINY)  # a new generation is not followed while unloaded
    client.load_model("b", headers=ADMIN)  # loads it now, at the newest generation
    assert client.is_model_ready("b") and client.get_model_metadata("b").versions == ["2"]
    with pytest.raises(InferenceServerException, match="has no model 'zzz'") as info:
        client.load_model("zzz", headers=ADMIN)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    for override in ({"config": "{}"}, {"files": {"file:1/model.onnx": b"x"}, "config": "{}"}):
        with pytest.raises(InferenceServerException, match="takes no parameters here .*publish a new generation") as info:
            client.load_model("b", headers=ADMIN, **override)  # Triton's config override: not silently ignored
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    client.unload_model("a", headers=ADMIN)
    with grpc.insecure_channel(server[0].url) as channel:  # tritonclient cannot ask for ready models only
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models] == ["b"]
        admin = [("authorization", ADMIN["authorization"])]
        for call, message in ((stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="zz")),
                              (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(repository_name="zz", model_name="a")),
                              (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(repository_name="zz", model_name="b"))):
            with pytest.raises(grpc.RpcError) as refused:  # Triton's answer; it was ignored, answered from this one
                call(message, metadata=admin)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert refused.value.details().startswith("'repository_name' specification is not supported (got 'zz')")
        assert client.is_model_ready("b") and not client.is_model_ready("a")  # neither call did anything
    client.load_model("a", headers=ADMIN)
    assert {m.state for m in client.get_model_repository_index().models} == {"READY"}


def test_two_servers_follow_one_directory_registry(tmp_path):
    train_model(tmp_path, "m", 1, TINY)
    with ServerProcess(tmp_path, "--poll-interval", "0.2") as one, ServerProcess(tmp_path, "--poll-interval", "0.2") as two:
        clients = [triton.InferenceServerClient(s.url) for s in (one, two)]
        train_model(tmp_path, "m", 2, TINY)
        for client in clients:
            wait_for(lambda c=client: c.get_model_metadata("m").versions == ["2"], what="both servers at generation 2")
        answers = [c.infer("m", request(), parameters={"task_id": 1}).as_numpy("logits") for c in clients]
        assert np.array_equal(*answers)
        for client in clients:
            client.close()


def test_a_server_started_with_model_serves_only_those_models(tmp_path):
    """--model a: b (there at start) and c (published later) are listed as unloaded and answer
    NOT_FOUND saying why; an admin load adds b; a new generation of a is still followed."""
    train_model(tmp_path, "a", 1, TINY)
    train_model(tmp_path, "b", 1, TINY)
    with ServerProcess(tmp_path, "--poll-interval", "0.2", "--model", "a", "--model", "later",
                       "--admin-token", TOKEN) as process:
        client = triton.InferenceServerClient(process.url)
        assert any(f"not serving 'later' yet (--model): not in registry {tmp_path} (it holds: a, b)" in line
                   for line in process.output)
        # not ready while a model it was started for is not served: readiness probes sent it traffic it answered
        # NOT_FOUND
        with grpc.insecure_channel(process.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert not client.is_server_ready()
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        train_model(tmp_path, "a", 2, TINY)
        train_model(tmp_path, "c", 1, TINY)
        wait_for(lambda: client.get_model_metadata("a").versions == ["2"], what="model a at generation 2")
        index = lambda: {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}  # noqa: E731
        states = wait_for(lambda: "c" in index() and index(), what="model c in the index (as of the last poll)")
        assert states["a"] == ("READY", "")
        assert states["later"] == ("UNAVAILABLE", "named with --model, not in the registry yet: the server is not "
                                   "ready until it is served")  # why the server is not ready
        for model in ("b", "c"):
            assert states[model] == ("UNAVAILABLE", "not among the models this server was started with (--model)")
            with pytest.raises(InferenceServerException) as info:
                client.infer(model, request(), parameters={"task_id": 0})
            assert info.value.status() == "StatusCode.NOT_FOUND"
            assert (f"no model named '{model}' is served (models: a; this server serves only the models it was "
                    "started with (--model))") in info.value.message()
        client.load_model("b", headers=ADMIN)
        assert client.infer("b", request(), parameters={"task_id": 0}).as_numpy("logits").shape == (4, 10)
        train_model(tmp_path, "later", 1, TINY)  # named at start: served once published
        wait_for(lambda: client.is_model_ready("later"), what="model 'later' once published")
        assert not client.is_model_ready("c") and client.is_server_ready()
        with grpc.insecure_channel(process.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest()).status ==
                            health_pb2.HealthCheckResponse.SERVING, what="health SERVING")
        client.unload_model("a", headers=ADMIN)  # an operator's unload: still ready
        assert client.is_server_ready()
        client.close()


def test_a_server_on_an_empty_registry_says_so_and_serves_what_is_published_later(tmp_path):
    """No model yet (a registry about to be filled, or a mistyped --registry): a warning names the
    location; a model published afterwards is served without a restart."""
    with ServerProcess(tmp_path, "--poll-interval", "0.2") as process:
        assert any(f"registry {tmp_path} holds no loadable model" in line and "WARNING" in line
                   for line in process.output)
        train_model(tmp_path, "m", 1, TINY)
        client = triton.InferenceServerClient(process.url)
        wait_for(lambda: client.is_model_ready("m"), what="model m served")
        assert client.infer("m", request(), parameters={"task_id": 0}).as_numpy("logits").shape == (4, 10)
        client.close()


def test_a_server_whose_only_model_does_not_load_says_so_not_that_nothing_is_published(tmp_path):
    """A corrupt backbone was reported as "holds no loadable model (nothing published there yet, or not
    the --registry meant?)"."""
    registry = train_model(tmp_path, "m", 1, TINY)
    (backbone,) = registry.manifest("m").backbones.values()
    blob = Path(registry.blobs.describe(backbone.blob.digest))
    blob.write_bytes(blob.read_bytes()[::-1])
    with ServerProcess(tmp_path) as process:
        assert any(f"registry {tmp_path} holds no model that loads: 'm' could not be loaded (the errors above)" in line
                   and "WARNING" in line for line in process.output), "\n".join(process.output)
        assert not any("nothing published there yet" in line for line in process.output)


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_host_port_brackets_ipv6_literals():
    from serving.address import host_port

    assert host_port("127.0.0.1", 8001) == "127.0.0.1:8001" and host_port("localhost", 1) == "localhost:1"
    assert host_port("::1", 8001) == "[::1]:8001" and host_port("[::1]", 8001) == "[::1]:8001"


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_a_server_on_the_ipv6_loopback_answers_grpc_and_metrics(tmp_path, host):
    """--host ::1: gRPC once read "::1:PORT" as another address and failed to bind; '[::1]', as gRPC
    targets write it, bound gRPC but not the metrics ("Name or service not known")."""
    import urllib.request

    train_model(tmp_path, "m", 1, TINY)
    with ServerProcess(tmp_path, "--metrics-port", "0", host=host) as process:
        assert process.url.startswith("[::1]:")
        client = triton.InferenceServerClient(process.url)
        wait_for(lambda: client.is_model_ready("m"), what="the model to be ready")
        assert client.infer("m", request(), parameters={"task_id": 0}).as_numpy("task_id").tolist() == [0] * len(X)
        line = next(line for line in process.output if line.startswith("maskbank serving"))
        metrics = line.split("metrics on ")[1].rstrip(")")
        assert metrics.startswith("http://[::1]:") and urllib.request.urlopen(metrics).status == 200
        client.close()
