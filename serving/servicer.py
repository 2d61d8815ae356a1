"""The GRPCInferenceService servicer: translates protobuf to runtime calls and back, nothing more."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time

import numpy as np

from registry import MaskbankError

from . import oip
from ._proto import model_config, pb, pb_grpc
from .admission import Admission
from .backends import Backend, PyTorchBackend
from .batcher import DynamicBatcher, LoopBatcher
from .compute_pool import ComputePool
from .errors import InvalidRequest, ResponseTooLarge, ShuttingDown, Unsupported
from .repository import ModelRepository
from .runtime import InferenceResult, infer, infer_on_loop
from .snapshot import Snapshot
from .statistics import ModelStats, Statistics
from .status import abort_details
from .task_inference import default_or_exhaustive
from .timeouts import QueueTimeouts

log = logging.getLogger("maskbank.serving")

# A task-given forward of at most this many multiply-adds (rows x model weights) runs inline on the
# event loop (batched there by a LoopBatcher, never into a bigger forward): handing it to a thread
# costs more than it does. Bigger ones and task inference run on the compute pool, so that the loop
# never blocks for long.
INLINE_MACS = 1 << 24
STREAM_IN_FLIGHT = 64  # the most requests of one ModelStreamInfer call computed, or answered but unsent, at once
STREAM_CLOSED = ("the server is shutting down: the requests it read from this stream are answered, in order; send "
                 "the rest, from the first one unanswered, on a new stream (another replica)")
ENVELOPE_BYTES = 64 << 10  # room kept under --max-message-bytes (at most 1/16 of it) for what wraps an answer
FINAL_RESPONSE = "triton_final_response"  # Triton's stream answer parameter: the last answer to its request


# The Triton protocol extensions this server implements, by Triton's names, for clients that check
# ServerMetadata before using one: the top classes of an output (class_count), RepositoryIndex/Load/
# Unload, ModelConfig, ModelStatistics, request parameters, the request's `priority` and `timeout`.
EXTENSIONS = ["classification", "model_repository", "model_configuration", "statistics", "parameters",
              "schedule_policy"]


def inline_rows(snapshot) -> int:
    """The most rows of a task-given forward of `snapshot`'s model that may run on the event loop."""
    return INLINE_MACS // max(1, snapshot.weights)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    stream_window = STREAM_IN_FLIGHT  # requests of one stream held at once (less with --max-queue-size)
    closing = False  # the server is stopping: streams end once they answered what they hold, watches at once

    def __init__(self, repository: ModelRepository, statistics: Statistics, *, version: str, default_mode: str,
                 max_batch_size: int, max_queue_delay_us: int, default_shortlist: int = 1,
                 backend: Backend | None = None, instances: int = 1, admission: Admission | None = None,
                 default_timeout_us: int = 0, compute: ComputePool, priority_levels: int = 0,
                 default_priority_level: int = 0, max_message_bytes: int = 64 << 20):
        self.repository = repository
        # gRPC's send limit, less room for what wraps an answer: a larger answer is refused, not sent
        self.max_answer_bytes = max_message_bytes - min(ENVELOPE_BYTES, max_message_bytes // 16)
        self.max_message_bytes = max_message_bytes
        self.backend = backend or PyTorchBackend()
        self.platform = f"maskbank_{self.backend.name}"  # ModelMetadata / ModelConfig platform
        self.statistics = statistics
        self.version = version
        self.default_mode = default_mode
        self._defaults_replaced: set[str] = set()  # models whose requests got exhaustive for the default (logged once)
        self.default_shortlist = default_shortlist
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.batcher = DynamicBatcher(statistics, max_batch_size, max_queue_delay_us, instances)
        self.loop_batcher = LoopBatcher(statistics, max_batch_size, max_queue_delay_us)
        self.admission = admission or Admission()  # the bound per model on requests held at once (none by default)
        # a stream reads no further ahead than the bound, which would refuse its own requests beyond it
        self.stream_window = min(STREAM_IN_FLIGHT, self.admission.limit or STREAM_IN_FLIGHT)
        self.timeouts = QueueTimeouts()  # what waited on the compute pool past its `timeout` is not computed
        self.default_timeout_us = default_timeout_us  # the `timeout` of requests that give none (0: none)
        self.compute = compute  # runs the forwards handed off the event loop, a queue per priority level
        # loads and unloads, which wait for the registry (a minute, when it hangs): one at a time (they take
        # the repository's lock anyway), never on the RPC threads metadata and index calls need
        self.admin = ComputePool(1, name="maskbank-admin", initializer=compute.initializer)
        self.priority_levels = priority_levels  # Triton's: `priority` 1 (the highest) to N, the pool's levels
        self.default_priority_level = default_priority_level or priority_levels  # for 0 or beyond N (0: the lowest)
        self.ready = False  # set once the first load is done; cleared when shutting down
        self._stream_readers: set[asyncio.Task] = set()  # the open streams' reading tasks (close_streams)

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready and not self.repository.awaited())

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="maskbank", version=self.version, extensions=EXTENSIONS)

    def ModelReady(self, request, context):
        try:
            snapshot = self.repository.get(request.name, request.version)
        except MaskbankError:  # unknown, unloadable or other version: not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready and bool(snapshot.healthy_tasks()))

    def ModelMetadata(self, request, context):
        snapshot = self.repository.get(request.name, request.version)
        classes = {t.num_classes for t in snapshot.manifest.tasks}
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=snapshot.model,
            versions=[str(snapshot.generation)],
            platform=self.platform,
            inputs=[tensor(name=oip.INPUT_NAME, datatype="FP32", shape=[-1, *snapshot.manifest.input_shape])],
            outputs=[
                tensor(name="logits", datatype="FP32", shape=[-1, classes.pop() if len(classes) == 1 else -1]),
                tensor(name="task_id", datatype="INT64", shape=[-1]),
            ],
        )

    async def ModelInfer(self, request, context):
        return (await self.answer(request))[0]

    async def ModelStreamInfer(self, request_iterator, context):
        """One response per request, in the order of the requests; a failed request is answered with its
        error message and the stream stays open. As Triton does for a model that answers each request
        once, every request starts as soon as it is read, so the requests of one stream run (and batch)
        together and a slow one (task inference) does not hold back the reading of those behind it;
        their answers are sent in order. At most `stream_window` requests of a stream are held at once:
        beyond them the stream is not read (gRPC's flow control then holds the client back)."""
        if self.closing:
            raise ShuttingDown(STREAM_CLOSED)
        answers: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_window)

        stream = object()  # its requests wait for the compute pool in their order (their answers go so)

        async def read() -> None:
            async for request in request_iterator:
                await slots.acquire()
                answers.put_nowait(asyncio.ensure_future(self._stream_answer(request, stream)))

        reader = asyncio.ensure_future(read())
        self._stream_readers.add(reader)
        reader.add_done_callback(self._stream_readers.discard)
        reader.add_done_callback(lambda _: answers.put_nowait(None))  # no more answers to come
        try:
            while (answer := await answers.get()) is not None:
                response = await answer
                slots.release()
                yield response
            if reader.cancelled():  # by close_streams: the server is stopping
                raise ShuttingDown(STREAM_CLOSED)
            reader.result()  # the reading failed (the client's stream broke): end the call with that error
        finally:  # the client went away or the call ended: nothing still running has anyone to answer
            reader.cancel()
            while not answers.empty():
                if (answer := answers.get_nowait()) is not None:
                    answer.cancel()

    def close_streams(self) -> None:
        """The server is stopping: each open stream stops reading, answers the requests it holds and
        ends with UNAVAILABLE (an idle one at once). On the event loop."""
        self.closing = True
        for reader in list(self._stream_readers):
            reader.cancel()

    async def _stream_answer(self, request, stream: object) -> pb.ModelStreamInferResponse:
        """A stream's answer to `request`: its response, or its error (a bug too: INTERNAL, logged) with the
        request's id, model and version. Either is the request's only answer, so it says so as Triton does
        (`triton_final_response` true): clients of decoupled models read until it."""
        try:
            answer = pb.ModelStreamInferResponse(infer_response=(await self.answer(request, stream))[0])
        except Exception as error:  # noqa: BLE001  a bug too is this request's answer (INTERNAL, logged)
            code, message = abort_details("/inference.GRPCInferenceService/ModelStreamInfer", error)
            answer = pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                                     id=request.id))
        answer.infer_response.parameters[FINAL_RESPONSE].bool_param = True
        return answer

    def ModelConfig(self, request, context):
        snapshot = self.repository.get(request.name, request.version)
        mc = model_config
        classes = {t.num_classes for t in snapshot.manifest.tasks}
        config = mc.ModelConfig(
            name=snapshot.model, platform=self.platform, backend="maskbank", max_batch_size=self.max_batch_size,
            input=[mc.ModelInput(name=oip.INPUT_NAME, data_type=mc.TYPE_FP32, dims=list(snapshot.manifest.input_shape))],
            output=[mc.ModelOutput(name="logits", data_type=mc.TYPE_FP32, dims=[classes.pop() if len(classes) == 1 else -1]),
                    # one id per row: Triton writes a [N] output of a batching model as dims [1] reshaped to []
                    mc.ModelOutput(name="task_id", data_type=mc.TYPE_INT64, dims=[1], reshape=mc.ModelTensorReshape())],
            # one generation is served, the newest; --instances batches of a task run at once, where the forwards run
            version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
            instance_group=[self._instance_group(snapshot.model)],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=self.max_queue_delay_us,
                priority_levels=self.priority_levels, default_priority_level=self.default_priority_level,
                default_queue_policy=mc.ModelQueuePolicy(
                    max_queue_size=self.admission.limit, default_timeout_microseconds=self.default_timeout_us,
                    allow_timeout_override=True)),
        )
        methods = sorted({t.method for t in snapshot.manifest.tasks})
        default = default_or_exhaustive(snapshot, self.default_mode)
        for key, value in (("methods", ",".join(methods)), ("tasks", str(len(snapshot.manifest.tasks))),
                           ("generation", str(snapshot.generation)), ("default_task_inference", default)):
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    def _instance_group(self, model: str):
        """Triton's instance group of a model: --instances of it on the device the forwards run on."""
        device, mc = self.repository.device, model_config
        if device.type == "cuda":
            return mc.ModelInstanceGroup(name=model, kind=mc.ModelInstanceGroup.KIND_GPU, count=self.batcher.instances,
                                         gpus=[device.index or 0])
        return mc.ModelInstanceGroup(name=model, kind=mc.ModelInstanceGroup.KIND_CPU, count=self.batcher.instances)

    def ModelStatistics(self, request, context):
        models = [request.name] if request.name else self.repository.models()
        if request.name:
            self.repository.get(request.name, request.version)  # NOT_FOUND for an unknown model
        counters = self.statistics.snapshot()
        response = pb.ModelStatisticsResponse()
        duration = lambda d: pb.StatisticDuration(count=d.count, ns=d.ns)  # noqa: E731
        # Every duration is set, zero or not, as Triton sends them: JSON readers (as_json=True) find each
        # key; compute_input/output (copies in and out) are part of compute_infer here.
        zero = pb.StatisticDuration()
        for model in models:
            s = counters.get(model) or ModelStats()
            response.model_stats.add(
                name=model, version=str(self.repository.get(model).generation), last_inference=s.last_inference_ms,
                inference_count=s.inference_count, execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=duration(s.success), fail=duration(s.fail), queue=duration(s.queue), compute_input=zero,
                    compute_infer=duration(s.compute), compute_output=zero, cache_hit=zero, cache_miss=zero),
                batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_input=zero, compute_infer=duration(d),
                                                     compute_output=zero)
                             for size, d in sorted(s.batches.items())],
            )
        return response

    def RepositoryIndex(self, request, context):
        _one_repository(request)
        response = pb.RepositoryIndexResponse()
        for model, generation, state, reason in self.repository.index():
            if not request.ready or state == "READY":
                response.models.add(name=model, version=str(generation) if generation else "", state=state, reason=reason)
        return response

    async def RepositoryModelLoad(self, request, context):
        _one_repository(request)
        if request.parameters:  # Triton's config override and model files ('config', 'file:...')
            raise InvalidRequest(
                f"RepositoryModelLoad of '{request.model_name}' takes no parameters here (got "
                f"{', '.join(map(repr, sorted(request.parameters)))}): a maskbank model is what its registry holds, "
                "so load it without a config or files, and publish a new generation to change it")
        await asyncio.wrap_future(self.admin.submit(self.repository.load, request.model_name))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        _one_repository(request)
        await asyncio.wrap_future(self.admin.submit(self.repository.unload, request.model_name))
        return pb.RepositoryModelUnloadResponse()

    async def answer(self, request, stream: object | None = None) -> tuple[pb.ModelInferResponse, InferenceResult]:
        """Answer one inference request (the response and the runtime's result), recording its
        success or failure and duration in the model's statistics. The model is looked up first
        (NOT_FOUND before input errors); a request for a model or version not served counts in
        `Statistics.unserved_failures`, not under its name, since made-up names would grow the
        statistics without bound. A request beyond its bound (--max-queue-size) is refused before
        anything else is read: ServerBusy (UNAVAILABLE), counted as a failure. `stream`: the stream the
        request came on (its requests are computed in their order), if any."""
        began = time.perf_counter_ns()
        try:
            snapshot = self.repository.get(request.model_name, request.model_version)
        except MaskbankError:
            self.statistics.unserved()
            raise
        try:
            with self.admission.admit(snapshot.model):
                response, result = await self._infer(request, snapshot, stream)
        except asyncio.CancelledError:  # the caller cancelled, or its deadline passed: nobody will read an answer
            self.statistics.request(request.model_name, 0, time.perf_counter_ns() - began, ok=False, cancelled=True)
            raise
        except Exception:
            self.statistics.request(request.model_name, 0, time.perf_counter_ns() - began, ok=False)
            raise
        self.statistics.request(request.model_name, len(result.logits), time.perf_counter_ns() - began, ok=True,
                                timing=result.timing)
        return response, result

    async def _infer(self, request, snapshot, stream: object | None) -> tuple[pb.ModelInferResponse, InferenceResult]:
        arrived, arrived_ns = time.monotonic(), time.perf_counter_ns()
        x = oip.decode_input(request)
        if x.ndim and x.shape[0] > self.max_batch_size:
            raise InvalidRequest(f"the request has {x.shape[0]} rows; this server takes at most {self.max_batch_size} "
                                 "per request (--max-batch-size): split the batch")
        selection = oip.decode_task_selection(request)
        timeout = oip.decode_timeout(request, self.default_timeout_us)
        priority = oip.decode_priority(request)
        outputs = oip.requested_outputs(request)
        rows = inline_rows(snapshot)
        if selection.task is not None and x.ndim > 0 and x.shape[0] <= rows:
            result = await infer_on_loop(snapshot, x, selection.task, self.loop_batcher, rows, self.backend)
        else:
            job = functools.partial(
                infer, snapshot, x, task=selection.task, mode=selection.mode or self._default_mode(snapshot),
                batcher=self.batcher, shortlist=selection.shortlist or self.default_shortlist, backend=self.backend,
                arrived_ns=arrived_ns,
            )
            expires = None if timeout is None else arrived + timeout
            result = await asyncio.wrap_future(self.compute.submit_at(
                self._pool_level(priority), expires, functools.partial(self.timeouts.run, job, arrived, timeout), stream))
        response = self._response(request, result, outputs, selection.scores)
        self._check_size(response)
        return response, result

    def _check_size(self, response: pb.ModelInferResponse) -> None:
        """ResponseTooLarge (RESOURCE_EXHAUSTED, a failure of this request) unless `response` fits the
        server's send limit with room for its envelope (a stream's or InferTask's): gRPC itself would
        fail the call after the answer was counted a success, end a whole stream, and log a traceback.
        The raw outputs and the task scores are the bulk of an answer: the exact size is computed only
        when there are scores or the raw outputs come near the limit."""
        if sum(map(len, response.raw_output_contents)) > self.max_answer_bytes // 2 or "task_scores" in response.parameters:
            size = response.ByteSize()
            if size > self.max_answer_bytes:
                raise ResponseTooLarge(
                    f"the answer would be {size:,} bytes, more than this server sends in one message "
                    f"({self.max_answer_bytes:,}: --max-message-bytes {self.max_message_bytes:,}, less room for "
                    "its envelope): send fewer rows per request, or ask for fewer classes (class_count)")

    def _default_mode(self, snapshot: Snapshot) -> str:
        """The server's default task inference for `snapshot`, or exhaustive where it cannot run
        there (task_inference.default_or_exhaustive); the first such request of a model logs why."""
        mode = default_or_exhaustive(snapshot, self.default_mode)
        if mode != self.default_mode and snapshot.model not in self._defaults_replaced:
            self._defaults_replaced.add(snapshot.model)
            log.warning("model '%s': the default task inference '%s' (--task-inference) cannot run on its tasks, so "
                        "its requests that name no mode use '%s' (the response's task_inference says so)",
                        snapshot.model, self.default_mode, mode)
        return mode

    def _pool_level(self, priority: int) -> int:
        """The compute pool's level (0 first) of a request of Triton `priority`, as Triton maps it: 0, or a
        priority beyond the levels, is the default level; without levels every request is at one."""
        if not self.priority_levels:
            return 0
        return (priority if 0 < priority <= self.priority_levels else self.default_priority_level) - 1

    @staticmethod
    def _response(request, result: InferenceResult, outputs: list[oip.RequestedOutput],
                  all_scores: bool) -> pb.ModelInferResponse:
        """The OIP answer: the outputs asked for and the task parameters; after task inference, the chosen
        task's score, and every candidate's when `all_scores` (JSON: 27 KB at 1,000 tasks)."""
        entry = result.task.entry
        response = pb.ModelInferResponse(
            model_name=result.snapshot.model, model_version=str(result.snapshot.generation), id=request.id
        )
        response.MergeFrom(_task_parameters(entry.id, entry.name, result.mode, result.backend))
        for name, classes in outputs:
            if name == "logits" and classes:
                oip.add_bytes_output(response, name, oip.top_classes(result.logits, classes, entry.labels))
            elif name == "logits":
                oip.add_raw_output(response, name, "FP32", result.logits)
            else:
                oip.add_raw_output(response, name, "INT64", np.full(len(result.logits), entry.id, dtype=np.int64))
        if result.scores is not None:
            if left_out := result.snapshot.out_of_service_count:
                # the choice was among the tasks in service only: a batch of a task out of service went to another
                oip.set_parameter(response.parameters, "tasks_out_of_service", left_out)
            score = result.scores[entry.id]  # every mode scores the task it chose
            oip.set_parameter(response.parameters, "task_score", float(score))
            if (ties := sum(1 for other in result.scores.values() if other == score)) > 1:
                # nothing in the input told these tasks apart (all zeros; so large the network saturates)
                oip.set_parameter(response.parameters, "task_ties", ties)
            if all_scores:
                finite = {task: (score if math.isfinite(score) else None) for task, score in result.scores.items()}
                oip.set_parameter(response.parameters, "task_scores", json.dumps(finite))  # JSON has no Infinity: null
        return response


@functools.lru_cache(maxsize=4096)
def _task_parameters(task_id: int, name: str, mode: str, backend: str) -> pb.ModelInferResponse:
    """A response holding only the parameters `task_id`, `task`, `task_inference` and `backend`, built
    once per task, mode and backend and merged into each answer (building the map entry by entry costs more)."""
    response = pb.ModelInferResponse()
    for key, value in (("task_id", task_id), ("task", name), ("task_inference", mode), ("backend", backend)):
        oip.set_parameter(response.parameters, key, value)
    return response


def _one_repository(request) -> None:
    """Triton's answer to a repository named in a repository call: a server of one registry has no
    others to choose from, and ignoring the name answered a request for another repository from this one."""
    if request.repository_name:
        raise Unsupported(f"'repository_name' specification is not supported (got {request.repository_name!r}): "
                          "this server serves one registry; leave repository_name empty")
