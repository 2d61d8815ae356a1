"""Translation between Open Inference Protocol messages and plain Python/numpy values.

No model logic here: tensors in and out (raw little-endian bytes or typed contents), and the
per-request parameters maskbank understands.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._proto import pb
from .errors import InvalidRequest
from .task_inference import MAX_SHORTLIST, mode_names

INPUT_NAME = "input"
MAX_INPUT_BYTES = 1 << 31  # above gRPC's own largest message: a shape claiming more is wrong
OUTPUTS = ("logits", "task_id")
# Names Triton reserves for itself; clients may send them and maskbank ignores them (but `timeout`,
# which it reads as Triton does: decode_timeout).
RESERVED_PARAMETERS = ("priority", "timeout", "headers", "binary_data_output")
RESERVED_PREFIXES = ("triton_", "sequence_")
PARAMETERS = ("task_id", "task", "task_inference", "task_shortlist", "task_scores")
SHARED_MEMORY = "shared_memory_region"  # the tensor parameter of Triton's shared-memory extensions
NO_SHARED_MEMORY = ("this server has no shared-memory extension (ServerMetadata lists the extensions it has); send "
                    "the tensors in the request and read them from the answer")

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_TYPED_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                "FP32": "fp32_contents", "FP64": "fp64_contents"}


@dataclass(frozen=True)
class TaskSelection:
    """What the request asks about the task: a given id/name, or a task-inference mode."""

    task: int | str | None
    mode: str | None
    shortlist: int | None = None
    scores: bool = False  # a task-inference answer carries every candidate's score (JSON; costs time and bytes)


def decode_input(request: pb.ModelInferRequest, expected_datatype: str = "FP32") -> np.ndarray:
    """The request's one input tensor `input` as a numpy array (shape as sent, not yet checked)."""
    names = [t.name for t in request.inputs]
    if names != [INPUT_NAME]:
        raise InvalidRequest(f"model '{request.model_name}' takes exactly one input named '{INPUT_NAME}'; the request has {names}")
    tensor = request.inputs[0]
    if SHARED_MEMORY in tensor.parameters:
        raise InvalidRequest(f"input '{INPUT_NAME}' is in shared-memory region "
                             f"'{_parameter(tensor.parameters, SHARED_MEMORY)}': {NO_SHARED_MEMORY}")
    if tensor.datatype != expected_datatype:
        raise InvalidRequest(f"input '{INPUT_NAME}' has datatype {tensor.datatype or '(empty)'}; the model takes {expected_datatype}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input '{INPUT_NAME}' has a negative dimension in shape {list(shape)}")
    dtype = DATATYPES[expected_datatype]
    count = math.prod(shape)  # exact: numpy's int64 product wraps around for huge dimensions
    if count * dtype.itemsize > MAX_INPUT_BYTES:
        raise InvalidRequest(f"input '{INPUT_NAME}' of shape {list(shape)} would need {count * dtype.itemsize} bytes, "
                             f"more than any request can carry ({MAX_INPUT_BYTES})")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidRequest(f"{len(request.raw_input_contents)} raw input buffers for {len(request.inputs)} input(s)")
        if tensor.contents.ListFields():
            raise InvalidRequest(f"input '{INPUT_NAME}' has both raw_input_contents and typed contents; send the values "
                                 "one way only (raw_input_contents, as tritonclient does, or contents)")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidRequest(
                f"input '{INPUT_NAME}' of shape {list(shape)} and datatype {expected_datatype} needs "
                f"{count * dtype.itemsize} bytes; the request has {len(raw)}"
            )
        return _shaped(np.frombuffer(raw, dtype=dtype), shape)
    field = _TYPED_FIELD[expected_datatype]
    others = sorted(f.name for f, _ in tensor.contents.ListFields() if f.name != field)
    if others:  # values in another type's field were read as none, or ignored beside the right ones
        raise InvalidRequest(f"input '{INPUT_NAME}' is {expected_datatype}, whose typed values go in contents.{field}; "
                             f"the request has values in contents.{', contents.'.join(others)}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequest(f"input '{INPUT_NAME}' of shape {list(shape)} needs {count} values in contents.{field}; "
                             f"the request has {len(values)}")
    return _shaped(np.asarray(values, dtype=dtype), shape)


def _shaped(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`values` in `shape`; InvalidRequest for a shape no array can have, though its element count is
    right: more than numpy's 64 dimensions, or an empty one with a dimension of 2**63 (INTERNAL before)."""
    try:
        return values.reshape(shape)
    except ValueError as error:
        raise InvalidRequest(f"input '{INPUT_NAME}' has shape {list(shape)}, which no tensor can have ({error}); "
                             "ModelMetadata gives the model's input shape") from None


def _parameter(parameters, key: str, default=None):
    """The value of parameter `key` in `parameters` (a map of InferParameter), `default` when absent.
    InvalidRequest when it is present without a value (none of its fields set): the client meant
    to say something that was lost, and the default would answer another question."""
    if key not in parameters:
        return default
    kind = parameters[key].WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidRequest(f"parameter '{key}' has no value (none of bool_param, int64_param, uint64_param, "
                             "double_param or string_param is set); give it one or leave it out")
    return getattr(parameters[key], kind)


def decode_timeout(request: pb.ModelInferRequest, default_us: int = 0) -> float | None:
    """The request's `timeout` parameter (Triton's, set by tritonclient's `infer(timeout=...)`): the
    longest it may wait for its computation to start, in microseconds, `default_us` when absent;
    returned in seconds, None for 0 (no limit, as in Triton)."""
    value = _non_negative_integer(request, "timeout", default_us, "number of microseconds")
    return value / 1e6 or None


def decode_priority(request: pb.ModelInferRequest) -> int:
    """The request's `priority` parameter (Triton's, set by tritonclient's `infer(priority=...)`): 1 is the
    highest level; 0 or absent, the server's default level."""
    return _non_negative_integer(request, "priority", 0, "(1 is the highest level, 0 the server's default)")


def _non_negative_integer(request: pb.ModelInferRequest, key: str, default: int, meaning: str) -> int:
    """The integer parameter `key` (`default` when absent); InvalidRequest, saying `meaning`, unless it is
    a non-negative integer."""
    value = _parameter(request.parameters, key, default)
    if isinstance(value, (bool, float, str)) or value < 0:
        raise InvalidRequest(f"parameter '{key}' must be a non-negative integer {meaning}, got {value!r}")
    return value


def decode_task_selection(request: pb.ModelInferRequest) -> TaskSelection:
    """Read `task_id` (integer), `task` (name) and `task_inference` (mode); reject unknown names."""
    params = request.parameters
    unknown_names = [k for k in params if k not in PARAMETERS and k not in RESERVED_PARAMETERS
                     and not k.startswith(RESERVED_PREFIXES)]
    if unknown_names:
        raise InvalidRequest(f"unknown request parameter(s) {sorted(unknown_names)} (maskbank reads: "
                             f"{', '.join(PARAMETERS)}; and Triton's timeout and priority)")
    task_id, name, mode = (_parameter(params, key) for key in ("task_id", "task", "task_inference"))
    if task_id is not None and (isinstance(task_id, (bool, float, str)) or task_id < 0):
        raise InvalidRequest(f"parameter 'task_id' must be a non-negative integer, got {task_id!r}; use 'task' for a task name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest(f"parameter 'task' must be a string (the task name), got {name!r}")
    if mode is not None and not isinstance(mode, str):
        raise InvalidRequest(f"parameter 'task_inference' must be a string, got {mode!r}")
    if mode == "":  # not "the default": a client that meant a mode and sent none should hear of it
        raise InvalidRequest(f"parameter 'task_inference' is empty: name a mode ({', '.join(mode_names())}) or leave "
                             "the parameter out for the server's default")
    shortlist = _parameter(params, "task_shortlist")
    if shortlist is not None and (isinstance(shortlist, (bool, float, str)) or not 1 <= shortlist <= MAX_SHORTLIST):
        raise InvalidRequest(f"parameter 'task_shortlist' must be an integer from 1 to {MAX_SHORTLIST}, got {shortlist!r}")
    scores = _parameter(params, "task_scores", False)
    if not isinstance(scores, bool):
        raise InvalidRequest(f"parameter 'task_scores' must be a boolean (true: a task-inference answer carries every "
                             f"candidate's score), got {scores!r}")
    if task_id is not None and name is not None:
        raise InvalidRequest("give either 'task_id' or 'task', not both")
    if task_id is not None or name is not None:
        # task_scores false asks for nothing, so a client that always sends it is not refused
        gn_only = [key for key, given in (("task_inference", mode is not None), ("task_shortlist", shortlist is not None),
                                          ("task_scores", scores)) if given]
        if gn_only:
            verb = "applies" if len(gn_only) == 1 else "apply"
            raise InvalidRequest(f"{', '.join(map(repr, gn_only))} {verb} only when no task is given (task inference); "
                                 f"drop 'task_id'/'task' or {', '.join(map(repr, gn_only))}")
    return TaskSelection(task_id if task_id is not None else name, mode, shortlist, scores)


class RequestedOutput(NamedTuple):
    """An output to return: the tensor itself (classes 0), or, with Triton's classification extension
    (tritonclient: `InferRequestedOutput(name, class_count=k)`), its k largest values per row."""

    name: str
    classes: int = 0


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """The outputs to return, in order (all of them, as tensors, when the request names none)."""
    if not request.outputs:
        return [RequestedOutput(name) for name in OUTPUTS]
    if bad := [o.name for o in request.outputs if o.name not in OUTPUTS]:
        raise InvalidRequest(f"unknown output(s) {bad[:10]}; the model's outputs are {list(OUTPUTS)}")
    named = Counter(o.name for o in request.outputs)
    if len(named) < len(request.outputs):  # each name would get a full copy: a small request could ask for gigabytes
        twice = sorted(name for name, count in named.items() if count > 1)
        raise InvalidRequest(f"output(s) {twice} requested more than once; name each output once")
    if shared := [o.name for o in request.outputs if SHARED_MEMORY in o.parameters]:
        raise InvalidRequest(f"output(s) {shared[:10]} asked into a shared-memory region: {NO_SHARED_MEMORY}")
    outputs = []
    for output in request.outputs:
        classes = _parameter(output.parameters, "classification", 0)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
            raise InvalidRequest(f"output '{output.name}': parameter 'classification' (class_count) must be a "
                                 f"non-negative integer, got {classes!r}")
        if classes and output.name != "logits":
            raise InvalidRequest(f"output '{output.name}' cannot be classified (class_count): only 'logits' has "
                                 "classes")
        outputs.append(RequestedOutput(output.name, classes))
    return outputs


def top_classes(logits: np.ndarray, count: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Triton's classification output: per row, the `count` largest logits (all of them if fewer) as
    "value:index" strings, or "value:index:label" where the task names its classes (as Triton with a
    labels file), largest first (ties: the lower index first), [N, min(count, classes)]."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    values = np.take_along_axis(logits, order, axis=1)
    named = (lambda index: f":{labels[index]}" if labels[index] else "") if labels else (lambda index: "")  # as Triton
    return np.array([[f"{value:f}:{index}{named(index)}" for value, index in zip(*row)] for row in zip(values, order)],
                    dtype=object).reshape(order.shape)


def add_bytes_output(response: pb.ModelInferResponse, name: str, strings: np.ndarray) -> None:
    """Append a BYTES output as raw contents: each element a 4-byte little-endian length, then its
    UTF-8 bytes, row-major (what tritonclient's as_numpy decodes)."""
    response.outputs.add(name=name, datatype="BYTES", shape=list(strings.shape))
    encoded = [s.encode() for s in strings.flat]
    response.raw_output_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in encoded))


def add_raw_output(response: pb.ModelInferResponse, name: str, datatype: str, array: np.ndarray) -> None:
    """Append an output as raw little-endian bytes (what tritonclient's as_numpy reads)."""
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    response.raw_output_contents.append(np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes())


def set_parameter(parameters, key: str, value) -> None:
    if isinstance(value, bool):
        parameters[key].bool_param = value
    elif isinstance(value, int):
        parameters[key].int64_param = value
    elif isinstance(value, float):
        parameters[key].double_param = value
    else:
        parameters[key].string_param = str(value)
