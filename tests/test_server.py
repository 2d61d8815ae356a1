"""Integration: a real `maskbank serve` process on loopback, queried with the stock tritonclient
(and a plain gRPC client where tritonclient cannot build the request)."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from maskbank.process import ServerProcess
from registry import Registry, build_architecture, effective_parameters, forward
from serving._proto import pb, pb_grpc
from trainer import get_stream

from .conftest import SMALL, TINY, cli, train_model, wait_for

MODEL = "digits"
TASKS = 5
pytestmark = pytest.mark.slow


@dataclass
class Live:
    server: ServerProcess
    client: triton.InferenceServerClient
    registry: Registry
    task0_before: np.ndarray  # task 0's logits served while it was the only task


def infer(client, x: np.ndarray, model: str = MODEL, datatype: str = "FP32", name: str = "input", **parameters):
    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], parameters=parameters or None)


def digits_inputs(task: int, count: int | None = None) -> np.ndarray:
    return get_stream("permuted-digits").task(task).x_test.numpy()[:count]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    train_model(root, MODEL, 1, SMALL)
    with ServerProcess(root, "--poll-interval", "0.2") as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready(MODEL), what="the model to be ready")
        before = infer(client, digits_inputs(0), task_id=0).as_numpy("logits")
        appended = cli("train", "--registry", str(root), "--model", MODEL, "--tasks", str(TASKS))
        assert appended.returncode == 0, appended.stderr
        wait_for(lambda: client.get_model_metadata(MODEL).versions == [str(TASKS)], what="the server to load generation 5")
        yield Live(server, client, Registry(root), before)
        client.close()


def in_process_logits(registry: Registry, task: int, x: np.ndarray) -> np.ndarray:
    """What the server should answer, computed here from the registry alone."""
    manifest = registry.manifest(MODEL)
    entry = manifest.task(task)
    parts = {name: registry.load(ref) for name, ref in entry.parts.items()}
    params = effective_parameters(entry.method, registry.load_backbone(manifest, entry.backbone), parts)
    module = build_architecture(manifest.architecture)
    import torch

    with torch.no_grad():
        return forward(module, params, torch.from_numpy(x))[:, : entry.num_classes].numpy()


def test_server_and_model_metadata(live):
    client = live.client
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "maskbank"
    assert list(server.extensions) == ["classification", "model_repository", "model_configuration", "statistics",
                                       "parameters", "schedule_policy"]
    meta = client.get_model_metadata(MODEL)
    assert (meta.name, list(meta.versions), meta.platform) == (MODEL, ["5"], "maskbank_pytorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 10]), ("task_id", "INT64", [-1])]


def test_health_and_reflection(live):
    with grpc.insecure_channel(live.server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_threads_reach_the_threads_that_compute(live):
    """--threads set torch's thread count in the main thread only: the event loop's and the compute
    pool's forwards ran on a thread per core and summed in another order than the trainer, so answers
    differed in their last bits from the one-thread computation (and GN's from task-given ones)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerProcess(live.registry.location, "--threads", "1") as server:
            client = triton.InferenceServerClient(server.url)
            for rows in (5, 7, 9, 40):
                x = digits_inputs(1, rows)
                expected = in_process_logits(live.registry, 1, x)
                assert np.array_equal(infer(client, x, task_id=1).as_numpy("logits"), expected), rows  # on the loop
                found = infer(client, x, task_inference="exhaustive")  # on the compute pool
                assert found.as_numpy("task_id").tolist() == [1] * rows
                assert np.array_equal(found.as_numpy("logits"), expected), rows
            client.close()
    finally:
        torch.set_num_threads(before)


def test_an_input_that_tells_no_task_apart_says_so(live):
    """An all-zero input scores every task the same (the network has no biases): task 0 came back
    as a confident choice, with nothing to say it was a tie."""
    for mode in ("exhaustive", "oneshot"):
        answer = infer(live.client, np.zeros((4, 64), np.float32), task_inference=mode).get_response().parameters
        assert answer["task_id"].int64_param == 0 and answer["task_ties"].int64_param == TASKS, mode
    answer = infer(live.client, digits_inputs(2, 16), task_inference="exhaustive").get_response().parameters
    assert "task_ties" not in answer


@pytest.mark.parametrize("task", range(TASKS))
def test_task_given_matches_in_process_logits_exactly(live, task):
    x = digits_inputs(task, 40)
    result = infer(live.client, x, task_id=task)
    assert np.array_equal(result.as_numpy("logits"), in_process_logits(live.registry, task, x))
    assert result.as_numpy("task_id").tolist() == [task] * 40
    params = result.get_response().parameters
    assert params["task_inference"].string_param == "given" and params["task"].string_param == f"perm-{task}"


def test_zero_forgetting_bit_exact(live):
    after = infer(live.client, digits_inputs(0), task_id=0).as_numpy("logits")
    assert np.array_equal(after, live.task0_before)


def test_serving_requests_prints_no_warnings(live):
    """Inputs are read-only views of the request bytes: PyTorch's warning about them was noise in
    the server's log at its first request."""
    infer(live.client, digits_inputs(0, 4), task_id=0)
    assert not [line for line in live.server.output if "Warning" in line]


def test_task_by_name(live):
    x = digits_inputs(2, 8)
    by_name = infer(live.client, x, task="perm-2")
    assert by_name.as_numpy("task_id").tolist() == [2] * 8
    assert np.array_equal(by_name.as_numpy("logits"), infer(live.client, x, task_id=2).as_numpy("logits"))


def gn_share(client, mode: str, batch: int = 16, **parameters) -> float:
    right = total = 0
    for task in range(TASKS):
        x = digits_inputs(task)
        for start in range(0, len(x) - batch + 1, batch):
            result = infer(client, x[start : start + batch], task_inference=mode, **parameters)
            right += int(result.as_numpy("task_id")[0] == task)
            total += 1
    return right / total


def test_gn_exhaustive_infers_the_task(live):
    share = gn_share(live.client, "exhaustive")
    print(f"\nGN exhaustive: right task for {share:.1%} of batches of 16")
    assert share >= 0.95


def test_gn_oneshot_answers_with_its_score_and_every_score_when_asked(live):
    share = gn_share(live.client, "oneshot")
    print(f"\nGN oneshot: right task for {share:.1%} of batches of 16 (measured, not asserted)")
    result = infer(live.client, digits_inputs(3, 16), task_inference="oneshot", task_scores=True)
    params = result.get_response().parameters
    scores = json.loads(params["task_scores"].string_param)
    assert params["task_inference"].string_param == "oneshot" and sorted(scores) == [str(i) for i in range(TASKS)]
    chosen = result.as_numpy("task_id")[0]
    assert 0 <= chosen < TASKS and params["task_score"].double_param == scores[str(chosen)]
    plain = infer(live.client, digits_inputs(3, 16), task_inference="oneshot").get_response().parameters
    assert "task_scores" not in plain and plain["task_score"].double_param == scores[str(chosen)]
    with pytest.raises(InferenceServerException, match="parameter 'task_scores' must be a boolean"):
        infer(live.client, GOOD, task_inference="oneshot", task_scores="yes")


def test_gn_binary_and_shortlists(live):
    shares = {"binary": gn_share(live.client, "binary"), "oneshot, shortlist 3": gn_share(live.client, "oneshot", task_shortlist=3)}
    print("\n" + ", ".join(f"GN {k}: right task for {v:.1%} of batches of 16" for k, v in shares.items()))
    for task in range(TASKS):  # a shortlist of every task is exactly the exhaustive rule
        x = digits_inputs(task, 16)
        full = infer(live.client, x, task_inference="oneshot", task_shortlist=TASKS)
        exact = infer(live.client, x, task_inference="exhaustive")
        assert full.as_numpy("task_id")[0] == exact.as_numpy("task_id")[0]
        assert np.array_equal(full.as_numpy("logits"), exact.as_numpy("logits"))
    result = infer(live.client, digits_inputs(0, 16), task_inference="binary")
    assert result.get_response().parameters["task_inference"].string_param == "binary"
    x = digits_inputs(2, 16)  # a shortlist of every task narrows nothing (it was INTERNAL, then had no score at all)
    every = infer(live.client, x, task_inference="binary", task_shortlist=TASKS, task_scores=True)
    assert every.as_numpy("task_id")[0] == infer(live.client, x, task_inference="exhaustive").as_numpy("task_id")[0]
    parameters = every.get_response().parameters
    assert "task_score" in parameters and len(json.loads(parameters["task_scores"].string_param)) == TASKS
    with pytest.raises(InferenceServerException, match="'task_shortlist' must be an integer from 1 to 1000"):
        infer(live.client, GOOD, task_inference="oneshot", task_shortlist=0)


def test_server_default_shortlist_applies_to_requests_that_name_none(live):
    """`serve --task-shortlist K` is the shortlist of GN requests without one: K = every task is the
    exhaustive rule; a request's own `task_shortlist` still wins."""
    with ServerProcess(live.registry.location, "--task-inference", "oneshot", "--task-shortlist", str(TASKS)) as server:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready(MODEL), what="the model to be ready")
        for task in range(TASKS):
            x = digits_inputs(task, 16)
            result, exact = infer(client, x), infer(live.client, x, task_inference="exhaustive")
            assert result.get_response().parameters["task_inference"].string_param == "oneshot"
            assert result.as_numpy("task_id")[0] == exact.as_numpy("task_id")[0]
            own = infer(client, x, task_shortlist=1).as_numpy("task_id")[0]
            assert own == infer(live.client, x, task_inference="oneshot").as_numpy("task_id")[0]
        client.close()


def test_server_default_mode_is_exhaustive(live):
    result = infer(live.client, digits_inputs(1, 16))
    assert result.get_response().parameters["task_inference"].string_param == "exhaustive"


def test_typed_contents_are_accepted(live):
    x = digits_inputs(1, 4)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.parameters["task_id"].int64_param = 1
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(live.server.url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(4, 10)
    assert np.array_equal(logits, infer(live.client, x, task_id=1).as_numpy("logits"))


GOOD = digits_inputs(0, 4)
BAD_REQUESTS = {
    "unknown model": (dict(x=GOOD, model="nope", task_id=0), "NOT_FOUND", "no model named 'nope'"),
    "unknown model, bad input too": (dict(x=GOOD.astype(np.float64), datatype="FP64", model="nope"), "NOT_FOUND",
                                     "no model named 'nope'"),
    "unknown task id": (dict(x=GOOD, task_id=99), "NOT_FOUND", "has no task 99"),
    "unknown task name": (dict(x=GOOD, task="perm-77"), "NOT_FOUND", "has no task 'perm-77'"),
    "wrong feature count": (dict(x=GOOD[:, :63].copy(), task_id=0), "INVALID_ARGUMENT", "shape [4, 63]; model 'digits' expects [-1, 64]"),
    "one-dimensional": (dict(x=GOOD[0].copy(), task_id=0), "INVALID_ARGUMENT", "shape [64]"),
    "wrong datatype": (dict(x=GOOD.astype(np.float64), datatype="FP64", task_id=0), "INVALID_ARGUMENT", "datatype FP64; the model takes FP32"),
    "NaN": (dict(x=np.where(np.arange(64) == 5, np.nan, GOOD).astype(np.float32), task_id=0), "INVALID_ARGUMENT", "NaN or infinite value(s), the first at index [0, 5]"),
    "inf": (dict(x=np.full((2, 64), np.inf, np.float32)), "INVALID_ARGUMENT", "128 NaN or infinite"),
    "overflow, task given": (dict(x=np.full((2, 64), 3e38, np.float32), task_id=0), "INVALID_ARGUMENT",
                             "task 0 of model 'digits' computes non-finite outputs for this input (the first in row 0): "
                             "the network overflows on it"),
    "overflow, binary": (dict(x=np.full((2, 64), 3e38, np.float32), task_inference="binary"), "INVALID_ARGUMENT",
                         "task_inference 'binary' found no finite score on model 'digits' for this input"),
    "overflow, exhaustive": (dict(x=np.full((2, 64), 3e38, np.float32)), "INVALID_ARGUMENT",
                             "task_inference 'exhaustive' found no finite score"),
    "wrong input name": (dict(x=GOOD, name="pixels", task_id=0), "INVALID_ARGUMENT", "exactly one input named 'input'"),
    "unknown parameter": (dict(x=GOOD, taskid=0), "INVALID_ARGUMENT", "unknown request parameter(s) ['taskid']"),
    "unknown mode": (dict(x=GOOD, task_inference="psychic"), "INVALID_ARGUMENT", "Unknown task_inference mode 'psychic' (known: alpha, binary, exhaustive, oneshot, oneshot-input)"),
    "alpha on SupSup": (dict(x=GOOD, task_inference="alpha"), "INVALID_ARGUMENT",
                        "task_inference 'alpha' needs ImpressLearn tasks (alpha over shared basis masks) on one backbone; "
                        "model 'digits' has supsup tasks: use 'binary', 'exhaustive', 'oneshot' or 'oneshot-input'"),
    "empty mode": (dict(x=GOOD, task_inference=""), "INVALID_ARGUMENT", "parameter 'task_inference' is empty: name a "
                   "mode (alpha, binary, exhaustive, oneshot, oneshot-input) or leave the parameter out"),
    "negative task id": (dict(x=GOOD, task_id=-1), "INVALID_ARGUMENT", "'task_id' must be a non-negative integer"),
    "id and name": (dict(x=GOOD, task_id=1, task="perm-1"), "INVALID_ARGUMENT", "either 'task_id' or 'task'"),
    "task and a mode": (dict(x=GOOD, task_id=1, task_inference="oneshot"), "INVALID_ARGUMENT",
                        "'task_inference' applies only when no task is given (task inference)"),
    "task and GN options": (dict(x=GOOD, task="perm-1", task_shortlist=3, task_scores=True), "INVALID_ARGUMENT",
                            "'task_shortlist', 'task_scores' apply only when no task is given (task inference); "
                            "drop 'task_id'/'task' or 'task_shortlist', 'task_scores'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(live, case):
    kwargs, status, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as info:
        infer(live.client, **kwargs)
    assert info.value.status() == f"StatusCode.{status}"
    assert message in info.value.message()
    assert live.client.is_server_live()
    assert infer(live.client, GOOD, task_id=0).as_numpy("logits").shape == (4, 10)


def test_task_scores_false_beside_a_task_is_accepted(live):
    """It asks for nothing: a client that always sends it was refused on every task-given request."""
    result = infer(live.client, GOOD, task_id=1, task_scores=False)
    assert result.as_numpy("task_id").tolist() == [1] * len(GOOD)
    assert "task_scores" not in result.get_response().parameters


def test_raw_and_typed_contents_together_are_refused(live):
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[GOOD[:1].tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(GOOD[0].tolist())
    with grpc.insecure_channel(live.server.url) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "both raw_input_contents and typed contents" in info.value.details()


@pytest.mark.parametrize("fields", [("fp64_contents",), ("fp32_contents", "int_contents")])
def test_typed_values_in_another_types_field_are_refused_naming_the_field(live, fields):
    """Values in fp64_contents for an FP32 input were read as none ("needs 64 values; the request has
    0"), and beside the right field they were ignored."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.parameters["task_id"].int64_param = 0
    contents = request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents
    for field in fields:
        getattr(contents, field).extend([1] * 64)
    with grpc.insecure_channel(live.server.url) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("input 'input' is FP32, whose typed values go in contents.fp32_contents; the "
                                    f"request has values in contents.{fields[-1]}")


def test_raw_bytes_that_do_not_fit_the_shape(live):
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\x00" * 12])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    with grpc.insecure_channel(live.server.url) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 256 bytes; the request has 12" in info.value.details()


def raw_request(**parameters) -> pb.ModelInferRequest:
    """A request for task 0 of four good rows, built with the raw protobuf (tritonclient cannot send an
    empty parameter or a shared-memory input without registering a region)."""
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[GOOD.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(GOOD.shape))
    request.parameters["task_id"].int64_param = 0
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


@pytest.mark.parametrize("case", ["empty parameter", "input in shared memory", "output into shared memory"])
def test_what_the_server_cannot_read_is_refused_not_ignored(live, case):
    """A parameter sent without a value ran with the default (task inference for an empty task_id), and a
    shared-memory input was read as an input of no values ("needs 256 values; the request has 0")."""
    request = raw_request()
    if case == "empty parameter":
        request.parameters["task_id"].Clear()
        expected = "parameter 'task_id' has no value"
    elif case == "input in shared memory":
        del request.raw_input_contents[:]
        request.inputs[0].parameters["shared_memory_region"].string_param = "input_region"
        expected = "input 'input' is in shared-memory region 'input_region': this server has no shared-memory extension"
    else:
        request.outputs.add(name="logits").parameters["shared_memory_region"].string_param = "output_region"
        expected = "output(s) ['logits'] asked into a shared-memory region: this server has no shared-memory extension"
    with grpc.insecure_channel(live.server.url) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in info.value.details()


def test_unknown_version_and_unknown_output(live):
    inp = triton.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(GOOD[:1])
    with pytest.raises(InferenceServerException, match="version '2' is not served") as info:
        live.client.infer(MODEL, [inp], model_version="2", parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.NOT_FOUND"
    served = live.client.get_model_metadata(MODEL).versions[0]
    assert live.client.infer(MODEL, [inp], model_version=f"0{served}", parameters={"task_id": 0})  # as Triton reads it
    assert live.client.infer(MODEL, [inp], model_version=f"{'0' * 5000}{served}", parameters={"task_id": 0})
    with pytest.raises(InferenceServerException, match="is not served") as info:  # beyond int()'s 4,300 digits: INTERNAL
        live.client.infer(MODEL, [inp], model_version="1" * 4301, parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert not live.client.is_model_ready(MODEL, "1" * 4301)
    with pytest.raises(InferenceServerException, match="model version 'latest' is not a number") as info:
        live.client.infer(MODEL, [inp], model_version="latest", parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match=r"unknown output\(s\) \['probs'\]"):
        live.client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("probs")], parameters={"task_id": 0})


def test_a_class_without_a_name_is_answered_value_index_as_triton_does():
    """An empty label gave "value:index:" with a trailing colon."""
    from serving.oip import top_classes

    assert top_classes(np.array([[0.5, 2.0]], np.float32), 2, ["", "x"]).tolist() == [["2.000000:1:x", "0.500000:0"]]


def test_an_output_named_twice_is_refused(live):
    """Each name got a full copy of the output: 200,000 'logits' in a 2 MB request made a 516 MB answer,
    held every client for seconds while it was built, and then failed in gRPC, counted a success."""
    inp = triton.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(GOOD[:1])
    twice = [triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("task_id"),
             triton.InferRequestedOutput("logits")]
    with pytest.raises(InferenceServerException, match=r"output\(s\) \['logits'\] requested more than once; name "
                                                       r"each output once") as info:
        live.client.infer(MODEL, [inp], outputs=twice, parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_corrupt_task_is_out_of_service_while_the_others_serve(tmp_path):
    registry = train_model(tmp_path, "m", 2, TINY)
    ref = registry.manifest("m").task(1).parts["masks"]
    path = Path(registry.blobs.describe(ref.digest))
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))
    with ServerProcess(tmp_path) as server:
        client = triton.InferenceServerClient(server.url)
        assert client.is_model_ready("m")
        assert infer(client, GOOD, model="m", task_id=0).as_numpy("logits").shape == (4, 10)
        with pytest.raises(InferenceServerException) as info:
            infer(client, GOOD, model="m", task_id=1)
        assert info.value.status() == "StatusCode.DATA_LOSS"
        assert info.value.message() == (f"task 1 (perm-1) of model 'm' is out of service: its masks blob {ref.digest} "
                                        "failed verification (its bytes hash to another digest); polls retry it, at "
                                        "growing intervals up to a minute")  # not the path
        found = infer(client, GOOD, model="m", task_inference="exhaustive")
        assert found.as_numpy("task_id")[0] == 0
        # chosen among the tasks in service: a batch of task 1 went to task 0 with nothing to say so
        assert found.get_response().parameters["tasks_out_of_service"].int64_param == 1
        assert "tasks_out_of_service" not in infer(client, GOOD, model="m", task_id=0).get_response().parameters
        client.close()


def test_a_model_with_every_task_out_of_service_is_unavailable_not_a_bad_request(tmp_path):
    """Task inference said INVALID_ARGUMENT ("never retry") for the server's own damaged data, and
    RepositoryIndex said READY while ModelReady said false."""
    registry = train_model(tmp_path, "m", 2, TINY)
    for task in (0, 1):
        path = Path(registry.blobs.describe(registry.manifest("m").task(task).parts["masks"].digest))
        path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))
    with ServerProcess(tmp_path) as server:
        client = triton.InferenceServerClient(server.url)
        assert not client.is_model_ready("m")
        with pytest.raises(InferenceServerException) as info:
            infer(client, GOOD, model="m", task_inference="exhaustive")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert info.value.message() == ("model 'm' has no task in service to infer from: task(s) 0, 1 are out of "
                                        "service (a blob missing or corrupt; ListTasks says which); polls retry them, "
                                        "at growing intervals up to a minute")
        index = client.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m["state"]) for m in index] == [("m", "UNAVAILABLE")]
        assert "task(s) 0, 1 out of service" in index[0]["reason"]
        client.close()


def test_models_published_after_start_are_served_and_stop_is_graceful(tmp_path):
    server = ServerProcess(tmp_path, "--poll-interval", "0.2").start()
    try:
        client = triton.InferenceServerClient(server.url)
        assert client.is_server_ready() and not client.is_model_ready("late")
        train_model(tmp_path, "late", 1, TINY)
        wait_for(lambda: client.is_model_ready("late"), what="the new model")
        assert infer(client, GOOD, model="late", task_id=0).as_numpy("task_id").tolist() == [0] * 4
        client.close()
    finally:
        code = server.stop()
    assert code == 0 and any("stopped" in line for line in server.output)


def test_drain_serves_while_health_says_not_serving(tmp_path):
    """With --drain-seconds, a stopping server answers health checks NOT_SERVING (and ServerReady false)
    on new connections and still serves calls, so readiness probes move traffic away before it refuses."""
    train_model(tmp_path, "m", 1, TINY)
    server = ServerProcess(tmp_path, "--drain-seconds", "3").start()
    try:
        client = triton.InferenceServerClient(server.url)
        wait_for(lambda: client.is_model_ready("m"), what="the model")
        server._process.send_signal(signal.SIGTERM)
        wait_for(lambda: any("draining" in line for line in server.output), what="the drain to begin")
        with grpc.insecure_channel(server.url) as channel:  # a new connection, as a probe makes
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING and not client.is_server_ready()
        assert infer(client, GOOD, model="m", task_id=0).as_numpy("task_id").tolist() == [0] * 4
        client.close()
    finally:
        code = server.stop()
    assert code == 0


def test_classification_extension_answers_the_top_classes_as_triton_does(live):
    """tritonclient's InferRequestedOutput(..., class_count=k): per row the k largest logits as
    "value:index:label" strings (the task names its classes: digits), largest first; all classes when
    k exceeds them; only logits has classes."""
    client = live.client
    x = digits_inputs(2, 5)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    logits = client.infer(MODEL, [inp], parameters={"task_id": 2}).as_numpy("logits")
    for count in (3, 50):
        outputs = [triton.InferRequestedOutput("logits", class_count=count), triton.InferRequestedOutput("task_id")]
        result = client.infer(MODEL, [inp], outputs=outputs, parameters={"task_id": 2})
        classes = result.as_numpy("logits")
        assert classes.shape == (5, min(count, 10)) and result.as_numpy("task_id").tolist() == [2] * 5
        for row, strings in zip(logits, classes):
            triples = [s.decode().split(":") for s in strings]
            assert [int(i) for _, i, _ in triples] == np.argsort(-row, kind="stable")[: min(count, 10)].tolist()
            assert [float(v) for v, _, _ in triples] == pytest.approx(np.sort(row)[::-1][: min(count, 10)], abs=1e-6)
            assert all(label == index for _, index, label in triples)  # permuted digits: class i is the digit i
    with pytest.raises(InferenceServerException, match="output 'task_id' cannot be classified .class_count.: only "
                                                       "'logits' has classes"):
        client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("task_id", class_count=2)],
                     parameters={"task_id": 2})
