"""The maskbank.v1 service through a plain gRPC client (generated stubs)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from maskbank.process import ServerProcess
from serving._proto import maskbank_pb2 as mb
from serving._proto import maskbank_pb2_grpc as mb_grpc
from serving._proto import pb

from .conftest import TINY, train_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    train_model(root, "m", 2, TINY)
    with ServerProcess(root, "--poll-interval", "0.2") as server, grpc.insecure_channel(server.url) as channel:
        yield mb_grpc.MaskbankStub(channel), root


def oip_request(**parameters) -> pb.ModelInferRequest:
    x = np.random.default_rng(1).random((16, 64), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    for key, value in parameters.items():
        if isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = value
    return request


def test_list_and_describe_tasks(service):
    stub, _ = service
    listing = stub.ListTasks(mb.ListTasksRequest(model="m"))
    assert (listing.model, listing.generation) == ("m", 2)
    assert [(t.id, t.name, t.method, t.num_classes, t.in_service) for t in listing.tasks] == [
        (0, "perm-0", "supsup", 10, True), (1, "perm-1", "supsup", 10, True)]
    task = stub.DescribeTask(mb.DescribeTaskRequest(model="m", task_name="perm-1"))
    assert task.id == 1 and task.parts["masks"].bytes == task.bytes > 0 and 0 < task.metrics["accuracy"] <= 1
    assert list(task.labels) == [str(digit) for digit in range(10)]  # class i of a permuted-digits task is digit i
    assert stub.DescribeTask(mb.DescribeTaskRequest(model="m", task_id=0)).name == "perm-0"
    with pytest.raises(grpc.RpcError) as info:
        stub.DescribeTask(mb.DescribeTaskRequest(model="m", task_id=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no task 5" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # as ModelInfer's task_id says it (it was NOT_FOUND here)
        stub.DescribeTask(mb.DescribeTaskRequest(model="m", task_id=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "task_id must be a non-negative integer, got -1"
    with pytest.raises(grpc.RpcError) as info:  # neither id nor name: not silently task 0
        stub.DescribeTask(mb.DescribeTaskRequest(model="m"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "DescribeTask needs task_id or task_name; model 'm' has tasks 0 (perm-0), 1 (perm-1)"
    with pytest.raises(grpc.RpcError) as info:
        stub.ListTasks(mb.ListTasksRequest(model="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_infer_task_reports_gn_details(service):
    stub, _ = service
    inferred = stub.InferTask(mb.InferTaskRequest(request=oip_request(task_inference="exhaustive")))
    assert inferred.mode == "exhaustive" and sorted(inferred.scores) == [0, 1]
    assert inferred.task_id == min(inferred.scores, key=lambda i: (inferred.scores[i], i))
    assert inferred.response.outputs[0].name == "logits"
    assert "task_scores" not in inferred.response.parameters  # the scores map says it; JSON too only when asked
    given = stub.InferTask(mb.InferTaskRequest(request=oip_request(task_id=1)))
    assert (given.mode, given.task_id, given.task_name, dict(given.scores)) == ("given", 1, "perm-1", {})
    with pytest.raises(grpc.RpcError) as info:
        stub.InferTask(mb.InferTaskRequest(request=oip_request(task_inference="psychic")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_model_streams_each_new_generation(service):
    stub, root = service
    stream = stub.WatchModel(mb.WatchModelRequest(model="m"), timeout=120)
    first = next(stream)
    assert (first.generation, first.tasks) == (2, 2)
    publisher = threading.Thread(target=train_model, args=(root, "m", 3, TINY))
    publisher.start()
    second = next(stream)
    publisher.join()
    assert (second.generation, second.tasks, list(second.task_names)) == (3, 3, ["perm-0", "perm-1", "perm-2"])
    stream.cancel()


def test_a_watch_ends_not_found_when_its_model_is_unloaded(tmp_path):
    """A watcher must not go on believing a model is served: it went silent until its own deadline."""
    import tritonclient.grpc as triton

    train_model(tmp_path, "m", 1, TINY)
    with ServerProcess(tmp_path, "--admin-token", "secret") as server, grpc.insecure_channel(server.url) as channel:
        stream = mb_grpc.MaskbankStub(channel).WatchModel(mb.WatchModelRequest(model="m"), timeout=60)
        assert next(stream).generation == 1
        client = triton.InferenceServerClient(server.url)
        client.unload_model("m", headers={"authorization": "Bearer secret"})
        client.close()
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'m'" in info.value.details()


def test_every_watch_hears_of_a_change_however_many_are_open(tmp_path):
    """Each watch waited on a thread of asyncio's default pool (6 on 2 cores): with 20 open, an unload
    reached some seconds late, and an unload followed by a load reached some never. A generation
    that went back (the registry restored from an older copy) was never reported either."""
    import tritonclient.grpc as triton

    train_model(tmp_path, "m", 2, TINY)
    admin = {"authorization": "Bearer secret"}
    with ServerProcess(tmp_path, "--admin-token", "secret", "--poll-interval", "0.2") as server, \
            grpc.insecure_channel(server.url) as channel:
        stub, client = mb_grpc.MaskbankStub(channel), triton.InferenceServerClient(server.url)
        streams = [stub.WatchModel(mb.WatchModelRequest(model="m"), timeout=20) for _ in range(20)]
        assert {next(stream).generation for stream in streams} == {2}
        client.unload_model("m", headers=admin)
        client.load_model("m", headers=admin)  # at once: a watch must not miss the unload in between
        heard = []
        for stream in streams:
            try:
                heard.append(next(stream).generation)  # the model as loaded again
            except grpc.RpcError as error:
                heard.append(error.code())
        assert set(heard) <= {2, grpc.StatusCode.NOT_FOUND} and len(heard) == 20
        watch = stub.WatchModel(mb.WatchModelRequest(model="m"), timeout=20)
        assert next(watch).generation == 2
        (tmp_path / "models" / "m" / "generations" / "0000000002.json").unlink()  # the registry goes back
        back = next(watch)
        assert (back.generation, back.tasks) == (1, 1)
        watch.cancel()
        client.close()
