"""maskbank's trainer: task streams, continual-learning methods, metrics, and the loop that
publishes each learned task into a registry. It imports registry, never serving."""

from . import cl_lsg, ewc, exssnet, heads, impresslearn, packnet, spg, supsup  # noqa: F401  (each registers its method)
from .loop import TrainingError, TrainSettings, train
from .methods import (
    Method,
    PublishedTask,
    TaskArtifact,
    TrainingContext,
    get_method,
    method_defaults,
    method_names,
    register_method,
    require,
)
from .streams import DataUnavailable, TaskData, TaskStream, get_stream, register_stream, stream_names

__all__ = [
    "DataUnavailable",
    "Method",
    "PublishedTask",
    "TrainingContext",
    "TaskArtifact",
    "TaskData",
    "TaskStream",
    "TrainSettings",
    "TrainingError",
    "get_method",
    "get_stream",
    "method_defaults",
    "method_names",
    "register_method",
    "register_stream",
    "require",
    "stream_names",
    "train",
]
