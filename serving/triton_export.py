"""Export a registry model as a Triton model repository (ONNX Runtime platform).

Layout, one Triton model per task (the honest mapping: a Triton ONNX model cannot take weights
from outside at run time, so each task is its own self-contained model):

    REPO/MODEL.task-ID/config.pbtxt                 Triton's ModelConfig, protobuf text format
    REPO/MODEL.task-ID/GENERATION/model.onnx        the task's standalone ONNX model

The version directory is the registry generation exported, as the maskbank server reports it.
Inputs and outputs keep maskbank's names (`input` FP32 [N, features], `logits` FP32 [N, classes
of the task]); the batch dimension is Triton's (`max_batch_size`) with dynamic batching on.
Task inference has no equivalent in Triton: the caller picks the task by picking the model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from google.protobuf import text_format

from registry import Registry, TaskEntry
from registry.architectures import input_features
from registry.errors import ExportError
from registry.progress import Progress, no_progress
from registry.onnx_export import (
    INPUT,
    OUTPUT,
    architecture_graph,
    onnx_weights,
    save_checked,
    self_contained,
    selected_tasks,
    task_weights,
)

from ._proto import model_config as mc

PLATFORM = "onnxruntime_onnx"
CONFIG = "config.pbtxt"
MODEL_FILE = "model.onnx"


def triton_model_name(model: str, task: TaskEntry) -> str:
    return f"{model}.task-{task.id}"


def triton_config(name: str, features: int, task: TaskEntry, model: str, generation: int,
                  max_batch_size: int) -> mc.ModelConfig:
    """The Triton ModelConfig of one exported task."""
    config = mc.ModelConfig(
        name=name, platform=PLATFORM, max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=INPUT, data_type=mc.TYPE_FP32, dims=[features])],
        output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[task.num_classes])],
        dynamic_batching=mc.ModelDynamicBatching(),
    )
    details = {"maskbank_model": model, "maskbank_generation": str(generation), "task_id": str(task.id),
               "task_name": task.name, "method": task.method}
    for key, value in details.items():
        config.parameters[key].string_value = value
    return config


def export_triton(registry: Registry, model: str, repo: str | Path, keys: Sequence[int | str] = (), *,
                  max_batch_size: int = 1024, progress: Progress = no_progress) -> list[Path]:
    """Write one Triton model per task of `model` (all, or those `keys` names) into `repo`; return
    the model directories. Every ONNX file passes onnx.checker before it is written.

    Each model's new version is written into a staging folder inside its model directory (a name
    that is not a number: Triton ignores it) and renamed into place, with its config, only once every
    model is written: an export that fails (a corrupt blob, Ctrl-C) adds no version and no config to
    the repository, where Triton would load the tasks written before the failure as if they were all.
    Staging beside the model keeps the rename on one file system (a repository is often a mount)."""
    if max_batch_size < 1:  # 0 means "no batch dimension" to Triton, which these models (input [N, features]) have
        raise ExportError(f"max_batch_size must be at least 1 (the models take a batch of rows), got {max_batch_size}")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"{repo} is a file, not a folder: give a Triton model repository (a folder, new or not)")
    manifest = registry.manifest(model)
    graph = architecture_graph(manifest.architecture)
    features = input_features(manifest.architecture)
    version = str(manifest.generation)
    staged: list[tuple[Path, Path]] = []  # (model directory, its staging folder)
    created: list[Path] = []  # model directories this export made
    try:
        for entry, params in progress(task_weights(registry, manifest, keys), len(selected_tasks(manifest, keys))):
            name = triton_model_name(manifest.model, entry)
            directory = repo / name
            if not directory.exists():
                directory.mkdir(parents=True)
                created.append(directory)
            staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=directory))
            staged.append((directory, staging))
            (staging / version).mkdir()
            save_checked(self_contained(graph, onnx_weights(graph, params), entry.num_classes), staging / version / MODEL_FILE)
            config = triton_config(name, features, entry, manifest.model, manifest.generation, max_batch_size)
            (staging / CONFIG).write_text(text_format.MessageToString(config))
        for directory, staging in staged:
            _move_in(staging, directory, version)
        return [directory for directory, _ in staged]
    except BaseException:
        for directory, staging in staged:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in created:
            if not any(directory.iterdir()):
                directory.rmdir()
        raise


STAGING = ".staging-"  # prefix of the folder in a model directory an export writes a version into


def _move_in(staging: Path, directory: Path, version: str) -> None:
    """Rename a staged version into `directory` (replacing that version if it was exported before;
    other versions stay, and Triton serves the newest by default), then its config, and drop the
    staging folder."""
    target = directory / version
    if target.exists():
        shutil.rmtree(target)
    (staging / version).rename(target)
    (staging / CONFIG).replace(directory / CONFIG)
    staging.rmdir()
