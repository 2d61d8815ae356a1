"""The maskbank.v1 service: task listing and description, GN details, and generation watching."""

from __future__ import annotations

import asyncio

from ._proto import maskbank_pb2 as mb
from ._proto import maskbank_pb2_grpc as mb_grpc
from .errors import InvalidRequest
from .repository import ModelRepository
from .servicer import InferenceServicer
from .snapshot import LoadedTask, Snapshot

WATCH_POLL_SECONDS = 1.0  # the longest a watch waits on its thread at a time


def task_info(snapshot: Snapshot, task: LoadedTask) -> mb.TaskInfo:
    entry = task.entry
    return mb.TaskInfo(
        id=entry.id, name=entry.name, method=entry.method, num_classes=entry.num_classes,
        backbone_version=snapshot.backbone_version(task),
        metrics={k: float(v) for k, v in entry.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        bytes=sum(r.size for r in entry.parts.values()),
        parts={name: mb.PartInfo(codec=r.codec, bytes=r.size, digest=r.digest) for name, r in entry.parts.items()},
        shares=list(entry.shares), in_service=task.error is None, error=str(task.error or ""),
    )


class MaskbankServicer(mb_grpc.MaskbankServicer):
    def __init__(self, repository: ModelRepository, inference: InferenceServicer):
        self.repository = repository
        self.inference = inference

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
        key = request.task_name if which == "task_name" else request.task_id
        return task_info(snapshot, snapshot.tasks[snapshot.manifest.task(key).id])

    async def InferTask(self, request, context):
        response, result = await self.inference.answer(request.request)
        return mb.InferTaskResponse(response=response, mode=result.mode, task_id=result.task.entry.id,
                                    task_name=result.task.entry.name, scores=result.scores or {},
                                    backend=result.backend)

    async def WatchModel(self, request, context):
        """The model's generation now, then each new one as it is served; NOT_FOUND once the model is
        no longer served (unloaded, or gone from the registry). The wait for the next runs on a thread,
        WATCH_POLL_SECONDS at a time; a client that goes away cancels the call there."""
        snapshot = self.repository.get(request.model)
        while True:
            yield mb.ModelGeneration(model=snapshot.model, generation=snapshot.generation, tasks=len(snapshot.tasks),
                                     task_names=[t.name for t in snapshot.manifest.tasks])
            after = snapshot.generation
            snapshot = None
            while snapshot is None:
                snapshot = await asyncio.to_thread(self.repository.wait_for_generation, request.model, after,
                                                   WATCH_POLL_SECONDS)
                if snapshot is None:  # unloaded or gone since: the watch ends NOT_FOUND, as a new one would
                    self.repository.get(request.model)
