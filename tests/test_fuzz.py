"""Property-based fuzzing of ModelInfer on one live `maskbank serve` process.

Malformed (and some well-formed) requests are built directly as protobuf messages and sent through a
plain gRPC stub, since tritonclient refuses to build most of them. The property: every answer is a
valid response or a gRPC error with an expected code and a non-empty message (never UNKNOWN or
INTERNAL), and afterwards the server is live and answers a good request with the right logits.

The fuzzer found that shapes whose element count overflows int64 ended in INTERNAL (numpy's
product wrapped around); the regression tests below keep that fixed.
"""

from __future__ import annotations

import math
import struct
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from maskbank.process import ServerProcess
from serving._proto import pb, pb_grpc

from .conftest import TINY, train_model, wait_for

pytestmark = pytest.mark.slow
MODEL = "m"
FEATURES, CLASSES = 64, 10
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS,
           grpc.StatusCode.DEADLINE_EXCEEDED}  # the last: a valid request whose drawn `timeout` it outwaited
OIP_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "BF16", "FP32", "FP64", "BYTES"]
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
            "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8, "BYTES": 1}
TYPED_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                "fp32_contents", "fp64_contents", "bytes_contents"]
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)


def element_count(shape) -> int:
    """The exact (unbounded) number of elements a shape claims."""
    return math.prod(shape) if shape else 1


# ---------------------------------------------------------------- the live server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-registry")
    train_model(root, MODEL, 2, TINY)
    with ServerProcess(root) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def good_request(x: np.ndarray, task_id: int = 0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.parameters["task_id"].int64_param = task_id
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    index = [o.name for o in response.outputs].index("logits")
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(tuple(response.outputs[index].shape))


@pytest.fixture(scope="module", autouse=True)
def reference(stub):
    """A good request and its answer, taken before any fuzzing."""
    x = np.random.default_rng(0).random((3, FEATURES), dtype=np.float32)
    return x, logits_of(stub.ModelInfer(good_request(x), timeout=30))


# ---------------------------------------------------------------- strategies

names = st.sampled_from(["input", "INPUT", "pixels", "", "input ", "logits"]) | st.text(max_size=12)
datatypes = st.sampled_from(OIP_DATATYPES) | st.sampled_from(["fp32", "FLOAT32", "", "TYPE_FP32"]) | st.text(max_size=8)
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 63, 64, 65, 1024, 1025]), st.integers(-3, 130), INT64,
                 st.sampled_from([-1, 2**31, 2**32 + 1, 2**62, 2**62 + 1, 2**63 - 1, -(2**63)]))
shapes = st.lists(dims, max_size=4) | st.tuples(st.integers(0, 40), st.sampled_from([FEATURES])).map(list)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
parameter_keys = st.sampled_from(["task_id", "task", "task_inference", "priority", "timeout", "triton_x",
                                  "sequence_id", "headers", "binary_data_output", "taskid", "Task", ""]) | st.text(max_size=10)


@st.composite
def parameters(draw):
    """An InferParameter of any oneof kind, or none set, with edge-case values."""
    kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param", None]))
    parameter = pb.InferParameter()
    if kind == "bool_param":
        parameter.bool_param = draw(st.booleans())
    elif kind == "int64_param":
        parameter.int64_param = draw(st.sampled_from([0, 1, 2, -1, 99]) | INT64)
    elif kind == "string_param":
        parameter.string_param = draw(st.sampled_from(["exhaustive", "oneshot", "binary", "psychic", "perm-0", "perm-1",
                                                       "0", "", "given"]) | st.text(max_size=20))
    elif kind == "double_param":
        parameter.double_param = draw(st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -0.0]))
    elif kind == "uint64_param":
        parameter.uint64_param = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1]) | UINT64)
    return parameter


@st.composite
def typed_contents(draw, contents: pb.InferTensorContents, count_hint: int) -> None:
    """Fill one (possibly wrong) typed field with a plausible or random number of values."""
    field = draw(st.sampled_from(TYPED_FIELDS))
    size = draw(st.sampled_from([count_hint, 0, 1, count_hint + 1]) if 0 <= count_hint <= 4096 else st.integers(0, 70))
    if field == "bool_contents":
        values = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    elif field in ("int_contents",):
        values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=size, max_size=size))
    elif field == "int64_contents":
        values = draw(st.lists(INT64, min_size=size, max_size=size))
    elif field == "uint_contents":
        values = draw(st.lists(st.integers(0, 2**32 - 1), min_size=size, max_size=size))
    elif field == "uint64_contents":
        values = draw(st.lists(UINT64, min_size=size, max_size=size))
    elif field == "fp32_contents":
        values = draw(st.lists(floats, min_size=size, max_size=size))
    elif field == "fp64_contents":
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=size, max_size=size))
    else:
        values = draw(st.lists(st.binary(max_size=8), min_size=min(size, 70), max_size=min(size, 70)))
    getattr(contents, field).extend(values)


@st.composite
def raw_bytes(draw, shape, datatype: str) -> bytes:
    """Bytes that fit the shape (FP32: with NaN/inf now and then), or an arbitrary length."""
    count = element_count(shape) if all(d >= 0 for d in shape) else -1
    need = count * ITEMSIZE.get(datatype, 4)
    if 0 <= need <= (1 << 20) and draw(st.booleans()):
        if datatype == "FP32":
            special = draw(st.sampled_from([None, None, float("nan"), float("inf"), float("-inf")]))
            x = np.random.default_rng(draw(st.integers(0, 9))).random(count, dtype=np.float32)
            if special is not None and count:
                x[draw(st.integers(0, count - 1))] = special
            return x.astype("<f4").tobytes()
        return bytes(need)
    return draw(st.sampled_from([b"", b"\x00", b"\x00" * 4 * FEATURES, struct.pack("<f", float("nan")) * FEATURES])
                | st.binary(max_size=600))


@st.composite
def random_requests(draw) -> pb.ModelInferRequest:
    """Free-form requests: anything in every field (most are refused at the first check)."""
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, MODEL, MODEL, "nope", "", "M", "../m", "m/"]) | st.text(max_size=10)),
        model_version=draw(st.sampled_from(["", "", "1", "2", "3", "0", "-1", "latest"])),
        id=draw(st.sampled_from(["", "req-1"]) | st.text(max_size=10)),
    )
    use_raw = draw(st.sampled_from(["raw", "raw", "typed", "both", "none"]))
    raw_count_delta = draw(st.sampled_from([0, 0, 0, 1, -1]))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3]))):
        shape = draw(shapes)
        datatype = draw(st.sampled_from(["FP32", "FP32"]) | datatypes)
        tensor = request.inputs.add(name=draw(st.sampled_from(["input", "input"]) | names), datatype=datatype, shape=shape)
        if draw(st.booleans()):
            tensor.parameters[draw(parameter_keys)].CopyFrom(draw(parameters()))
        if use_raw in ("typed", "both"):
            count = element_count(shape) if all(d >= 0 for d in shape) else -1
            draw(typed_contents(tensor.contents, count))
        if use_raw in ("raw", "both"):
            request.raw_input_contents.append(draw(raw_bytes(shape, datatype)))
    if use_raw in ("raw", "both") and raw_count_delta == 1:
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    elif use_raw in ("raw", "both") and raw_count_delta == -1 and request.raw_input_contents:
        del request.raw_input_contents[-1]
    for key, parameter in draw(st.dictionaries(parameter_keys, parameters(), max_size=4)).items():
        request.parameters[key].CopyFrom(parameter)
    for name in draw(st.lists(st.sampled_from(["logits", "task_id", "probs", "", "LOGITS"]) | st.text(max_size=6), max_size=3)):
        output = request.outputs.add(name=name)
        if draw(st.booleans()):
            output.parameters["binary_data"].bool_param = True
    return request


SELECTIONS = [{}, {"task_id": ("int64_param", 0)}, {"task_id": ("int64_param", 1)}, {"task": ("string_param", "perm-1")},
              {"task_inference": ("string_param", "exhaustive")}, {"task_inference": ("string_param", "oneshot")}]
MUTATIONS = ["model", "version", "input name", "datatype", "shape", "wrapping shape", "raw length", "typed",
             "typed too", "non-finite", "extra input", "no input", "extra raw", "no raw", "parameter", "outputs",
             "rows", "tensor parameter", "id"]


@st.composite
def mutated_requests(draw) -> pb.ModelInferRequest:
    """A good request (task given, or GN) with zero to three mutations, so that the checks after
    the first one are exercised too, and successes are checked for being right."""
    rows = draw(st.integers(1, 8))
    x = np.random.default_rng(draw(st.integers(0, 3))).random((rows, FEATURES), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=MODEL)
    for key, (kind, value) in draw(st.sampled_from(SELECTIONS)).items():
        setattr(request.parameters[key], kind, value)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, FEATURES])
    request.raw_input_contents.append(x.tobytes())
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        event(f"mutation: {mutation}")
        if mutation == "model":
            request.model_name = draw(st.sampled_from(["nope", "", "M", "m ", "../m", "m/x", "m" * 200]) | st.text(max_size=10))
        elif mutation == "version":
            request.model_version = draw(st.sampled_from(["1", "2", "3", "0", "-1", "02", " 2", "latest"]) | st.text(max_size=4))
        elif mutation == "input name":
            tensor.name = draw(names)
        elif mutation == "datatype":
            tensor.datatype = draw(datatypes)
            size = ITEMSIZE.get(tensor.datatype, 0) * element_count(tensor.shape)
            # bytes that fit the new datatype, when the shape (maybe mutated before: negative or huge) allows them
            if draw(st.booleans()) and tensor.datatype in ITEMSIZE and 0 <= size <= 1 << 20:
                request.raw_input_contents[:] = [bytes(size)]
        elif mutation == "shape":
            tensor.shape[:] = draw(shapes)
        elif mutation == "wrapping shape":  # the int64 product wraps around to the data's element count
            tensor.shape[:] = draw(st.sampled_from([[2**62 + 1, FEATURES * rows], [rows, 2**62 + 1, FEATURES], [2**62, 4 * rows * 16]]))
        elif mutation == "raw length":
            if request.raw_input_contents:
                cut = draw(st.sampled_from([-8, -4, -3, -1, 1, 2, 4, 8]))
                raw = request.raw_input_contents[0]
                request.raw_input_contents[0] = raw[:cut] if cut < 0 else raw + bytes(cut)
        elif mutation in ("typed", "typed too"):
            field = draw(st.sampled_from(["fp32_contents"] * 3 + TYPED_FIELDS))
            values = x.ravel().tolist() if field in ("fp32_contents", "fp64_contents") else [1] * x.size
            if field == "bool_contents":
                values = [True] * x.size
            elif field == "bytes_contents":
                values = [b"\x00\x00\x00\x00"] * min(x.size, 70)
            getattr(tensor.contents, field).extend(values)
            if mutation == "typed":
                del request.raw_input_contents[:]
        elif mutation == "non-finite":
            bad = x.copy()
            bad.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            if request.raw_input_contents:
                request.raw_input_contents[0] = bad.tobytes()
            if tensor.contents.fp32_contents:
                tensor.contents.fp32_contents[:] = bad.ravel().tolist()
        elif mutation == "extra input":
            extra = request.inputs.add(name=draw(st.sampled_from(["input", "input2"]) | names),
                                       datatype=draw(st.sampled_from(["FP32"]) | datatypes), shape=draw(shapes))
            if request.raw_input_contents and draw(st.booleans()):
                request.raw_input_contents.append(draw(raw_bytes(list(extra.shape), extra.datatype)))
        elif mutation == "no input":
            del request.inputs[:]
        elif mutation == "extra raw":
            request.raw_input_contents.append(draw(st.binary(max_size=300)))
        elif mutation == "no raw":
            del request.raw_input_contents[:]
        elif mutation == "parameter":
            key = draw(parameter_keys)
            if draw(st.booleans()) and key in request.parameters:
                del request.parameters[key]
            else:
                request.parameters[key].CopyFrom(draw(parameters()))
        elif mutation == "outputs":
            for name in draw(st.lists(st.sampled_from(["logits", "task_id", "probs", "", "LOGITS"]) | st.text(max_size=6), max_size=3)):
                request.outputs.add(name=name)
        elif mutation == "rows":
            new_rows = draw(st.sampled_from([0, 1, 1023, 1024, 1025]))
            tensor.shape[:] = [new_rows, FEATURES]
            request.raw_input_contents[:] = [np.full((new_rows, FEATURES), 0.5, "<f4").tobytes()]
            x = np.full((max(new_rows, 1), FEATURES), 0.5, np.float32)
        elif mutation == "tensor parameter":
            tensor.parameters[draw(parameter_keys)].CopyFrom(draw(parameters()))
        elif mutation == "id":
            request.id = draw(st.text(max_size=20))
    return request


requests = st.one_of(mutated_requests(), mutated_requests(), mutated_requests(), random_requests())


def check_answer(stub, request: pb.ModelInferRequest) -> None:
    try:
        response = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        event(error.code().name)  # pytest --hypothesis-show-statistics shows the mix of answers
        assert error.code() in ALLOWED, f"{error.code().name}: {error.details()}"
        assert error.details(), f"{error.code().name} with an empty message"
        return
    event("OK")  # a success must be a well-formed answer to what was asked
    x_rows = int(request.inputs[0].shape[0])
    outputs = [o.name for o in request.outputs] or ["logits", "task_id"]
    assert [o.name for o in response.outputs] == outputs
    assert len(response.raw_output_contents) == len(outputs)
    for output, raw in zip(response.outputs, response.raw_output_contents):
        itemsize = 4 if output.datatype == "FP32" else 8
        assert output.datatype == ("FP32" if output.name == "logits" else "INT64")
        assert len(raw) == itemsize * element_count(output.shape)
        assert list(output.shape) == ([x_rows, CLASSES] if output.name == "logits" else [x_rows])
    if "logits" in outputs:
        assert np.isfinite(logits_of(response)).all()
    assert response.model_name == MODEL and response.id == request.id


# ---------------------------------------------------------------- the tests


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(request=requests)
@example(request=pb.ModelInferRequest())  # empty
@example(request=pb.ModelInferRequest(model_name=MODEL))  # no input at all
def test_malformed_requests_get_a_proper_status(stub, request):
    check_answer(stub, request)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(batch=st.lists(requests, min_size=1, max_size=4))
def test_stream_answers_every_request_and_stays_open(stub, batch):
    """ModelStreamInfer: one answer per request, in order; a refused request is answered with an
    error message naming an expected status, and the stream carries on (as Triton does)."""
    answers = list(stub.ModelStreamInfer(iter(batch), timeout=60))
    assert len(answers) == len(batch)
    allowed = tuple(f"{code.name}: " for code in ALLOWED)
    for request, answer in zip(batch, answers):
        if answer.error_message:
            assert answer.error_message.startswith(allowed), answer.error_message
            event("stream error")
        else:
            assert answer.infer_response.model_name == MODEL and answer.infer_response.id == request.id
            event("stream OK")


SPECIFIC = {
    "zero rows": dict(shape=[0, FEATURES], raw=b""),
    "negative dim": dict(shape=[-1, FEATURES], raw=b"\x00" * 4 * FEATURES),
    "scalar": dict(shape=[], raw=b"\x00" * 4),
    "three dims": dict(shape=[1, FEATURES, 1], raw=b"\x00" * 4 * FEATURES),
    "too many rows": dict(shape=[1025, FEATURES], raw=b"\x00" * 4 * FEATURES * 1025),
    "raw too short": dict(shape=[2, FEATURES], raw=b"\x00" * 4 * FEATURES),
    "NaN raw": dict(shape=[1, FEATURES], raw=struct.pack("<f", float("nan")) * FEATURES),
    "-inf raw": dict(shape=[1, FEATURES], raw=struct.pack("<f", float("-inf")) * FEATURES),
    "BYTES datatype": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, datatype="BYTES"),
    "BF16 datatype": dict(shape=[1, FEATURES], raw=b"\x00" * 2 * FEATURES, datatype="BF16"),
    "garbage datatype": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, datatype="\u2603"),
    "typed in the wrong field": dict(shape=[1, FEATURES], typed=("int_contents", [1] * FEATURES)),
    "typed NaN": dict(shape=[1, FEATURES], typed=("fp32_contents", [float("nan")] * FEATURES)),
    "unknown model": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, model="nope"),
    "unknown version": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, version="7"),
    "task_id as double": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, params={"task_id": ("double_param", 0.0)}),
    "task_id as bool": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, params={"task_id": ("bool_param", True)}),
    "task_id as string": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, params={"task_id": ("string_param", "0")}),
    "task_id huge uint64": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, params={"task_id": ("uint64_param", 2**64 - 1)}),
    "task as int": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, params={"task": ("int64_param", 0)}),
    "task_inference as double NaN": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES,
                                         params={"task_inference": ("double_param", float("nan"))}),
    "unknown parameter": dict(shape=[1, FEATURES], raw=b"\x00" * 4 * FEATURES, params={"tasks": ("int64_param", 0)}),
}


@pytest.mark.parametrize("case", sorted(SPECIFIC))
def test_specific_malformed_requests(stub, case):
    """Hand-picked corners the fuzzer may or may not reach in 150 examples; each must be refused."""
    spec = SPECIFIC[case]
    request = pb.ModelInferRequest(model_name=spec.get("model", MODEL), model_version=spec.get("version", ""))
    tensor = request.inputs.add(name="input", datatype=spec.get("datatype", "FP32"), shape=spec["shape"])
    if "raw" in spec:
        request.raw_input_contents.append(spec["raw"])
    if "typed" in spec:
        getattr(tensor.contents, spec["typed"][0]).extend(spec["typed"][1])
    for key, (kind, value) in spec.get("params", {"task_id": ("int64_param", 0)}).items():
        setattr(request.parameters[key], kind, value)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() in ALLOWED and info.value.details(), f"{info.value.code().name}: {info.value.details()}"


@pytest.mark.parametrize("shape, raw, typed", [
    ([2**62, 4], b"", False),
    ([2**62, 4], None, True),
    ([2**62 + 1, FEATURES], b"\x00" * 4 * FEATURES, False),
    ([0, 2**62], b"", False),  # no elements, so the size checks pass: numpy's reshape refused (INTERNAL)
    ([0, 2**62], None, True),
    ([2**32, 2**32, 0], b"", False),
    ([1] * 65, b"\x00" * 4, False),  # beyond numpy's 64 dimensions
])
def test_shape_overflow_is_invalid_argument(stub, shape, raw, typed):
    request = pb.ModelInferRequest(model_name=MODEL)
    request.parameters["task_id"].int64_param = 0
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{info.value.code().name}: {info.value.details()}"


def test_shape_overflow_does_not_end_the_stream(stub, reference):
    x, before = reference
    bad = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b""])
    bad.parameters["task_id"].int64_param = 0
    bad.inputs.add(name="input", datatype="FP32", shape=[2**62, 4])
    answers = list(stub.ModelStreamInfer(iter([good_request(x), bad, good_request(x)]), timeout=60))
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    assert answers[1].error_message.startswith("INVALID_ARGUMENT")
    assert np.array_equal(logits_of(answers[2].infer_response), before)


def test_oversize_message_is_resource_exhausted(stub):
    """A request over the server's 64 MiB receive limit is refused by gRPC itself."""
    request = good_request(np.zeros((1, FEATURES), np.float32))
    request.raw_input_contents[0] = b"\x00" * ((64 << 20) + 1024)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.details()


def test_bytes_that_are_no_request_are_invalid_argument_without_a_traceback(server):
    """gRPC answered UNKNOWN ("Unexpected DecodeError") and logged a 7-line traceback per call."""
    garbage, identity = b"\xff\xff", (lambda raw: raw)
    before = len(server.output)
    with grpc.insecure_channel(server.url) as channel:
        for _ in range(20):
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", identity, identity)
            with pytest.raises(grpc.RpcError) as info:
                infer(garbage, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid message of its type" in info.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", identity, identity)
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([good_request(np.zeros((1, FEATURES), np.float32)).SerializeToString(), garbage]),
                        timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.5)  # the server's output reaches `server.output` through a pipe
    assert not any("Traceback" in line for line in list(server.output)[before:])


def test_server_still_serves_correctly_after_fuzzing(server, stub, reference):
    """Runs last in this module (pytest keeps file order): live, ready, same logits as before."""
    x, before = reference
    channel = grpc.insecure_channel(server.url)
    try:
        live = pb_grpc.GRPCInferenceServiceStub(channel)
        assert live.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert wait_for(lambda: live.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready, 10, "model ready")
    finally:
        channel.close()
    response = stub.ModelInfer(good_request(x), timeout=30)
    assert np.array_equal(logits_of(response), before)
    assert np.frombuffer(response.raw_output_contents[1], dtype="<i8").tolist() == [0, 0, 0]
