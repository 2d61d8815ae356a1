"""maskbank's server: snapshots of registry models, task inference, and the gRPC front end.
It imports registry, never trainer."""

from .repository import ModelRepository
from .runtime import InferenceResult, infer
from .server import InferenceServer, ServerConfig, serve_forever
from .snapshot import Snapshot
from .task_inference import infer_task, mode_names

__all__ = [
    "InferenceResult",
    "InferenceServer",
    "ModelRepository",
    "ServerConfig",
    "Snapshot",
    "infer",
    "infer_task",
    "mode_names",
    "serve_forever",
]
