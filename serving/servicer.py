"""The GRPCInferenceService servicer: translates protobuf to runtime calls and back, nothing more."""

from __future__ import annotations

import json

import numpy as np

from registry import MaskbankError

from . import oip
from ._proto import pb, pb_grpc
from .repository import ModelRepository
from .runtime import infer

PLATFORM = "maskbank_pytorch"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, *, version: str, default_mode: str):
        self.repository = repository
        self.version = version
        self.default_mode = default_mode
        self.ready = False  # set once the first load is done; cleared when shutting down

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="maskbank", version=self.version, extensions=[])

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
            platform=PLATFORM,
            inputs=[tensor(name=oip.INPUT_NAME, datatype="FP32", shape=[-1, *snapshot.manifest.input_shape])],
            outputs=[
                tensor(name="logits", datatype="FP32", shape=[-1, classes.pop() if len(classes) == 1 else -1]),
                tensor(name="task_id", datatype="INT64", shape=[-1]),
            ],
        )

    def ModelInfer(self, request, context):
        x = oip.decode_input(request)
        selection = oip.decode_task_selection(request)
        outputs = oip.requested_outputs(request)
        result = infer(
            self.repository, request.model_name, x, version=request.model_version,
            task=selection.task, mode=selection.mode or self.default_mode,
        )
        response = pb.ModelInferResponse(
            model_name=result.snapshot.model, model_version=str(result.snapshot.generation), id=request.id
        )
        values = {
            "logits": ("FP32", result.logits),
            "task_id": ("INT64", np.full(len(result.logits), result.task.entry.id, dtype=np.int64)),
        }
        for name in outputs:
            oip.add_raw_output(response, name, *values[name])
        oip.set_parameter(response.parameters, "task_id", result.task.entry.id)
        oip.set_parameter(response.parameters, "task", result.task.entry.name)
        oip.set_parameter(response.parameters, "task_inference", result.mode)
        if result.scores is not None:
            oip.set_parameter(response.parameters, "task_scores", json.dumps(result.scores))
        return response
