"""The maskbank.v1 service: task listing and description, GN details, and generation watching."""

from __future__ import annotations

import asyncio
import contextlib

from ._proto import maskbank_pb2 as mb
from ._proto import maskbank_pb2_grpc as mb_grpc
from .errors import InvalidRequest, ShuttingDown
from .repository import ModelRepository
from .servicer import InferenceServicer
from .snapshot import LoadedTask, Snapshot

WATCH_POLL_SECONDS = 1.0  # a watch also looks this often, whatever woke it
WATCH_CLOSED = "the server is shutting down: watch the model on another replica"


def task_info(snapshot: Snapshot, task: LoadedTask) -> mb.TaskInfo:
    entry = task.entry
    return mb.TaskInfo(
        id=entry.id, name=entry.name, method=entry.method, num_classes=entry.num_classes,
        backbone_version=snapshot.backbone_version(task),
        metrics={k: float(v) for k, v in entry.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        bytes=sum(r.size for r in entry.parts.values()),
        parts={name: mb.PartInfo(codec=r.codec, bytes=r.size, digest=r.digest) for name, r in entry.parts.items()},
        shares=list(entry.shares), in_service=task.error is None, error=str(task.error or ""), labels=list(entry.labels),
    )


class MaskbankServicer(mb_grpc.MaskbankServicer):
    def __init__(self, repository: ModelRepository, inference: InferenceServicer):
        self.repository = repository
        self.inference = inference
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()  # one per open WatchModel
        repository.add_listener(self._wake_watchers)

    def _wake_watchers(self) -> None:
        """The repository changed (any thread): every watch looks whether its model did."""
        for loop, event in list(self._watchers):
            loop.call_soon_threadsafe(event.set)

    def close_watches(self) -> None:
        """The server is stopping: every watch ends with UNAVAILABLE, at once (on the event loop)."""
        self.inference.closing = True
        self._wake_watchers()

    def ListTasks(self, request, context):
        snapshot = self.repository.get(request.model)
        return mb.ListTasksResponse(model=snapshot.model, generation=snapshot.generation,
                                    tasks=[task_info(snapshot, snapshot.tasks[t.id]) for t in snapshot.manifest.tasks])

    def DescribeTask(self, request, context):
        snapshot = self.repository.get(request.model)
        which = request.WhichOneof("task")
        if which is None:  # proto3 would read an unset task_id as 0: describing task 0 unasked is a wrong answer
            raise InvalidRequest(f"DescribeTask needs task_id or task_name; model '{snapshot.model}' has tasks "
                                 f"{snapshot.manifest.task_list}")
        if which == "task_id" and request.task_id < 0:  # as ModelInfer's task_id parameter says (it said NOT_FOUND)
            raise InvalidRequest(f"task_id must be a non-negative integer, got {request.task_id}")
        key = request.task_name if which == "task_name" else request.task_id
        return task_info(snapshot, snapshot.tasks[snapshot.manifest.task(key).id])

    async def InferTask(self, request, context):
        response, result = await self.inference.answer(request.request)
        return mb.InferTaskResponse(response=response, mode=result.mode, task_id=result.task.entry.id,
                                    task_name=result.task.entry.name, scores=result.scores or {},
                                    backend=result.backend)

    async def WatchModel(self, request, context):
        """The model's snapshot now, then each one the server swaps in (a new generation, also a lower
        one when the registry went back, or the same one loaded again: its manifest replaced or a task back
        in service, not a load that changes nothing; swaps in quick succession may be
        reported as one, the newest); NOT_FOUND once the model is unloaded, UNAVAILABLE once the server
        stops. Woken by the repository on every change, on the event loop: no thread per watch (a
        thread each, from asyncio's small default pool, delayed every watch beyond a handful)."""
        snapshot = self.repository.get(request.model)
        watch = (asyncio.get_running_loop(), asyncio.Event())
        self._watchers.add(watch)
        try:
            while True:
                yield mb.ModelGeneration(model=snapshot.model, generation=snapshot.generation,
                                         tasks=len(snapshot.tasks), task_names=[t.name for t in snapshot.manifest.tasks])
                while True:
                    watch[1].clear()  # before the look: a change after it sets the event again
                    if self.inference.closing:
                        raise ShuttingDown(WATCH_CLOSED)
                    current = self.repository.get(request.model)  # NOT_FOUND ends the watch
                    if current is not snapshot:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(watch[1].wait(), WATCH_POLL_SECONDS)
                snapshot = current
        finally:
            self._watchers.discard(watch)
