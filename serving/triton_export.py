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

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple, Sequence

from google.protobuf import text_format

from registry import Manifest, Registry, TaskEntry
from registry.architectures import input_features
from registry.errors import ExportError
from registry.folders import make_folder, staging_folder
from registry.progress import Progress, no_progress
from registry.onnx_export import (
    COMMITTING,
    INDEX,
    INPUT,
    OUTPUT,
    STAGING,
    architecture_graph,
    check_outside_registry,
    export_lock,
    onnx_weights,
    save_checked,
    self_contained,
    selected_tasks,
    task_weights,
)

from ._proto import model_config as mc

MAX_BATCH_SIZE = 2**31 - 1  # ModelConfig.max_batch_size is an int32
PLATFORM = "onnxruntime_onnx"
CONFIG = "config.pbtxt"
LABELS = "labels.txt"  # Triton's label file: line i names class i (classification answers "value:index:label")
MODEL_FILE = "model.onnx"


def triton_model_name(model: str, task: TaskEntry) -> str:
    return f"{model}.task-{task.id}"


def triton_config(name: str, features: int, task: TaskEntry, model: str, generation: int,
                  max_batch_size: int) -> mc.ModelConfig:
    """The Triton ModelConfig of one exported task."""
    config = mc.ModelConfig(
        name=name, platform=PLATFORM, max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=INPUT, data_type=mc.TYPE_FP32, dims=[features])],
        output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[task.num_classes],
                               label_filename=LABELS if task.labels else "")],
        dynamic_batching=mc.ModelDynamicBatching(),
    )
    details = {"maskbank_model": model, "maskbank_generation": str(generation), "task_id": str(task.id),
               "task_name": task.name, "method": task.method}
    for key, value in details.items():
        config.parameters[key].string_value = value
    return config


class TritonExport(NamedTuple):
    """What an export changed in a Triton model repository."""

    models: list[Path]  # the model directories written
    withdrawn: list[Path]  # removed: this model's versions above the generation exported (the registry went
    # back), and its models of tasks the registry no longer has, which Triton would have gone on serving


def export_triton(registry: Registry, model: str, repo: str | Path, keys: Sequence[int | str] = (), *,
                  max_batch_size: int = 1024, progress: Progress = no_progress) -> TritonExport:
    """Write one Triton model per task of `model` (all, or those `keys` names) into `repo`, and remove what
    the registry withdrew (TritonExport.withdrawn). Every ONNX file passes onnx.checker before it is written.
    A folder where a model goes must be this model's export (its config names it), or empty.

    Nothing Triton would load appears before every model is written: a model already in `repo` gets
    its new version staged inside its own directory (under a name that is not a number, which Triton
    ignores), a new model is staged whole outside `repo`; all are then moved in at once, with Ctrl-C
    and SIGTERM held off meanwhile. So an export that fails (a corrupt blob, Ctrl-C) adds nothing, where
    Triton would have loaded the tasks written before the failure as if they were the model. A second
    export into the repository while one runs fails at once (export_lock)."""
    if not 1 <= max_batch_size <= MAX_BATCH_SIZE:  # 0 means "no batch dimension" to Triton: these models have one
        raise ExportError(f"max_batch_size must be from 1 (the models take a batch of rows) to {MAX_BATCH_SIZE:,} "
                          f"(Triton's field is an int32), got {max_batch_size:,}")
    repo = Path(repo)
    check_outside_registry(registry, repo)
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"{repo} is a file, not a folder: give a Triton model repository (a folder, new or not)")
    if any(os.path.lexists(repo / name) for name in (INDEX, COMMITTING)):
        raise ExportError(f"{repo} holds an `export onnx` export ({INDEX}), whose tasks/ folder Triton would take for "
                          "a model: export the Triton repository into another folder")
    manifest = registry.manifest(model)
    graph = architecture_graph(manifest.architecture)
    features = input_features(manifest.architecture)
    created = make_folder(repo, f"model repository {repo}")
    version = str(manifest.generation)
    with export_lock(repo):
        entries = selected_tasks(manifest, keys)
        _check_places(repo, manifest.model, [triton_model_name(manifest.model, e) for e in entries], version)
        withdrawn = _withdrawn(repo, manifest, {e.id for e in entries})
        outside = _staging_outside(repo)
        staged: list[tuple[Path, Path]] = []  # (model directory, the folder its files are staged in)
        try:
            for entry, params in progress(task_weights(registry, manifest, keys), len(entries)):
                name = triton_model_name(manifest.model, entry)
                directory = repo / name
                for leftover in directory.glob(f"{STAGING}*"):  # of an export killed midway
                    shutil.rmtree(leftover, ignore_errors=True)
                staging = staging_folder(directory, STAGING) if directory.is_dir() else outside / name
                staged.append((directory, staging))
                (staging / version).mkdir(parents=True)
                save_checked(self_contained(graph, onnx_weights(graph, params), entry.num_classes),
                             staging / version / MODEL_FILE)
                config = triton_config(name, features, entry, manifest.model, manifest.generation, max_batch_size)
                if entry.labels:
                    (staging / LABELS).write_text("".join(f"{label}\n" for label in entry.labels), encoding="utf-8")
                (staging / CONFIG).write_text(text_format.MessageToString(config))
            with _signals_held():
                for directory, staging in staged:
                    _move_in(staging, directory, version)
                for path in withdrawn:
                    shutil.rmtree(path)
            return TritonExport([directory for directory, _ in staged], withdrawn)
        except BaseException:
            if created is not None and not any(repo.iterdir()):  # a repository this export made and left empty goes
                shutil.rmtree(created, ignore_errors=True)
            raise
        finally:
            for directory, staging in staged:
                if staging.parent == directory:
                    shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(outside, ignore_errors=True)


def _check_places(repo: Path, model: str, names: Sequence[str], version: str) -> None:
    """ExportError if something other than a folder stands where a model or its new version goes (or a
    folder where its config goes), or a folder there holds another Triton model than `model`'s export:
    found before anything is written, since moving in would fail midway, after the models before it were
    moved in (and another model's config would be overwritten beside its own files)."""
    for name in names:
        directory = repo / name
        wrong = ([directory] if os.path.lexists(directory) and not directory.is_dir() else
                 [p for p in (directory / version,) if os.path.lexists(p) and not p.is_dir()]
                 + [p for p in (directory / CONFIG,) if p.is_dir()])
        if wrong:
            kind = ("a link to nothing" if wrong[0].is_symlink() and not wrong[0].exists() else
                    "a folder" if wrong[0].is_dir() else "a file")
            raise ExportError(f"{wrong[0]} is {kind}, where this export writes Triton model '{name}' "
                              f"(version {version}): move it away; nothing was written")
        if directory.is_dir() and (owner := _owner(directory)) not in (None, model):
            raise ExportError(f"{directory} holds {owner}, not an export of maskbank model '{model}': move it "
                              "away, or export into another repository; nothing was written")


def _owner(directory: Path) -> str | None:
    """The maskbank model whose export the Triton model folder `directory` is (its config's
    `maskbank_model`), else what it holds, in words; None for a folder with nothing but an export's
    leftovers (new models are moved in whole, config included), which any export may take."""
    config = directory / CONFIG
    if not config.is_file():
        others = [p.name for p in directory.iterdir() if not p.name.startswith(STAGING)]
        return f"files without a {CONFIG}" if others else None
    try:
        # fields of Triton's full ModelConfig that this subset lacks (response_cache, model_warmup) are no error
        parsed = text_format.Parse(config.read_text(encoding="utf-8"), mc.ModelConfig(), allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError, OSError) as error:
        return f"a {CONFIG} this export cannot read ({error})"
    if "maskbank_model" not in parsed.parameters:
        return f"a Triton model of platform '{parsed.platform or parsed.backend}'"
    return parsed.parameters["maskbank_model"].string_value


def _withdrawn(repo: Path, manifest: Manifest, exported: set[int]) -> list[Path]:
    """What of this model's export in `repo` its newest generation no longer has: whole models of tasks it
    does not list, and the version folders above it (the registry went back a generation) of the tasks
    `exported` now (another task's model would be left without a version, which Triton fails to load)."""
    prefix, tasks = f"{manifest.model}.task-", {task.id for task in manifest.tasks}
    withdrawn = []
    for directory in sorted(repo.iterdir()):
        task = directory.name.removeprefix(prefix)
        if (task == directory.name or not task.isdigit() or directory.is_symlink() or not directory.is_dir()
                or _owner(directory) != manifest.model):
            continue
        if int(task) not in tasks:
            withdrawn.append(directory)
        elif int(task) in exported:
            withdrawn += sorted((v for v in directory.iterdir() if v.is_dir() and v.name.isdigit()
                                 and int(v.name) > manifest.generation), key=lambda v: int(v.name))
    return withdrawn


def _staging_outside(repo: Path) -> Path:
    """A new folder for staging new models outside `repo` (Triton loads every folder in it): beside it
    when that is the same file system (moving in is then a rename), else in the system's temporary
    folder (moving in then copies: a repository that is a mount point, a Docker volume)."""
    parent = repo.resolve().parent
    try:
        if os.stat(parent).st_dev == os.stat(repo).st_dev:
            return Path(tempfile.mkdtemp(prefix=f".{repo.resolve().name}{STAGING}", dir=parent))
    except OSError:  # the parent cannot be read or written to: stage elsewhere
        pass
    return Path(tempfile.mkdtemp(prefix="maskbank-triton-staging-"))


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block ends (the moves into the repository), where the main
    thread can block them: a model moved in without the others would be served as the whole model."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _move_in(staging: Path, directory: Path, version: str) -> None:
    """Move a staged model into the repository: a new model's folder whole (a rename, or a copy from
    another file system), else its new version (replacing that version if it was exported before; other
    versions stay, and Triton serves the newest by default), then its config."""
    if not directory.exists():
        shutil.move(staging, directory)
        return
    target = directory / version
    if target.exists():
        shutil.rmtree(target)
    (staging / version).rename(target)
    if (staging / LABELS).exists():  # before the config that names it
        (staging / LABELS).replace(directory / LABELS)
    (staging / CONFIG).replace(directory / CONFIG)
